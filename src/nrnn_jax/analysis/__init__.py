"""Analysis of trained models (docs/theory.md §4–§6): robustness curves, adversarial attacks, Hessian flatness,
margins, stability certificates and Lyapunov exponents."""

from .adversarial import deepfool, fgsm, pgd
from .flatness import hessian_lanczos, hessian_top_eigenvalue, hessian_trace
from .margins import input_margins, output_margins
from .robustness import KINDS, make_perturbation, robustness_curve
from .stability import Certificate, certificate, lyapunov_exponent, stabilization_demo

__all__ = ["Certificate", "KINDS", "certificate", "deepfool", "fgsm", "hessian_lanczos", "hessian_top_eigenvalue",
           "hessian_trace", "input_margins", "lyapunov_exponent", "make_perturbation", "output_margins", "pgd",
           "robustness_curve", "stabilization_demo"]

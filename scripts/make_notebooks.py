"""Write notebooks/*.ipynb from the cell sources below (then execute them with `--execute` to store the
outputs of a real run): `python scripts/make_notebooks.py [NAME.ipynb ...] [--execute]`. The notebooks only
call the library and plot. Each one's first code cell (`SETUP`) calls `nrnn_jax.host.configure()` before any
JAX computation: a notebook owns its kernel process, and the host set-up is what makes CPU training fast."""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]
NB = ROOT / "notebooks"

SETUP = '''import os
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx
from IPython.display import Image, Markdown, display

import nrnn_jax as nj

# Before any JAX computation: one CPU device per core and the keeping allocator, as the command-line programs
# have them (this kernel is the notebook's own process).
print("host:", nj.host.configure())
QUICK = os.environ.get("NRNN_QUICK") == "1"  # `make test` runs the notebooks in this quick setting
DATA = Path(os.environ.get("NRNN_DATA", "../../shared/data"))
print("quick setting" if QUICK else "full setting", "| real data:", DATA.exists())'''

NOTEBOOKS = {
    "01_implicit_vs_explicit.ipynb": [
        ("md", "# Implicit vs explicit regularization\n\nNoise injected into the hidden states of an RNN "
               "regularizes implicitly; in the small-noise limit its effect on the expected loss is an explicit "
               "penalty, `E[noisy loss] ≈ clean loss + reg` with `reg = (Q + R)/2` (docs/theory.md (3.7)). "
               "This notebook (1) makes the expansion visible against Monte Carlo, (2) trains deterministic, implicit and "
               "explicit models and compares them."),
        ("code", SETUP),
        ("md", "## 1. The small-noise expansion against Monte Carlo\n\nAntithetic Monte Carlo "
               "`½[ℓ(ξ) + ℓ(−ξ)] − ℓ(h̄)` against the exact regularizer as the noise shrinks: the relative error "
               "falls like ε² (until it meets the Monte Carlo error)."),
        ("code", '''scales = [1.6, 0.8, 0.4, 0.2, 0.1]
n_mc = 1000 if QUICK else 20000
rows = []
with jax.enable_x64(True):
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 2), jnp.float64)
    y = jnp.arange(4) % 3
    for s in scales:
        cfg = nj.NRNNConfig(input_dim=2, hidden=4, num_classes=3, dt=0.3, init_std=1.0, eps_add=s, eps_mult=s,
                            backend="scan", dtype="float64")
        model = nj.NoisyRNN(cfg, rngs=nnx.Rngs(0))
        reg = nj.explicit_regularizer(model, x, y, method="exact")
        probe = nj.explicit_regularizer(model, x, y, method="probe", num_probes=500, key=jax.random.PRNGKey(3))
        mc = np.asarray(nj.antithetic_monte_carlo(model, x, y, n_mc, jax.random.PRNGKey(1), reg.clean_loss))
        rows.append(dict(eps=s, exact=float(reg.value), probe=float(probe.value), probe_se=float(probe.std_err),
                         mc=mc.mean(), mc_se=mc.std(ddof=1) / np.sqrt(n_mc)))
for r in rows:
    print(f"eps {r['eps']:.2f}: exact {r['exact']:.3e}  probe {r['probe']:.3e} ± {r['probe_se']:.1e}  "
          f"MC {r['mc']:.3e} ± {r['mc_se']:.1e}  MC/exact {r['mc'] / r['exact']:.4f}")
eps = np.array([r["eps"] for r in rows])
rel = np.array([abs(r["mc"] / r["exact"] - 1) for r in rows])
rel_se = np.array([r["mc_se"] / r["exact"] for r in rows])
fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
ax[0].loglog(eps, [r["exact"] for r in rows], "o-", label="exact reg")
ax[0].loglog(eps, [r["mc"] for r in rows], "x--", label="Monte Carlo")
ax[0].set_xlabel("noise scale ε"); ax[0].set_ylabel("E[noisy loss] − clean loss"); ax[0].legend()
ax[1].loglog(eps, rel, "o-", label="|MC / exact − 1|")
ax[1].loglog(eps, 2 * rel_se, ":", label="2 Monte Carlo standard errors")
ax[1].loglog(eps, rel[0] * (eps / eps[0]) ** 2, "k--", lw=0.8, label="slope 2")
ax[1].set_xlabel("noise scale ε"); ax[1].legend()
plt.tight_layout()'''),
        ("md", "## 2. Deterministic, implicit and explicit training\n\nOn ECG5000 when the data is present "
               "(else, and in the quick setting, the embedded digits). Explicit's λ is chosen on the validation split; the explicit "
               "regularizer is tracked on validation data after every epoch, at the same noise levels for all "
               "three modes."),
        ("code", '''from nrnn_jax.compare import CompareConfig, run_compare

dataset = "ecg5000" if (DATA / "ecg5000").exists() and not QUICK else "digits"  # quick: the embedded digits
cc = CompareConfig(dataset=dataset, data_dir=str(DATA) if dataset == "ecg5000" else None, seeds=(0,),
                   epochs=2 if QUICK else 20, lambdas=(1.0,) if QUICK else (0.5, 1.0, 2.0),
                   analysis_examples=32 if QUICK else 256, lanczos_steps=6 if QUICK else 20,
                   hutchinson_samples=5 if QUICK else 30, lyapunov_time=5.0 if QUICK else 50.0,
                   curve_examples=150 if QUICK else None, track_regularizer=True)
out = Path("../runs/notebook-compare-quick" if QUICK else "../runs/notebook-compare")


def log(line):  # each run's result and measurements (run_compare also reports every epoch of every run)
    if ": epoch" not in line:
        print(line)


summary = run_compare(cc, out, log=log)
display(Markdown((out / "results.md").read_text()))'''),
        ("code", '''fig, ax = plt.subplots(figsize=(6, 3.5))
for mode, runs in summary["runs"].items():
    hist = runs[0]["history"]
    ax.plot([h["epoch"] for h in hist], [h["val_reg"] for h in hist], "o-", label=mode)
ax.set_xlabel("epoch"); ax.set_ylabel("explicit regularizer on validation data"); ax.set_yscale("log")
ax.legend(); ax.set_title("the penalty along training (same noise levels for all modes)")
plt.tight_layout()'''),
        ("md", "## 3. Robustness, flatness, margins, stability"),
        ("code", '''for name in ["robustness.png", "hessian.png", "margins.png", "stability.png"]:
    display(Image(filename=str(out / name)))'''),
    ],
    "02_stochastic_stabilization.ipynb": [
        ("md", "# Stochastic stabilization\n\nThe unforced dynamics dh = f(h) dt + σ(h) dB with f(h) = a h "
               "(c₁ = a > 0: unstable without noise) and scalar multiplicative noise ε h dβ: the certificate of "
               "docs/theory.md (5.5)–(5.6) bounds the top Lyapunov exponent by c₁ − ε²/2, so enough noise "
               "makes h = 0 almost surely stable. Diagonal noise ε diag(h) dB stabilises much less (c₃ = ε²/d)."),
        ("code", SETUP),
        ("code", '''from nrnn_jax.analysis import certificate, lyapunov_exponent, stabilization_demo

eps_values = np.linspace(0, 2, 5 if QUICK else 9)
rows = stabilization_demo(a=0.5, eps_values=eps_values, dt=0.01, t_max=20.0 if QUICK else 100.0)
for r in rows:
    print(f"eps {r['eps']:.2f}: bound {r['bound']:+.3f}, measured exponent {r['exponent']:+.3f} ± {r['exponent_se']:.3f}")
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(eps_values, [r["bound"] for r in rows], "k-", label="certificate bound c₁ − ε²/2")
ax.errorbar(eps_values, [r["exponent"] for r in rows], yerr=[2 * r["exponent_se"] for r in rows], fmt="o",
            label="measured top Lyapunov exponent")
ax.axhline(0, color="gray", lw=0.8); ax.set_xlabel("multiplicative noise ε"); ax.legend()
plt.tight_layout()'''),
        ("md", "## Sample paths\n\nlog |h_t| for three noise levels, scalar noise, from h₀ = (1, …, 1)."),
        ("code", '''d, dt, T = 4, 0.01, 2000 if QUICK else 5000
p = nj.RecurrentParams(A=0.5 * jnp.eye(d), W=jnp.zeros((d, d)))
fig, ax = plt.subplots(figsize=(6, 3.5))
for eps, color in [(0.0, "tab:gray"), (1.0, "tab:blue"), (2.0, "tab:red")]:
    cfg = nj.NRNNConfig(hidden=d, dt=dt, eps_mult=eps, noise_kind="scalar", backend="scan")
    for k in range(3):
        xi = jax.random.normal(jax.random.PRNGKey(k), (T, cfg.noise_dim))
        hs = nj.solve(cfg, p, jnp.zeros((T, d)), xi, h0=jnp.ones(d), save="all")
        ax.plot(dt * np.arange(T + 1), np.log(np.linalg.norm(np.asarray(hs), axis=1)), color=color, lw=0.8,
                label=f"ε = {eps}" if k == 0 else None)
ax.set_xlabel("t"); ax.set_ylabel("log |h_t|"); ax.legend(); plt.tight_layout()'''),
        ("md", "## Diagonal against scalar noise on a random Lipschitz drift"),
        ("code", '''key = jax.random.PRNGKey(0)
M = jax.random.normal(key, (8, 8))
p = nj.RecurrentParams(A=0.5 * (M - M.T) + 0.3 * jnp.eye(8), W=0.05 * jax.random.normal(jax.random.PRNGKey(1), (8, 8)))
for kind in ("scalar", "diagonal"):
    for eps in (0.5, 1.0, 1.5):
        cfg = nj.NRNNConfig(hidden=8, dt=0.01, eps_mult=eps, noise_kind=kind, backend="scan")
        cert = certificate(cfg, p)
        lam, se = lyapunov_exponent(cfg, p, t_max=20.0 if QUICK else 100.0)
        print(f"{kind:8s} eps {eps}: c1 {cert.c1:+.3f} c2 {cert.c2:.3f} c3 {cert.c3:.3f} bound {cert.bound:+.3f} "
              f"measured {lam:+.3f} ± {se:.3f}")'''),
    ],
    "03_robustness.ipynb": [
        ("md", "# Robustness of saved runs\n\nAccuracy against the strength of random and adversarial "
               "input perturbations (docs/theory.md §6) for saved run directories: those of `nrnn-compare` "
               "when present (`runs/compare-ecg5000`), otherwise three quick runs on the embedded digits."),
        ("code", SETUP),
        ("code", '''saved = Path("../runs/compare-ecg5000")
if saved.exists() and not QUICK:
    run_dirs = {m: sorted((saved / m).iterdir())[0] for m in ("deterministic", "implicit", "explicit")}
else:
    data = nj.load_dataset("digits")
    base = nj.NRNNConfig(input_dim=8, num_classes=10, hidden=32, dt=0.5, eps_add=0.3, eps_mult=0.3, backend="scan")
    run_dirs = {}
    for mode in ("deterministic", "implicit", "explicit"):
        mcfg = base.replace(eps_add=0.0, eps_mult=0.0) if mode == "deterministic" else base
        run_dirs[mode] = Path(f"../runs/notebook-robustness/{mode}")
        nj.train_and_evaluate(mcfg, nj.TrainConfig(mode=mode, epochs=3 if QUICK else 10, batch_size=32),
                              run_dirs[mode], data=data, progress=False, log=None, overwrite=True)
print({m: str(r) for m, r in run_dirs.items()})'''),
        ("code", '''from nrnn_jax.analysis import robustness_curve

data_of = {m: nj.load_run_dataset(r) for m, r in run_dirs.items()}
kinds = {"white": [0, 0.25, 0.5, 1.0], "multiplicative": [0, 0.5, 1.0, 2.0], "salt_pepper": [0, 0.05, 0.1, 0.2],
         "fgsm_linf": [0, 0.02, 0.05, 0.1], "pgd_linf": [0, 0.02, 0.05, 0.1], "pgd_l2": [0, 0.25, 0.5, 1.0]}
fig, axes = plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds), 3.2))
for (kind, strengths), ax in zip(kinds.items(), axes):
    for mode, run_dir in run_dirs.items():
        x, y = data_of[mode].split("test")
        n = 500 if QUICK else len(y)
        acc = robustness_curve(nj.load_run(run_dir), x[:n], y[:n], kind, strengths)
        ax.plot(strengths, acc, "o-", label=mode)
    ax.set_title(kind); ax.set_xlabel("strength"); ax.grid(alpha=0.3)
axes[0].set_ylabel("test accuracy"); axes[0].legend(); plt.tight_layout()'''),
    ],
    "04_bring_your_own_cell.ipynb": [
        ("md", "# Bring your own cell\n\nAny recurrent cell is a drift f(h, z) of an input-driven SDE "
               "(docs/theory.md §8). This notebook writes one in 15 lines, trains it deterministic, with noise "
               "injection (implicit) and with the explicit penalty on ECG5000 (the embedded digits in the quick "
               "setting), compares robustness to input noise, and checks its explicit regularizer against Monte "
               "Carlo as the noise shrinks. Then an LSTM, whose state is the pair (c, h), next to it: built in "
               "and as a flax cell, with the noise in its whole state or in h only."),
        ("code", SETUP),
        ("md", "## 1. The cell\n\nA leaky cell with a learnable per-unit leak and an input gate. `drift` is "
               "written for ONE example; the library vmaps it, injects noise into it with any scheme and "
               "differentiates it for the penalty."),
        ("code", '''class GatedLeakyCell(nj.Cell):
    """dh/dt = −softplus(a) ⊙ h + s(G z) ⊙ tanh(W h + z): a learnable leak and an input gate."""

    def __init__(self, cfg, *, rngs):
        d, dtype = cfg.hidden, jnp.dtype(cfg.dtype)
        self.W = nnx.Param(jax.random.normal(rngs.params(), (d, d), dtype) / d**0.5)
        self.G = nnx.Param(jax.random.normal(rngs.params(), (d, d), dtype) / d**0.5)
        self.a = nnx.Param(jnp.zeros(d, dtype))

    def drift(self, h, z):
        leak = jax.nn.softplus(self.a[...])
        gate = jax.nn.sigmoid(self.G[...] @ z)
        return -leak * h + gate * jnp.tanh(self.W[...] @ h + z)'''),
        ("md", "## 2. Three training modes"),
        ("code", '''ecg = (DATA / "ecg5000").exists() and not QUICK
data = nj.load_dataset("ecg5000", str(DATA)) if ecg else nj.load_dataset("digits")
base = nj.NRNNConfig(input_dim=data.input_dim, num_classes=data.num_classes, hidden=32 if ecg else 16,
                     dt=0.1 if ecg else 0.5, eps_add=0.3, eps_mult=0.3, backend="scan")
results = {}
for mode in ("deterministic", "implicit", "explicit"):
    tcfg = nj.TrainConfig(dataset=data.name, mode=mode, epochs=2 if QUICK else 20, batch_size=32, lr=3e-3,
                          reg_method="probe", reg_weight=1.0, seed=0)
    results[mode] = nj.train_and_evaluate(base, tcfg, f"../runs/notebook-own-cell/{mode}", data=data,
                                          cell=GatedLeakyCell, progress=False, log=None, overwrite=True)
    print(f"{mode:13s} test acc {results[mode].summary['test_acc']:.4f}  "
          f"({results[mode].summary['train_time_s']:.0f} s)")'''),
        ("code", '''from nrnn_jax.analysis import robustness_curve

x, y = data.split("test")
n = 300 if QUICK else len(y)
strengths = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5]
fig, ax = plt.subplots(figsize=(5, 3.4))
for mode, r in results.items():
    model = nj.load_run(r.run_dir, cell=GatedLeakyCell)  # a notebook's cell is passed back in to reload the run
    acc = robustness_curve(model, x[:n], y[:n], "white", strengths, seed=0)
    ax.plot(strengths, acc, "o-", label=mode)
    print(mode, " ".join(f"{a:.3f}" for a in acc))
ax.set_xlabel("white input noise σ"); ax.set_ylabel("test accuracy"); ax.legend(); ax.grid(alpha=0.3)
ax.set_title(f"GatedLeakyCell on {data.name}"); plt.tight_layout()'''),
        ("md", "## 3. The explicit regularizer of this cell against Monte Carlo\n\nAntithetic Monte Carlo "
               "`½[ℓ(ξ) + ℓ(−ξ)] − ℓ(h̄)` estimates E[noisy loss] − clean loss; the exact regularizer is its "
               "small-noise limit, so their ratio tends to 1 as the noise shrinks (until the Monte Carlo error "
               "dominates)."),
        ("code", '''scales = [1.6, 0.8, 0.4, 0.2, 0.1]
n_mc = 1000 if QUICK else 20000
rows = []
with jax.enable_x64(True):
    xs = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 2), jnp.float64)
    ys = jnp.arange(4) % 3
    for s in scales:
        cfg = nj.NRNNConfig(input_dim=2, hidden=4, num_classes=3, dt=0.3, eps_add=s, eps_mult=s, backend="scan",
                            dtype="float64")
        rngs = nnx.Rngs(0)
        model = nj.NoisyRNN(cfg, rngs=rngs, cell=GatedLeakyCell(cfg, rngs=rngs))
        reg = nj.explicit_regularizer(model, xs, ys, method="exact")
        mc = np.asarray(nj.antithetic_monte_carlo(model, xs, ys, n_mc, jax.random.PRNGKey(1), reg.clean_loss))
        rows.append((s, float(reg.value), mc.mean(), mc.std(ddof=1) / np.sqrt(n_mc)))
for s, exact, mc, se in rows:
    print(f"eps {s:.2f}: exact {exact:.4e}   Monte Carlo {mc:.4e} ± {se:.1e}   ratio {mc / exact:.3f} ± {se / exact:.3f}")
fig, ax = plt.subplots(figsize=(5, 3.4))
ax.errorbar([r[0] for r in rows], [r[2] / r[1] for r in rows], yerr=[2 * r[3] / r[1] for r in rows], fmt="o-")
ax.axhline(1.0, color="k", lw=0.8); ax.set_xscale("log")
ax.set_xlabel("noise level ε (= ε_add = ε_mult)"); ax.set_ylabel("Monte Carlo / exact regularizer")
ax.set_title("the expansion becomes exact as ε → 0"); plt.tight_layout()'''),
        ("md", "## 4. An LSTM next to your cell\n\nA cell's state may be any pytree: the LSTM's is the pair "
               "(c, h). The built-in `NRNNConfig(cell=\"lstm\")` (`nj.LSTMCell`) is flax's "
               "`nnx.OptimizedLSTMCell` as the drift f((c, h), z) = cell((c, h), z) − (c, h); any flax `nnx` RNN "
               "cell becomes a drift the same way through `nj.FlaxCell(cell)`, with no wrapper of your own. The "
               "decoder reads h, the cell's output. The noise goes into the whole state (c, h) by default (the "
               "paper injects it into the hidden state), or into named parts of it: `noise_on=(\"output\",)` puts "
               "it into h only. `model.state_size` is the size of one example's flat state, `model.noise_dim` the "
               "width m of the noise: `model(x, noise=xi)` takes xi of shape (batch, T, m) for every cell."),
        ("code", '''def flax_lstm(cfg, *, rngs):  # a factory, as train_and_evaluate and load_run take a user cell
    return nj.FlaxCell(nnx.OptimizedLSTMCell(cfg.hidden, cfg.hidden, rngs=rngs))


lstm_cfg = base.replace(cell="lstm")
h_only = ("output",)
built = {"GatedLeakyCell": (base, GatedLeakyCell), 'cell="lstm"': (lstm_cfg, None),
         'cell="lstm", noise_on=("output",)': (lstm_cfg.replace(noise_on=h_only), None),
         "FlaxCell(nnx.OptimizedLSTMCell)": (base, flax_lstm),
         'FlaxCell(nnx.OptimizedLSTMCell), noise_on=("output",)': (base.replace(noise_on=h_only), flax_lstm)}
xb = x[:8]
for name, (cfg, cell) in built.items():
    rngs = nnx.Rngs(0)
    model = nj.NoisyRNN(cfg, rngs=rngs, cell=None if cell is None else cell(cfg, rngs=rngs))
    xi = jax.random.normal(jax.random.PRNGKey(0), (xb.shape[0], xb.shape[1], model.noise_dim))
    layout = model.state_layout
    parts = "one array" if layout is None else f"parts {layout.names}, h = part {layout.names[layout.output]!r}"
    print(f"{name:54s} state_size {model.state_size:3d}  noise_dim {model.noise_dim:3d}  ({parts})  "
          f"logits {model(xb, noise=xi).shape}")

# at step size 1 and without noise the model is the discrete LSTM: the flax cell stepped by hand gives the logits
lstm = nj.NoisyRNN(lstm_cfg.replace(dt=1.0, eps_add=0.0, eps_mult=0.0), rngs=nnx.Rngs(0))
carry = lstm.cell.cell.initialize_carry((xb.shape[0], lstm_cfg.hidden), rngs=nnx.Rngs(0))  # (c, h) = 0
for z_k in jnp.moveaxis(lstm.encode(jnp.asarray(xb)), 1, 0):
    carry, h = lstm.cell.cell(carry, z_k)
print("δ = 1, no noise: max |model(x) − decoder(h_T of the discrete LSTM)| =",
      f"{float(jnp.abs(lstm(xb) - lstm.decoder(h)).max()):.1e}")'''),
        ("md", "Trained as the cell above was: deterministic, and with noise injection into (c, h) and into h "
               "only (the built-in cell and the flax cell are the same LSTM; their parameters are drawn in "
               "another order)."),
        ("code", '''lstm_runs = {"LSTM deterministic": ("lstm-deterministic", lstm_cfg, None, "deterministic"),
             "LSTM implicit, noise on (c, h)": ("lstm-implicit", lstm_cfg, None, "implicit"),
             "FlaxCell LSTM implicit, noise on h": ("flax-lstm-implicit-h", base.replace(noise_on=h_only), flax_lstm,
                                                    "implicit")}
lstm_results = {}
for name, (folder, cfg, cell, mode) in lstm_runs.items():
    tcfg = nj.TrainConfig(dataset=data.name, mode=mode, epochs=2 if QUICK else 20, batch_size=32, lr=3e-3, seed=0)
    lstm_results[name] = nj.train_and_evaluate(cfg, tcfg, f"../runs/notebook-own-cell/{folder}", data=data, cell=cell,
                                               progress=False, log=None, overwrite=True)
    print(f"{name:36s} test acc {lstm_results[name].summary['test_acc']:.4f}  "
          f"({lstm_results[name].summary['train_time_s']:.0f} s)")'''),
        ("code", '''fig, ax = plt.subplots(figsize=(6, 3.6))
reloaded = {f"GatedLeakyCell {mode}": (nj.load_run(results[mode].run_dir, cell=GatedLeakyCell), "x:")
            for mode in ("deterministic", "implicit")}
for name, r in lstm_results.items():
    reloaded[name] = (nj.load_run(r.run_dir, cell=lstm_runs[name][2]), "o-")
for name, (model, style) in reloaded.items():
    acc = robustness_curve(model, x[:n], y[:n], "white", strengths, seed=0)
    ax.plot(strengths, acc, style, label=name)
    print(f"{name:36s}", " ".join(f"{a:.3f}" for a in acc))
ax.set_xlabel("white input noise σ"); ax.set_ylabel("test accuracy"); ax.legend(fontsize=8); ax.grid(alpha=0.3)
ax.set_title(f"the LSTM next to GatedLeakyCell on {data.name}"); plt.tight_layout()'''),
    ],
}


def build(names=None) -> None:
    NB.mkdir(exist_ok=True)
    for name in names or NOTEBOOKS:
        cells = NOTEBOOKS[name]
        nb = new_notebook(cells=[new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, NB / name)


def execute(names=None, timeout: int = 900) -> None:
    from nbclient import NotebookClient

    for name in names or NOTEBOOKS:
        nb = nbformat.read(NB / name, as_version=4)
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(NB)}}).execute()
        nbformat.write(nb, NB / name)
        print("executed", name)


if __name__ == "__main__":
    # `make_notebooks.py [NAME.ipynb ...] [--execute]`: rebuild (and execute) only the named notebooks,
    # all of them when none is named; the others keep their stored outputs.
    names = [a for a in sys.argv[1:] if a.endswith(".ipynb")] or None
    build(names)
    if "--execute" in sys.argv:
        execute(names)

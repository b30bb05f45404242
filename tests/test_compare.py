"""`nrnn-compare`: the output layout is a public contract; every run loads with load_run."""

import json

from nrnn_jax import load_run
from nrnn_jax.cli import compare_main, robustness_main
from nrnn_jax.compare import CompareConfig, run_compare


def test_compare_layout_and_contents(tmp_path, capsys):
    cc = CompareConfig(dataset="digits", seeds=(0,), epochs=1, lambdas=(0.5, 1.0), analysis_examples=16,
                       lanczos_steps=4, hutchinson_samples=3, lyapunov_time=2.0, curve_examples=60,
                       track_regularizer=True)
    out = tmp_path / "cmp"
    summary = run_compare(cc, out, log=None)
    for rel in ("deterministic/seed0", "implicit/seed0", "explicit/seed0-lam0.5", "explicit/seed0-lam1"):
        assert load_run(out / rel).cfg.hidden == 32
    for name in ("summary.json", "results.md", "robustness.png", "hessian.png", "margins.png", "stability.png"):
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / "summary.json").read_text())
    assert saved["runs"]["explicit"][0]["lambda"] in (0.5, 1.0)
    assert set(saved["runs"]["explicit"][0]["lambda_scores"]) == {"0.5", "1"}
    a = saved["runs"]["implicit"][0]["analysis"]
    for key in ("hessian_top", "hessian_trace", "output_margin_median", "c1", "lyapunov_deterministic", "reg_value"):
        assert isinstance(a[key], float)
    assert a["curves"]["white"]["acc"][0] == saved["runs"]["implicit"][0]["analysis"]["curves"]["pgd_linf"]["acc"][0]
    assert all("val_reg" in h for h in saved["runs"]["deterministic"][0]["history"])
    # the deterministic model's penalty is measured at the comparison's noise levels, so it is not zero
    assert saved["runs"]["deterministic"][0]["analysis"]["reg_value"] > 0
    assert "| deterministic |" in (out / "results.md").read_text()
    assert summary["aggregate"]["explicit"]["lambdas"] == [saved["runs"]["explicit"][0]["lambda"]]

    assert robustness_main([str(out / "implicit/seed0"), "--kind", "white", "--strengths", "0,0.5"]) == 0
    assert "white 0.5" in capsys.readouterr().out
    assert compare_main(["--dataset", "nope", "--out", str(tmp_path / "x")]) == 2

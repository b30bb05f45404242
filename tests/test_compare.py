"""`nrnn-compare`: the output layout is a public contract; every run loads with load_run, and summary.json and
results.md hold what the saved runs give when measured again."""

import copy
import dataclasses
import json

import pytest

import numpy as np

from nrnn_jax import evaluate, explicit_regularizer, load_dataset, load_run, predict_logits, with_noise
from nrnn_jax.analysis import certificate
from nrnn_jax.cli import COMPARE_TRAIN_FLAGS, compare_main, compare_parser, robustness_main
from nrnn_jax import compare
from nrnn_jax.compare import CompareConfig, aggregate, run_compare
from nrnn_jax.evaluate import white_noise
from nrnn_jax.train import TrainingDiverged

MODES = ("deterministic", "implicit", "explicit")


def _recheck_run(r, data, settings, out):
    """Measure the saved run `r` (an entry of summary.json's runs) again from its run directory."""
    a, seed = r["analysis"], r["seed"]
    model = load_run(r["run_dir"])
    noisy = with_noise(model, settings["model"]["eps_add"], settings["model"]["eps_mult"])
    # the same float32 parameters and the same computation: equal up to ~8 ulp of reassociation (measured: equal)
    close = dict(rtol=1e-6, atol=1e-7)
    assert evaluate(model, data.x_test, data.y_test)["acc"] == r["summary"]["test_acc"]
    # output margins on the whole test split, computed here from the logits in float64; the saved ones subtract in
    # float32 (half an ulp of |logits| ≲ 10 is < 1e-6; measured 1.2e-7)
    logits = np.asarray(predict_logits(model, data.x_test), np.float64)
    y = data.y_test
    margins = logits[np.arange(len(y)), y] - np.where(np.eye(logits.shape[1], dtype=bool)[y], -np.inf, logits).max(1)
    np.testing.assert_allclose(a["output_margins"], margins, rtol=0, atol=1e-6)
    np.testing.assert_allclose(a["output_margin_median"], np.median(margins), rtol=0, atol=1e-6)
    # the certificate of the unforced dynamics at the comparison's multiplicative noise
    cert = certificate(noisy.cfg.replace(eps_add=0.0), model.recurrent_params())
    np.testing.assert_allclose(a["c1"], cert.c1, **close)
    # c1 bounds hᵀf(h)/|h|², so the deterministic Lyapunov exponent is below it (measured 0.03 / 0.0001 / 0.007
    # against c1 = 0.65 / 0.58 / 0.59)
    assert a["lyapunov_deterministic"] < a["c1"]
    # the explicit regularizer (exact method) on the test examples `analyse` draws: train indices first, then test
    rng = np.random.default_rng(seed)
    n = settings["analysis_examples"]
    rng.choice(data.x_train.shape[0], min(n, data.x_train.shape[0]), replace=False)
    te = np.sort(rng.choice(data.x_test.shape[0], min(n, data.x_test.shape[0]), replace=False))
    reg = explicit_regularizer(noisy, np.asarray(data.x_test[te]), data.y_test[te], method="exact")
    np.testing.assert_allclose([a["reg_value"], a["reg_Q"], a["reg_R"]], [reg.value, reg.Q, reg.R], **close)
    assert a["reg_R"] > 0  # tr(∇²ℓ P) with a convex loss and P ≠ 0 (noise on)
    # every robustness curve starts at strength 0: the clean accuracy on the first curve_examples test images
    m = settings["curve_examples"]
    clean = evaluate(model, data.x_test[:m], data.y_test[:m])["acc"]
    for kind, c in a["curves"].items():
        assert c["strengths"][0] == 0 and c["acc"][0] == clean, kind
    assert a["hessian_top"] == max(a["hessian_ritz"])
    assert np.isfinite(a["hessian_trace"]) and a["hessian_trace_se"] > 0


def test_compare_layout_and_contents(tmp_path, capsys):
    cc = CompareConfig(dataset="digits", seeds=(0,), epochs=1, lambdas=(0.5, 1.0), analysis_examples=16,
                       lanczos_steps=4, hutchinson_samples=3, lyapunov_time=2.0, curve_examples=60,
                       track_regularizer=True)
    out = tmp_path / "cmp"
    lines = []
    summary = run_compare(cc, out, log=lines.append)
    # progress: a line per epoch of every run, a line when its measurements start, a line per finished run
    labels = ["[digits] seed 0 deterministic", "[digits] seed 0 implicit", "[digits] seed 0 explicit λ=0.5",
              "[digits] seed 0 explicit λ=1"]
    for label in labels:
        assert [line for line in lines if line.startswith(f"{label}: epoch")] == [
            line for line in lines if line.startswith(f"{label}: epoch   1  loss ")], label
        assert sum(line.startswith(f"{label}: epoch") for line in lines) == cc.epochs, label
        assert sum(line.startswith(f"{label}: test acc") for line in lines) == 1, label
    chosen = f"[digits] seed 0 explicit λ={summary['runs']['explicit'][0]['lambda']:g}"
    assert sorted(line.split(": measuring")[0] for line in lines if ": measuring" in line) == sorted(labels[:2] + [chosen])
    # and one line per run on the examples each epoch leaves out (digits' 1258 training examples are not a
    # multiple of the batch size)
    left_out = [line for line in lines if "each epoch trains on" in line]
    assert len(left_out) == 4
    assert len(lines) - len(left_out) == 4 * cc.epochs + 4 + 3
    for rel in ("deterministic/seed0", "implicit/seed0", "explicit/seed0-lam0.5", "explicit/seed0-lam1"):
        assert load_run(out / rel).cfg.hidden == 32
    for name in ("summary.json", "results.md", "robustness.png", "hessian.png", "margins.png", "stability.png"):
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / "summary.json").read_text())
    settings = saved["settings"]
    data = load_dataset("digits")
    for mode in MODES:
        _recheck_run(saved["runs"][mode][0], data, settings, out)

    # the chosen λ maximises the recorded validation scores, and each score is measured again: the mean of the clean
    # validation accuracy and those under white noise of the selection strengths
    ex = saved["runs"]["explicit"][0]
    scores = ex["lambda_scores"]
    assert set(scores) == {"0.5", "1"}
    assert ex["lambda"] == float(max(scores, key=scores.get))
    assert ex["run_dir"] == str(out / "explicit" / f"seed0-lam{ex['lambda']:g}")
    for lam, score in scores.items():
        model = load_run(out / "explicit" / f"seed0-lam{lam}")
        accs = [evaluate(model, data.x_val, data.y_val)["acc"]]
        accs += [evaluate(model, data.x_val, data.y_val, perturb=white_noise(s), seed=0)["acc"]
                 for s in settings["selection_white"]]
        assert score == np.mean(accs), lam
    assert summary["aggregate"]["explicit"]["lambdas"] == [ex["lambda"]]

    assert all("val_reg" in h for h in saved["runs"]["deterministic"][0]["history"])
    # the deterministic model's penalty is measured at the comparison's noise levels, so it is not zero
    assert saved["runs"]["deterministic"][0]["analysis"]["reg_value"] > 0

    # results.md: a row per mode holding the aggregate's numbers as printed (4 decimals; one seed: no ± spread)
    text = (out / "results.md").read_text()
    rows = {line.split("|")[1].strip().split(" (")[0]: line for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| mode")}
    assert set(rows) == set(MODES)
    assert f"| explicit (λ = {ex['lambda']:g}) |" in rows["explicit"]
    header = next(line for line in text.splitlines() if line.startswith("| mode"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    for mode in MODES:
        agg = saved["aggregate"][mode]
        for key in ("test_acc", "hessian_top", "hessian_trace", "output_margin_median", "c1",
                    "lyapunov_deterministic", "reg_value"):
            assert f"| {agg[key]['mean']:.4f} |" in rows[mode], (mode, key)
        assert "±" not in rows[mode]
        # the clean accuracy on the curves' own examples (the first curve_examples of the test split) has a column
        cells = dict(zip(columns, [c.strip() for c in rows[mode].strip("|").split("|")]))
        model = load_run(saved["runs"][mode][0]["run_dir"])
        assert cells["clean acc, curve examples"] == f"{evaluate(model, data.x_test[:60], data.y_test[:60])['acc']:.4f}"
        assert cells["clean test acc"] == f"{evaluate(model, data.x_test, data.y_test)['acc']:.4f}"
        # one seed: the aggregate is that seed's value, with std 0
        run = saved["runs"][mode][0]
        assert agg["test_acc"] == {"mean": run["summary"]["test_acc"], "std": 0.0}
        assert agg["c1"] == {"mean": run["analysis"]["c1"], "std": 0.0}

    # which examples each column comes from
    n_test = len(data.y_test)
    assert saved["examples"] == {"test": n_test, "curves": 60, "hessian_train": 16, "analysis_test": 16}
    assert (f"clean test acc and median output margin: the whole test split ({n_test}); the robustness columns "
            "(white, salt_pepper, pgd_linf) and 'clean acc, curve examples': the first 60 test examples; Hessian: 16 training "
            "examples; ") in text
    assert "median DeepFool margin and explicit reg: 16 test examples" in text and "seeds [0] (one seed" in text

    # several seeds: the aggregate is numpy's mean and sample std (ddof=1) of the per-seed values
    runs = {}
    for mode in MODES:
        runs[mode] = []
        for k in range(3):
            r = copy.deepcopy(saved["runs"][mode][0])
            r["summary"]["test_acc"] += 0.1 * k
            r["analysis"]["c1"] *= 1 + k
            r["analysis"]["curves"]["white"]["acc"] = [v - 0.05 * k ** 2 for v in r["analysis"]["curves"]["white"]["acc"]]
            runs[mode].append(r)
    agg = aggregate(runs)
    for mode in MODES:
        for key, values in (("test_acc", [r["summary"]["test_acc"] for r in runs[mode]]),
                            ("c1", [r["analysis"]["c1"] for r in runs[mode]])):
            np.testing.assert_allclose([agg[mode][key]["mean"], agg[mode][key]["std"]],
                                       [np.mean(values), np.std(values, ddof=1)], rtol=1e-12)
        accs = np.array([r["analysis"]["curves"]["white"]["acc"] for r in runs[mode]])
        np.testing.assert_allclose(agg[mode]["curves"]["white"]["mean"], accs.mean(0), rtol=1e-12)
        np.testing.assert_allclose(agg[mode]["curves"]["white"]["std"], accs.std(0, ddof=1), rtol=1e-12)
    # over several seeds results.md shows mean ± sample std
    table = compare.results_table({**saved, "runs": runs, "aggregate": agg,
                                   "settings": {**settings, "seeds": [0, 1, 2]}})
    for mode in MODES:
        row = next(line for line in table.splitlines() if line.startswith(f"| {mode}"))
        values = [r["summary"]["test_acc"] for r in runs[mode]]
        assert f"| {np.mean(values):.4f} ± {np.std(values, ddof=1):.4f} |" in row
        white = np.array([r["analysis"]["curves"]["white"]["acc"] for r in runs[mode]])[:, 1]
        assert f"| {white.mean():.4f} ± {white.std(ddof=1):.4f} |" in row
    assert "(mean ± sample standard deviation over the seeds)" in table

    assert robustness_main([str(out / "implicit/seed0"), "--kind", "white", "--strengths", "0,0.5"]) == 0
    assert "white 0.5" in capsys.readouterr().out
    assert compare_main(["--dataset", "nope", "--out", str(tmp_path / "x")]) == 2
    _check_resume(cc, out, saved, data)


def _check_resume(cc, out, saved, data):
    """run_compare(resume=True) over a finished comparison trains and measures nothing and gives the same
    summary; a run whose record is lost is continued from its checkpoint (finished: nothing to train) and
    measured again to the same numbers; other measurement settings measure again but train nothing."""
    calls = {"train": [], "analyse": 0}
    real_train, real_analyse = compare.train_and_evaluate, compare.analyse

    def train(*args, **kw):
        calls["train"].append(kw["resume"])
        return real_train(*args, **kw)

    def analyse(*args, **kw):
        calls["analyse"] += 1
        return real_analyse(*args, **kw)

    compare.train_and_evaluate, compare.analyse = train, analyse
    try:
        again = json.loads(json.dumps(run_compare(cc, out, log=None, resume=True)))
        assert calls == {"train": [], "analyse": 0}
        assert again["runs"] == saved["runs"] and again["aggregate"] == saved["aggregate"]
        assert json.loads((out / "summary.json").read_text())["runs"] == saved["runs"]

        (out / "implicit/seed0/compare.json").unlink()  # e.g. killed after training, before its record
        again = json.loads(json.dumps(run_compare(cc, out, log=None, resume=True)))
        assert calls == {"train": [True], "analyse": 1}
        assert again["runs"]["implicit"][0]["analysis"] == saved["runs"]["implicit"][0]["analysis"]
        implicit, saved_implicit = again["runs"]["implicit"][0], saved["runs"]["implicit"][0]
        assert implicit["summary"]["test_acc"] == saved_implicit["summary"]["test_acc"]

        # the divergence policy says what a later divergence would do: finished runs are reused under another
        calls.update(train=[], analyse=0)
        policy = dataclasses.replace(cc, train={**cc.train, "on_divergence": "rollback", "max_rollbacks": 5})
        assert json.loads(json.dumps(run_compare(policy, out, log=None, resume=True)))["runs"] == again["runs"]
        assert calls == {"train": [], "analyse": 0}

        calls.update(train=[], analyse=0)
        other = dataclasses.replace(cc, lanczos_steps=3, modes=("explicit", "deterministic"))
        again = run_compare(other, out, log=None, resume=True)
        assert calls == {"train": [], "analyse": 2}  # the chosen explicit run and the deterministic one
        assert list(again["runs"]) == ["deterministic", "explicit"]
        assert len(again["runs"]["explicit"][0]["analysis"]["hessian_ritz"]) == 3
        assert again["runs"]["explicit"][0]["lambda_scores"] == saved["runs"]["explicit"][0]["lambda_scores"]

        # a λ whose training diverges is left out of the choice; only a grid that diverged everywhere stops
        def diverging(mcfg, tcfg, *args, **kw):
            if tcfg.reg_weight == 7.0:
                raise TrainingDiverged("the loss or a gradient is NaN/Inf at step 3")
            return real_train(mcfg, tcfg, *args, **kw)

        compare.train_and_evaluate, lines = diverging, []
        again = run_compare(dataclasses.replace(cc, lambdas=(0.5, 1.0, 7.0)), out, log=lines.append, resume=True)
        ex, saved_ex = again["runs"]["explicit"][0], saved["runs"]["explicit"][0]
        assert (ex["lambda"], ex["lambda_scores"]) == (saved_ex["lambda"], saved_ex["lambda_scores"])
        assert ex["lambda_diverged"] == {"7": "the loss or a gradient is NaN/Inf at step 3"}
        assert "[digits] seed 0 explicit λ=7: diverged, left out of the choice of λ (the loss" in "".join(lines)
        assert "Diverged, so left out of the choice: λ = 7 (seed 0)." in (out / "results.md").read_text()
        with pytest.raises(TrainingDiverged, match=r"seed 0: the explicit model diverged for every λ of the grid "
                                                   r"\[7.0\]: λ=7: the loss or a gradient is NaN/Inf at step 3"):
            run_compare(dataclasses.replace(cc, lambdas=(7.0,)), out, log=None, resume=True)
    finally:
        compare.train_and_evaluate, compare.analyse = real_train, real_analyse
    # the command line: a list of modes with spaces parses; a bad mode stops before anything is trained
    parsed = compare_parser().parse_args(["--out", "o", "--modes", "implicit, explicit"])
    assert parsed.modes == ("implicit", "explicit")
    # every training flag sets its TrainConfig field, parsed as the field's type; the others stay unset
    flags = ["--on-divergence", "rollback", "--rollback-lr-factor", "0.25", "--rollback-grad-clip", "2",
             "--max-rollbacks", "4", "--grad-clip", "1", "--lr-decay", "0.5", "--lr-decay-epochs", "3,5"]
    parsed = compare_parser().parse_args(["--out", "o", *flags])
    train = {k.split(".", 1)[1]: v for k, v in vars(parsed).items() if k.startswith("TrainConfig.") and v is not None}
    assert train == dict(on_divergence="rollback", rollback_lr_factor=0.25, rollback_grad_clip=2.0, max_rollbacks=4,
                         grad_clip=1.0, lr_decay=0.5, lr_decay_epochs=(3, 5))
    assert sorted(k.split(".", 1)[1] for k in vars(parsed) if k.startswith("TrainConfig.")) == sorted(COMPARE_TRAIN_FLAGS)
    assert compare_main(["--dataset", "digits", "--out", str(out), "--rollback-lr-factor", "0", "--resume"]) == 2
    assert compare_main(["--dataset", "digits", "--out", str(out), "--modes", "implicit,nope", "--resume"]) == 2
    for bad in (("nope",), (), ("implicit", "implicit"), "implicit"):
        with pytest.raises(ValueError, match=r"CompareConfig\.modes=.*distinct modes out of 'deterministic'"):
            compare.check_compare_config(dataclasses.replace(cc, modes=bad))


@pytest.mark.parametrize("method,num_probes", [("probe", 2), ("probe", 1), ("exact", 1)])
def test_regularizer_in_chunks_is_the_whole_batch_regularizer(method, num_probes):
    """Chunks of 3 of 10 examples (the last one of 1, a padded example among them): every field of the whole
    batch's `Regularizer`, the probes included (rows of the whole draw, from a raw key as `analyse` passes);
    with other probes the two-probe estimates would differ by far more than float32 rounding."""
    import jax
    from flax import nnx

    from nrnn_jax import NoisyRNN, NRNNConfig

    cfg = NRNNConfig(input_dim=2, hidden=6, num_classes=3, dt=0.3, eps_add=0.3, eps_mult=0.3, backend="scan")
    model = NoisyRNN(cfg, rngs=nnx.Rngs(0))
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (10, 7, 2)), np.float32)
    y = np.arange(10, dtype=np.int32) % 3
    mask = np.ones(10, np.float32)
    mask[4] = 0.0
    key = jax.random.PRNGKey(4)
    whole = explicit_regularizer(model, x, y, method=method, num_probes=num_probes, key=key, mask=mask)
    chunked = explicit_regularizer(model, x, y, method=method, num_probes=num_probes, key=key, mask=mask,
                                   batch_size=3)
    for field in whole._fields:
        np.testing.assert_allclose(getattr(chunked, field), getattr(whole, field), rtol=2e-6, atol=1e-7,
                                   err_msg=field)
    if method == "probe":  # other probes give other numbers: the check above can fail
        other = explicit_regularizer(model, x, y, method=method, num_probes=num_probes, key=jax.random.PRNGKey(5))
        assert abs(float(other.value - chunked.value)) > 1e-3 * abs(float(chunked.value))
        assert float(chunked.std_err) > 0
    with pytest.raises(ValueError, match="batch_size.*expected an integer >= 1"):
        explicit_regularizer(model, x, y, method=method, key=key, batch_size=0)


def test_plot_all_leaves_the_backend_alone(tmp_path):
    import matplotlib

    matplotlib.use("svg")  # stands in for a notebook's inline backend
    try:
        curve = {"strengths": [0.0, 0.5], "mean": [0.9, 0.8], "std": [0.0, 0.01]}
        agg = {m: {"curves": {"white": curve}, "c1": {"mean": 0.5, "std": 0.0}} for m in MODES}
        analysis = {"hessian_ritz": [0.1, 1.0], "output_margins": [1.0, 2.0, 0.5], "deepfool_margins": [0.3, 0.4]}
        runs = {m: [{"analysis": analysis}] for m in MODES}
        compare.plot_all({"aggregate": agg, "runs": runs, "settings": {"dataset": "digits"}}, tmp_path)
        assert matplotlib.get_backend() == "svg"
        for name in ("robustness.png", "hessian.png", "margins.png", "stability.png"):
            assert (tmp_path / name).stat().st_size > 0
    finally:
        matplotlib.use("Agg")

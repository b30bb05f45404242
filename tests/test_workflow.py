"""The everyday workflow of the command-line tools: runs that survive a change of directory, resume that
extends a run, configuration files, validated comparisons and help that explains every flag."""

import argparse
import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from nrnn_jax import NRNNConfig, TrainConfig, load_run
from nrnn_jax.cli import (compare_main, compare_parser, from_public_parser, robustness_main, robustness_parser,
                          train_main, train_parser, _progress)
from nrnn_jax.config import FIELD_HELP
from nrnn_jax.data import LOADERS

TINY = ["--dataset", "digits", "--hidden", "16", "--dt", "0.5", "--backend", "scan", "--batch-size", "64",
        "--lr", "0.01", "--eval-white-noise", "", "--no-progress"]


def _write_ecg(directory):
    """Fake UCR ECG5000 files of the real shapes (500 training rows, 4,500 test rows, label then 140 values)."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    for split, n in (("TRAIN", 500), ("TEST", 4500)):
        labels = rng.integers(1, 6, n)
        x = rng.normal(size=(n, 140)) + 0.3 * labels[:, None]
        np.savetxt(directory / f"ECG5000_{split}.tsv", np.column_stack([labels, x]), delimiter="\t", fmt="%.3f")


def _params(run):
    return jax.tree.leaves(nnx.state(load_run(run)))


def _records(run):
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_relative_data_dir_survives_a_change_of_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("NRNN_DATA", raising=False)
    here = tmp_path / "here"
    _write_ecg(here / "data" / "ecg5000")
    monkeypatch.chdir(here)
    ecg = ["--dataset", "ecg5000", "--hidden", "8", "--dt", "0.5", "--backend", "scan", "--batch-size", "250",
           "--eval-white-noise", "", "--no-progress"]
    assert train_main(ecg + ["--epochs", "1", "--data-dir", "data", "--out", "run"]) == 0
    run = (here / "run").resolve()
    assert json.loads((run / "config.json").read_text())["train"]["data_dir"] == str((here / "data").resolve())

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert train_main(["--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    robust = [str(run), "--strengths", "0", "--split", "val"]
    assert robustness_main(robust) == 0
    assert "| ecg5000 |" in capsys.readouterr().out

    # the data moves: --data-dir, then $NRNN_DATA, override the stored directory (which no longer exists)
    moved = tmp_path / "moved"
    (here / "data").rename(moved)
    assert robustness_main(robust) == 2
    err = capsys.readouterr().err
    assert "--data-dir" in err and "$NRNN_DATA" in err
    assert robustness_main(robust + ["--data-dir", str(moved)]) == 0
    monkeypatch.setenv("NRNN_DATA", str(moved))
    assert robustness_main(robust) == 0
    assert train_main(["--resume", str(run), "--epochs", "3", "--no-progress"]) == 0
    monkeypatch.delenv("NRNN_DATA")
    assert train_main(["--resume", str(run), "--epochs", "4", "--no-progress", "--data-dir", "../moved"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["data_dir"] == str(moved.resolve())
    assert [r["epoch"] for r in _records(run)] == [1, 2, 3, 4]


def test_resume_extends_a_finished_run_exactly(tmp_path, capsys):
    # the learning rate decays at epoch 3, inside the extension: the boundary is an epoch, not a fraction
    args = TINY + ["--mode", "implicit", "--eps-add", "0.1", "--eps-mult", "0.1", "--lr-decay-epochs", "3"]
    full, ext = tmp_path / "full", tmp_path / "ext"
    assert train_main(args + ["--epochs", "3", "--out", str(full)]) == 0
    assert train_main(args + ["--epochs", "2", "--out", str(ext)]) == 0
    steps = json.loads((ext / "summary.json").read_text())["steps"]
    time_2 = json.loads((ext / "summary.json").read_text())["train_time_s"]
    capsys.readouterr()

    assert train_main(["--resume", str(ext), "--epochs", "3", "--no-progress"]) == 0
    assert f"resumed at epoch 3, step {steps}" in capsys.readouterr().out
    for a, b in zip(_params(full), _params(ext)):
        np.testing.assert_array_equal(a, b)
    assert _records(full) == _records(ext)
    s_full, s_ext = (json.loads((r / "summary.json").read_text()) for r in (full, ext))
    assert {k: v for k, v in s_full.items() if k != "train_time_s"} == {k: v for k, v in s_ext.items()
                                                                         if k != "train_time_s"}
    assert json.loads((ext / "config.json").read_text())["train"]["epochs"] == 3
    assert s_ext["train_time_s"] > time_2  # accumulated over the two sessions

    # nothing left to train: the recorded training time is kept
    assert train_main(["--resume", str(ext), "--no-progress"]) == 0
    assert "has finished its 3 epochs" in capsys.readouterr().out
    assert json.loads((ext / "summary.json").read_text())["train_time_s"] == s_ext["train_time_s"]

    # a flag that would change the past is refused by name; repeating the run's own value is accepted
    for extra, flag in ((["--lr", "0.5"], "--lr"), (["--hidden", "8"], "--hidden"), (["--sweep-seeds", "0,1"],
                        "--sweep-seeds"), (["--overwrite"], "--overwrite"), (["--out", str(full)], "--out")):
        assert train_main(["--resume", str(ext), "--no-progress", *extra]) == 2
        err = capsys.readouterr().err
        assert flag in err and "refused" in err, extra
    assert train_main(["--resume", str(ext), "--epochs", "2", "--no-progress"]) == 2
    assert "may only grow" in capsys.readouterr().err
    assert train_main(["--resume", str(ext), "--no-progress", "--lr", "0.01", "--eval-batch-size", "100"]) == 0
    assert json.loads((ext / "config.json").read_text())["train"]["eval_batch_size"] == 100


def test_config_file_with_flag_overrides(tmp_path, capsys):
    first = tmp_path / "first"
    assert train_main(TINY + ["--epochs", "1", "--lr", "0.02", "--out", str(first)]) == 0
    saved = json.loads((first / "config.json").read_text())
    # a run's own config.json is a configuration file (its "dataset" description is ignored)
    again = tmp_path / "again"
    assert train_main(["--config", str(first / "config.json"), "--out", str(again), "--no-progress"]) == 0
    copy = json.loads((again / "config.json").read_text())
    assert (copy["model"], copy["train"]) == (saved["model"], saved["train"])
    for a, b in zip(_params(first), _params(again)):
        np.testing.assert_array_equal(a, b)
    # flags beside it override it
    over = tmp_path / "over"
    assert train_main(["--config", str(first / "config.json"), "--hidden", "12", "--out", str(over),
                       "--no-progress"]) == 0
    cfg = json.loads((over / "config.json").read_text())
    assert cfg["model"]["hidden"] == 12 and cfg["train"]["lr"] == 0.02
    # a hand-written file with a sweep; a relative data_dir is relative to the file
    (tmp_path / "cfgs" / "data").mkdir(parents=True)
    (tmp_path / "cfgs" / "exp.json").write_text(json.dumps({
        "model": {"hidden": 8, "dt": 0.5, "backend": "scan", "eps_add": 0.1},
        "train": {"dataset": "digits", "data_dir": "data", "mode": "implicit", "epochs": 1,
                  "eval_white_noise": []},
        "sweep": {"seeds": [0, 1]}}))
    swept = tmp_path / "swept"
    assert train_main(["--config", str(tmp_path / "cfgs" / "exp.json"), "--out", str(swept), "--no-progress"]) == 0
    cfg = json.loads((swept / "config.json").read_text())
    assert cfg["sweep"]["seeds"] == [0, 1] and cfg["train"]["data_dir"] == str((tmp_path / "cfgs" / "data").resolve())
    assert len(json.loads((swept / "summary.json").read_text())["members"]) == 2
    # errors name the problem
    (tmp_path / "bad.json").write_text(json.dumps({"modle": {}}))
    (tmp_path / "bad.yaml").write_text("model:\n  hidden: 8\n")
    (tmp_path / "field.json").write_text(json.dumps({"model": {"hiden": 8}}))
    for name, message in (("bad.json", "unknown key(s) ['modle']"), ("bad.yaml", "only JSON"),
                          ("field.json", "NRNNConfig has no field(s) ['hiden']"), ("none.json", "does not exist")):
        assert train_main(["--config", str(tmp_path / name), "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err, name
    assert train_main(["--resume", str(first), "--config", str(first / "config.json")]) == 2
    assert "--config" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--lambdas", "-1"], "CompareConfig.lambdas="),
    (["--seeds", "-1"], "CompareConfig.seeds="),
    (["--seeds", ""], "CompareConfig.seeds="),
    (["--dataset", "nope"], "CompareConfig.dataset='nope'"),
    (["--epochs", "0"], "CompareConfig.epochs=0"),
    (["--analysis-examples", "0"], "CompareConfig.analysis_examples=0"),
    (["--hidden", "0"], "NRNNConfig.hidden=0"),
    (["--eps-add", "0", "--eps-mult", "0"], "needs noise"),
])
def test_compare_validates_before_training(argv, message, tmp_path, capsys, monkeypatch):
    import nrnn_jax.compare as compare

    def nothing_may_load(*a, **k):
        raise AssertionError("data loaded before validation")

    monkeypatch.setattr(compare, "load_dataset", nothing_may_load)
    out = tmp_path / "cmp"
    assert compare_main(["--dataset", "digits", *argv, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_compare_model_overrides_and_cifar_defaults(tmp_path, monkeypatch):
    import nrnn_jax.compare as compare

    seen = {}

    def fake_run(cc, out, **kw):
        seen["cc"] = cc
        raise ValueError("stop")

    monkeypatch.setattr(compare, "run_compare", fake_run)
    assert compare_main(["--dataset", "digits", "--hidden", "7", "--eps-add", "0.05", "--dt", "0.2",
                         "--out", str(tmp_path / "x")]) == 2
    assert seen["cc"].model == {"hidden": 7, "eps_add": 0.05, "dt": 0.2}
    model = compare.check_compare_config(seen["cc"]).model
    assert (model["hidden"], model["eps_add"], model["dt"], model["eps_mult"]) == (
        7, 0.05, 0.2, compare.DEFAULTS["digits"]["model"]["eps_mult"])
    for name in ("cifar10_rows", "cifar10_pixel", "cifar10_noise_padded"):
        assert name in LOADERS
        compare.check_compare_config(compare.CompareConfig(dataset=name))


@pytest.mark.parametrize("make", [train_parser, compare_parser, robustness_parser, from_public_parser])
def test_every_option_is_described_with_its_default(make):
    parser = make()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help.strip(), action.dest
        if action.option_strings:  # every option states its default (or that it has none)
            assert "default" in action.help, action.option_strings
    dataset = next(a for a in parser._actions if "--dataset" in a.option_strings) if make is not robustness_parser \
        else None
    if dataset is not None:
        from nrnn_jax.compare import DEFAULTS

        names = LOADERS if make in (train_parser, from_public_parser) else DEFAULTS
        assert all(name in dataset.help for name in names)


@pytest.mark.parametrize("make", [train_parser, compare_parser, robustness_parser, from_public_parser])
def test_no_option_states_its_default_twice(make):
    """Each option's help gives its default once (`nrnn-train --help` printed "(default: the data set's)" twice
    for --input-dim and --num-classes)."""
    import re

    for action in make()._actions:
        if action.option_strings and action.help:
            assert len(re.findall(r"\bdefault:", action.help)) <= 1, (action.option_strings, action.help)


def test_train_help_describes_every_cell():
    parser = train_parser()
    assert "Lipschitz RNN" not in parser.description
    assert "--cell" in parser.description and "--cell-factory" in parser.description
    for flag in ("--input-dim", "--num-classes"):
        text = next(a.help for a in parser._actions if flag in a.option_strings)
        assert text.endswith("(default: the data set's)") and text.count("data set's") == 1, flag
    cell = next(a.help for a in parser._actions if "--cell" in a.option_strings)
    assert "--cell-factory" in cell and "Python API" not in cell


def test_one_backend_default_for_every_command():
    """nrnn-train, nrnn-compare (its flag and CompareConfig) and nrnn-from-public build models on the library's
    default backend, NRNNConfig's (diffrax); nrnn-robustness uses each run's own."""
    from nrnn_jax.compare import CompareConfig
    from nrnn_jax.interchange import _public_config

    default = NRNNConfig().backend
    assert default == "diffrax"
    assert CompareConfig().backend == default
    assert compare_parser().parse_args(["--out", "o"]).backend == default
    backend = next(a for a in train_parser()._actions if "--backend" in a.option_strings)
    assert backend.default is None and f"(default: {default})" in backend.help  # unset: NRNNConfig's
    public = _public_config({"input_dim": 1, "n_units": 4, "output_classes": 10}, solver="base", eps=0.1, beta=0.75,
                            gamma_A=0.001, gamma_W=0.001, alpha=1.0, init_std=0.1, add_noise=0.0, mult_noise=0.0,
                            dtype="float32")
    assert public.backend == default


def test_field_help_covers_every_field():
    for cls in (NRNNConfig, TrainConfig):
        assert set(FIELD_HELP[cls.__name__]) == {f.name for f in dataclasses.fields(cls)}


def test_progress_follows_the_terminal(monkeypatch):
    import sys

    for tty in (True, False):
        monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
        assert _progress(train_parser().parse_args([])) is tty
    assert _progress(train_parser().parse_args(["--no-progress"])) is False
    assert _progress(train_parser().parse_args(["--progress"])) is True


def test_robustness_plot_and_dataset_column(tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main(TINY + ["--epochs", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    png = tmp_path / "curve.png"
    assert robustness_main([str(run), "--strengths", "0,0.5", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| run " in out and "| dataset " in out and "| digits |" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

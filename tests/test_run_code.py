"""Opening a run directory runs no code you did not ask for. A run of user code records import paths (a user
cell's factory, a user diffusion); they are imported only when trusted (`trust_code=True`, `--trust-code`) or
typed by the user, and otherwise the objects are passed or a refusal names the paths. Every module written
here records each import of it in a marker file, so "nothing ran" is observed, not assumed."""

import dataclasses
import importlib
import json
import shutil
import sys

import numpy as np
import pytest
from flax import nnx

import nrnn_jax as nj
from nrnn_jax import NRNNConfig, TrainConfig, load_run, load_run_dataset, read_run_config
from nrnn_jax.cli import robustness_main, train_main
from nrnn_jax.config import ImportPath
from nrnn_jax.data import load_dataset
from nrnn_jax.runs import recorded_code

# the module names the tests write (forgotten by sys.modules after each test)
NAMES = ("shared_run", "nrnn_sidefx", "nrnn_usercode", "mycells", "seed0", "nrnn_broken")

USER_CODE = """
import jax
import jax.numpy as jnp
from flax import nnx
import nrnn_jax as nj


class LeakyCell(nj.Cell):
    def __init__(self, cfg, *, rngs):
        d, dtype = cfg.hidden, jnp.dtype(cfg.dtype)
        self.W = nnx.Param(jax.random.normal(rngs.params(), (d, d), dtype) * d ** -0.5)
        self.a = nnx.Param(jnp.zeros(d, dtype))

    def drift(self, h, z):
        return -jax.nn.softplus(self.a[...]) * h + jnp.tanh(self.W[...] @ h + z)


class OtherCell(LeakyCell):
    pass


def sigma(h, z):
    return 0.1 + 0.1 * jnp.tanh(h) ** 2
"""

TINY = ["--dataset", "digits", "--hidden", "8", "--dt", "0.5", "--backend", "scan", "--batch-size", "128",
        "--eval-white-noise", "", "--no-progress"]


@pytest.fixture
def module():
    """`module(path, body)` writes a module whose import appends a line to the marker file it returns."""

    def write(path, body=""):
        marker = path.with_suffix(".imported")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).open('a').write('imported\\n')\n{body}")
        importlib.invalidate_caches()
        return marker

    yield write
    for name in [m for m in sys.modules if m.split(".")[0] in NAMES]:
        del sys.modules[name]


def _imported(*names):
    return [m for m in sys.modules if m.split(".")[0] in names]


def _tiny(data, **model):
    return NRNNConfig(input_dim=data.input_dim, num_classes=data.num_classes, hidden=8, dt=0.5, backend="scan", **model)


def test_a_shared_run_naming_code_runs_none_of_it(tmp_path, monkeypatch, capsys, module):
    """The issue's case: a copied run whose config.json names a payload inside the run directory (found through
    the working directory on the path, as in a notebook next to the results), and one naming an installed module
    with side effects on import. Built-in cells need no consent."""
    data = load_dataset("digits")
    tcfg = TrainConfig(dataset="digits", epochs=1, batch_size=128, eval_white_noise=())
    trained = nj.train_and_evaluate(_tiny(data), tcfg, tmp_path / "trained", data=data, progress=False, log=None)
    x = data.x_test[:16]
    assert recorded_code(tmp_path / "trained") == {}
    np.testing.assert_array_equal(load_run(tmp_path / "trained")(x), trained.model(x))
    assert robustness_main([str(tmp_path / "trained"), "--strengths", "0"]) == 0

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # the working directory on the path, as in a notebook
    monkeypatch.syspath_prepend(str(tmp_path / "site"))  # where an installed module lives
    cases = {}
    for name, field, path in (("shared_run", "cell_factory", "shared_run.payload:Cell"),
                              ("shared_sigma", "model.diffusion", "nrnn_sidefx:sigma")):
        shutil.copytree(tmp_path / "trained", tmp_path / name)
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        if field == "cell_factory":
            cfg["model"]["cell"], cfg["cell_factory"] = "custom", path
            marker = module(tmp_path / name / "payload.py", "class Cell:\n    pass\n")
        else:
            cfg["model"]["noise_kind"], cfg["model"]["diffusion"] = "custom", path
            marker = module(tmp_path / "site" / "nrnn_sidefx.py", "def sigma(h, z):\n    return 0.1 + 0.0 * h\n")
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        cases[name] = field, path, marker
    capsys.readouterr()

    for name, (field, path, marker) in cases.items():
        files = {f: (tmp_path / name / f).read_bytes() for f in ("config.json", "metrics.jsonl", "summary.json")}
        assert recorded_code(name) == {field: path}
        with pytest.raises(ValueError) as refusal:
            load_run(name)
        message = str(refusal.value)
        assert f"{field}={path!r}" in message and "trust_code=True" in message
        assert ("cell=factory" if field == "cell_factory" else "diffusion=sigma") in message
        mcfg, _ = read_run_config(name)  # the configuration, the path kept as text
        if field == "cell_factory":
            assert mcfg.cell == "custom"
        else:
            assert isinstance(mcfg.diffusion, ImportPath) and mcfg.diffusion == path
            assert mcfg.to_dict()["diffusion"] == path
            with pytest.raises(ValueError, match=f"NRNNConfig.diffusion=ImportPath\\('{path}'\\).*not imported"):
                nj.NoisyRNN(mcfg, rngs=nnx.Rngs(0))
        assert load_run_dataset(name).name == "digits"
        assert robustness_main([name, "--strengths", "0"]) == 2
        err = capsys.readouterr().err
        assert path in err and "--trust-code" in err
        assert train_main(["--resume", name, "--epochs", "2", "--no-progress"]) == 2
        err = capsys.readouterr().err
        flag = "--cell-factory" if field == "cell_factory" else "--diffusion"
        assert f"{field}={path!r}" in err and "--trust-code" in err and f"{flag} {path}" in err
        assert not marker.exists() and not _imported("shared_run", "nrnn_sidefx")
        assert {f: (tmp_path / name / f).read_bytes() for f in files} == files  # nothing rewritten

    # consent imports it: the markers do see an import
    field, path, marker = cases["shared_run"]
    with pytest.raises(TypeError, match="Cell\(\) takes no arguments"):  # the payload's Cell is not a factory
        load_run("shared_run", trust_code=True)
    assert marker.read_text() == "imported\n"
    field, path, marker = cases["shared_sigma"]
    np.testing.assert_array_equal(load_run("shared_sigma", trust_code=True)(x), trained.model(x))
    assert marker.read_text() == "imported\n"


def test_passed_trusted_or_typed_user_code_gives_the_trained_model(tmp_path, monkeypatch, capsys, module):
    marker = module(tmp_path / "site" / "nrnn_usercode.py", USER_CODE)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    user = importlib.import_module("nrnn_usercode")
    data = load_dataset("digits")
    tcfg = TrainConfig(dataset="digits", mode="implicit", epochs=1, batch_size=128, eval_white_noise=())
    run = tmp_path / "run"
    trained = nj.train_and_evaluate(_tiny(data, noise_kind="custom", diffusion=user.sigma), tcfg, run, data=data,
                                    progress=False, log=None, cell=user.LeakyCell)
    x = data.x_test[:16]
    before = np.asarray(trained.model(x))
    code = {"cell_factory": "nrnn_usercode:LeakyCell", "model.diffusion": "nrnn_usercode:sigma"}
    assert recorded_code(run) == code
    del sys.modules["nrnn_usercode"]  # as in a new process: not imported yet
    marker.unlink()
    capsys.readouterr()

    # neither passed nor trusted: refused, naming both paths; the configuration reads as data
    mcfg, _ = read_run_config(run)
    assert mcfg.cell == code["cell_factory"] and mcfg.diffusion == code["model.diffusion"]
    with pytest.raises(ValueError) as refusal:
        load_run(run)
    assert all(f"{f}={p!r}" in str(refusal.value) for f, p in code.items())
    with pytest.raises(ValueError, match="diffusion='nrnn_usercode:sigma'") as refusal:
        load_run(run, cell=user.LeakyCell)  # what is passed is used; what is not is still refused
    assert "cell_factory" not in str(refusal.value)
    assert robustness_main([str(run), "--strengths", "0"]) == 2
    err = capsys.readouterr().err
    assert all(p in err for p in code.values())
    assert train_main(["--resume", str(run), "--epochs", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--cell-factory nrnn_usercode:LeakyCell, --diffusion nrnn_usercode:sigma" in err and "--trust-code" in err
    assert not marker.exists() and not _imported("nrnn_usercode")

    # passed as objects: the trained model, nothing imported
    np.testing.assert_array_equal(load_run(run, cell=user.LeakyCell, diffusion=user.sigma)(x), before)
    assert read_run_config(run, diffusion=user.sigma)[0].diffusion is user.sigma
    assert not marker.exists()

    # trusted: imported once, the trained model
    np.testing.assert_array_equal(load_run(run, trust_code=True)(x), before)
    assert marker.read_text() == "imported\n"
    assert read_run_config(run, trust_code=True)[0].diffusion is sys.modules["nrnn_usercode"].sigma
    assert robustness_main([str(run), "--strengths", "0", "--trust-code"]) == 0
    assert train_main(["--resume", str(run), "--epochs", "2", "--no-progress", "--trust-code"]) == 0
    # typed on the command line: the run's own paths resume it, another is refused by name
    assert train_main(["--resume", str(run), "--epochs", "3", "--no-progress", "--cell-factory",
                       "nrnn_usercode:LeakyCell", "--diffusion", "nrnn_usercode:sigma"]) == 0
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    capsys.readouterr()
    assert train_main(["--resume", str(run), "--epochs", "4", "--no-progress", "--trust-code", "--cell-factory",
                       "nrnn_usercode:OtherCell"]) == 2
    err = capsys.readouterr().err
    assert "refused: --cell-factory='nrnn_usercode:OtherCell'" in err and "nrnn_usercode:LeakyCell" in err


def test_the_current_directory_serves_only_typed_code(tmp_path, monkeypatch, capsys, module):
    """`--cell-factory` finds a module in the current directory; the same path read back from the run does not
    (even trusted), so a module placed next to a run is not picked up from it."""
    work = tmp_path / "work"
    marker = module(work / "mycells.py", USER_CODE)
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(work))])
    run = tmp_path / "run"
    assert train_main(TINY + ["--cell-factory", "mycells:LeakyCell", "--epochs", "1", "--out", str(run)]) == 0
    assert str(work) not in sys.path  # only for that import
    assert recorded_code(run) == {"cell_factory": "mycells:LeakyCell"}
    del sys.modules["mycells"]
    capsys.readouterr()
    assert train_main(["--resume", str(run), "--epochs", "2", "--no-progress", "--trust-code"]) == 2
    assert "cannot be imported from here" in capsys.readouterr().err
    assert marker.read_text() == "imported\n"  # the typed import only
    assert train_main(["--resume", str(run), "--epochs", "2", "--no-progress", "--cell-factory",
                       "mycells:LeakyCell"]) == 0


def test_a_configuration_file_naming_code_needs_consent(tmp_path, monkeypatch, capsys, module):
    marker = module(tmp_path / "site" / "nrnn_sidefx.py", "def sigma(h, z):\n    return 0.1 + 0.0 * h\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    file = tmp_path / "exp.json"
    file.write_text(json.dumps({
        "model": {"hidden": 8, "dt": 0.5, "backend": "scan", "noise_kind": "custom", "diffusion": "nrnn_sidefx:sigma"},
        "train": {"dataset": "digits", "mode": "implicit", "epochs": 1, "batch_size": 128, "eval_white_noise": []}}))
    out = tmp_path / "out"
    assert train_main(["--config", str(file), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "model.diffusion='nrnn_sidefx:sigma'" in err and "--diffusion nrnn_sidefx:sigma" in err
    assert "--trust-code" in err
    assert not marker.exists() and not out.exists() and not _imported("nrnn_sidefx")
    assert train_main(["--config", str(file), "--out", str(out), "--no-progress", "--trust-code"]) == 0
    assert marker.read_text() == "imported\n"
    assert json.loads((out / "config.json").read_text())["model"]["diffusion"] == "nrnn_sidefx:sigma"


def test_compare_resume_imports_nothing_a_run_names(tmp_path, monkeypatch, module):
    from nrnn_jax.compare import CompareConfig, run_compare

    cc = CompareConfig(dataset="digits", seeds=(0,), epochs=1, modes=("deterministic",), analysis_examples=8,
                       lanczos_steps=2, hutchinson_samples=2, lyapunov_time=1.0, curve_examples=20,
                       model={"hidden": 8})
    out = tmp_path / "cmp"
    run_compare(cc, out, log=None)
    run = out / "deterministic" / "seed0"
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"]["cell"], cfg["cell_factory"] = "custom", "seed0.payload:Cell"
    (run / "config.json").write_text(json.dumps(cfg))
    marker = module(run / "payload.py", "class Cell:\n    pass\n")
    monkeypatch.syspath_prepend(str(run.parent))
    # new measurement settings: the reused run is loaded again, with the comparison's own configuration
    with pytest.raises(ValueError, match="cell_factory='seed0.payload:Cell'"):
        run_compare(dataclasses.replace(cc, curve_examples=10), out, log=None, resume=True)
    assert not marker.exists() and not _imported("seed0")



@pytest.mark.parametrize("typed,names", [
    ("mycells:LeakyCel", ["module 'mycells'", "mycells.py", "no attribute 'LeakyCel'", "'LeakyCell'"]),
    ("mycels:LeakyCell", ["no module named 'mycels'", "the current directory {work}"]),
    ("nrnn_broken:Cell", ["importing module 'nrnn_broken' failed", "No module named 'nrnn_missing_dependency'"]),
    ("mycells:LeakyCell.nope", ["mycells:LeakyCell has no attribute 'nope'"]),
    ("mycells", ["expected an import path 'module:name'"]),
])
def test_a_typed_path_that_fails_to_import_names_what_is_missing(typed, names, tmp_path, monkeypatch, capsys, module):
    """`--cell-factory` (nrnn-train, nrnn-compare) and `--diffusion` (nrnn-compare): the error names the flag and
    the module or attribute that is missing, not notebooks, before anything is loaded or written."""
    import nrnn_jax.compare as compare
    from nrnn_jax.cli import compare_main

    work = tmp_path / "work"
    module(work / "mycells.py", USER_CODE)
    module(work / "nrnn_broken.py", "import nrnn_missing_dependency\n")
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(work))])

    def nothing_may_load(*a, **k):
        raise AssertionError("data loaded before the typed code was imported")

    monkeypatch.setattr(compare, "load_dataset", nothing_may_load)
    out = tmp_path / "out"
    calls = [("nrnn-train", "--cell-factory", lambda: train_main(TINY + ["--cell-factory", typed, "--out", str(out)])),
             ("nrnn-compare", "--cell-factory",
              lambda: compare_main(["--dataset", "digits", "--cell-factory", typed, "--out", str(out)])),
             ("nrnn-compare", "--diffusion",
              lambda: compare_main(["--dataset", "digits", "--noise-kind", "custom", "--eps-add", "0", "--eps-mult",
                                    "0", "--diffusion", typed, "--out", str(out)]))]
    for program, flag, call in calls:
        capsys.readouterr()
        assert call() == 2
        err = capsys.readouterr().err
        assert err.startswith(f"{program}: error: {flag}={typed!r} is invalid: this user code cannot be imported"), err
        for name in names:
            assert name.format(work=work) in err, (flag, name, err)
        assert "notebook" not in err and not out.exists()
    assert str(work) not in sys.path


def test_compare_trains_a_user_cell_and_resumes_with_it(tmp_path, monkeypatch, capsys, module):
    """`CompareConfig(cell_factory=...)` trains the user cell in every mode; the runs record its path, and
    `resume=True` reuses them, loaded with the factory given (nothing recorded is imported). `nrnn-compare
    --cell-factory` imports it from the current directory."""
    from nrnn_jax import compare
    from nrnn_jax.cli import compare_main
    from nrnn_jax.compare import CompareConfig, run_compare

    work = tmp_path / "work"
    marker = module(work / "mycells.py", USER_CODE)
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(work))])

    # the command line: the factory imported from the current directory reaches CompareConfig
    seen = []

    def fake_run(cc, out, resume):
        seen.append(cc)
        raise ValueError("stop")

    monkeypatch.setattr(compare, "run_compare", fake_run)
    assert compare_main(["--dataset", "digits", "--cell-factory", "mycells:LeakyCell", "--out", str(tmp_path / "o")]) == 2
    cell, other = sys.modules["mycells"].LeakyCell, sys.modules["mycells"].OtherCell
    assert seen[0].cell_factory is cell and str(work) not in sys.path
    # a built-in cell beside it is refused before anything is loaded
    assert compare_main(["--dataset", "digits", "--cell-factory", "mycells:LeakyCell", "--cell", "gru",
                         "--out", str(tmp_path / "o")]) == 2
    assert "CompareConfig.model=" in capsys.readouterr().err and len(seen) == 1
    monkeypatch.undo()
    monkeypatch.chdir(work)

    cc = CompareConfig(dataset="digits", seeds=(0,), epochs=1, modes=("implicit",), analysis_examples=8,
                       lanczos_steps=2, hutchinson_samples=2, lyapunov_time=1.0, curve_examples=20,
                       model={"hidden": 8}, cell_factory=cell, backend="scan")
    out = tmp_path / "cmp"
    summary = run_compare(cc, out, log=None)
    run = out / "implicit" / "seed0"
    assert recorded_code(run) == {"cell_factory": "mycells:LeakyCell"}
    assert summary["settings"]["cell_factory"] == "mycells:LeakyCell"
    assert summary["settings"]["model"]["cell"] == "mycells:LeakyCell"
    assert summary["runs"]["implicit"][0]["analysis"]["c1"] is None  # the certificate is the Lipschitz cell's
    model = load_run(run, cell=cell)
    assert isinstance(model.cell, cell)
    data = load_dataset("digits")
    assert nj.evaluate(model, data.x_test, data.y_test)["acc"] == summary["runs"]["implicit"][0]["summary"]["test_acc"]

    # resumed with new measurement settings: the run is reused (not trained), loaded with the given factory
    del sys.modules["mycells"]
    marker.unlink()

    class Retrained(Exception):
        pass

    def no_training(*a, **k):
        raise Retrained

    monkeypatch.setattr(compare, "train_and_evaluate", no_training)
    again = run_compare(dataclasses.replace(cc, lanczos_steps=3), out, log=None, resume=True)
    assert len(again["runs"]["implicit"][0]["analysis"]["hessian_ritz"]) == 3
    assert not marker.exists() and not _imported("mycells")
    # another factory makes other runs: the recorded one is not reused
    with pytest.raises(Retrained):
        run_compare(dataclasses.replace(cc, cell_factory=other), out, log=None, resume=True)

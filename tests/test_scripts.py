"""The repository's scripts: product scripts in scripts/, benchmarks in the `benchmarks` package, run as
`python -m benchmarks.NAME` from the repository root. Every script or benchmark a file names exists, and none
of them reaches another through `sys.path`."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__")
# the files that name scripts and benchmarks: documentation, build files, the scripts themselves, the library
NAMING = ([ROOT / "README.md", ROOT / "Makefile", ROOT / "CHANGELOG.md"] + sorted((ROOT / "docs").rglob("*.md"))
          + sorted((ROOT / "scripts").iterdir()) + sorted((ROOT / "benchmarks").glob("*.py"))
          + sorted((ROOT / "src").rglob("*.py")))


def test_the_benchmarks_are_a_package_of_the_rerun_scripts():
    assert (ROOT / "benchmarks" / "__init__.py").exists()
    assert BENCHMARKS == ["analysis_memory", "benchmark", "benchmark_torch", "cell_costs", "compare_revisions",
                          "explicit_cost", "same_numbers", "same_program", "step_breakdown", "stress_data_parallel",
                          "sweep_throughput"]
    assert sorted(p.name for p in (ROOT / "scripts").iterdir()) == ["architectures_table.py", "demo.py",
                                                                    "gpu_benchmark.sh", "gpu_paper.sh",
                                                                    "make_notebooks.py", "publish_comparison.py"]


def test_every_named_script_and_benchmark_exists():
    named = []
    for path in NAMING:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "in the git history" in line:  # a removed experiment, named where its finding is recorded
                continue
            for rel in re.findall(r"(?<![\w/.])((?:scripts|benchmarks)/[\w./-]*\w\.(?:py|sh))", line):
                named.append((path.name, number, rel, (ROOT / rel).is_file()))
            for name in re.findall(r"python -m benchmarks\.([a-z_]\w*)", line):  # not the placeholder NAME
                named.append((path.name, number, f"benchmarks.{name}", name in BENCHMARKS))
            assert not re.search(r"python3? scripts/(?!demo|make_notebooks|publish_comparison|architectures_table)", line), (path.name, number, line)
    assert len(named) > 20
    assert [n for n in named if not n[3]] == []


def test_no_script_reaches_another_through_sys_path():
    for path in sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "scripts").glob("*.py")):
        tree = ast.parse(path.read_text())
        touched = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "path"
                   and isinstance(node.value, ast.Name) and node.value.id == "sys"]
        assert touched == [], (path.name, touched)


def test_every_benchmark_runs_as_a_module():
    """`python -m benchmarks.NAME --help` for each, in one fresh process at the repository root: the package
    imports the library and its own modules."""
    code = ("import runpy, sys\n"
            "for name in sys.argv[1:]:\n"
            "    sys.argv = ['benchmarks.' + name, '--help']\n"
            "    try:\n"
            "        runpy.run_module('benchmarks.' + name, run_name='__main__', alter_sys=True)\n"
            "    except SystemExit as e:\n"
            "        assert e.code in (0, None), (name, e.code)\n"
            "    print('ran', name, flush=True)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", code, *BENCHMARKS], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [line for line in done.stdout.splitlines() if line.startswith("ran ")] == [f"ran {n}" for n in BENCHMARKS]
    assert done.stdout.count("usage:") == len(BENCHMARKS)

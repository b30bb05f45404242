"""The code blocks of the README and of the documentation's pages run as written: every ```python block of
a page, in order, in one namespace per page, in a temporary working directory (run directories land there);
and every ```bash block preceded by a line `<!-- run-test -->`, in a shell with this interpreter's scripts
(nrnn-train, ...) first on PATH. Other shell blocks need data files, a GPU, PyTorch or a long run.

A Python block preceded by a line `<!-- skip-test: reason -->` is not run (for blocks that need data files or
a GPU; keep them few)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
# Pages whose Python blocks are the library's usage: the getting-started page and the user guide. Every other
# page holds no Python block (checked below), so that no example goes untested, except these:
GUIDE = [DOCS / "getting-started.md", *sorted((DOCS / "guide").glob("*.md"))]
NOT_RUN = {"xla_cpu_all_reduce.md": "a plain-JAX reproducer of an XLA:CPU hang, not library usage"}
SKIP = re.compile(r"<!--\s*skip-test\b.*-->")
RUN = re.compile(r"<!--\s*run-test\s*-->")


def code_blocks(text: str, language: str, marker: re.Pattern) -> list[tuple[int, str, bool]]:
    """(first line number, code, marked) of each ```language block, in order; marked: the nearest non-blank
    line before the block matches `marker`."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == "```" + language:
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            blocks.append((start + 1, "\n".join(lines[start:end]) + "\n", bool(marker.fullmatch(before.strip()))))
            i = end
        i += 1
    return blocks


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """(first line number, code, skipped) of each ```python block, in order."""
    return code_blocks(text, "python", SKIP)


def command_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, script) of each ```bash block marked `<!-- run-test -->`, in order."""
    return [(line, code) for line, code, run in code_blocks(text, "bash", RUN) if run]


def run_blocks(path: Path, tmp_path: Path, monkeypatch) -> int:
    """Run the page's unskipped blocks in order in one namespace in `tmp_path`; the number run."""
    run = [b for b in python_blocks(path.read_text()) if not b[2]]
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    for line, code, _ in run:
        try:
            exec(compile(code, f"{name}:{line}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"the Python block at {name}:{line} failed: {e!r}") from e
    return len(run)


def test_block_extraction():
    text = "a\n```python\nx = 1\n```\n<!-- skip-test: needs data -->\n\n```python\nraise SystemExit\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n", False), (8, "raise SystemExit\n", True)]
    assert command_blocks(text) == []
    assert command_blocks("<!-- run-test -->\n```bash\nls\n```\n```bash\nrm x\n```\n") == [(3, "ls\n")]


def run_commands(path: Path, tmp_path: Path) -> int:
    """Run the page's marked shell blocks in order in `tmp_path`, this interpreter's scripts first on PATH;
    the number run."""
    scripts = Path(sys.executable).parent
    blocks = command_blocks(path.read_text())
    env = {**os.environ, "PATH": f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}"}
    for line, script in blocks:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, (f"the shell block at {path.name}:{line} failed ({done.returncode}):\n"
                                      f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return len(blocks)


def test_failing_block_is_reported(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("```python\nx = 1\n```\n\n```python\nassert x == 2\n```\n")
    with pytest.raises(AssertionError, match=r"page\.md:6 failed"):
        run_blocks(page, tmp_path, monkeypatch)
    page.write_text("<!-- run-test -->\n```bash\ntrue\n```\n<!-- run-test -->\n```bash\necho oops; exit 3\n```\n")
    with pytest.raises(AssertionError, match=r"(?s)page\.md:7 failed \(3\).*oops"):
        run_commands(page, tmp_path)


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 4 and sum(b[2] for b in blocks) <= 1  # skipped blocks stay few
    run_blocks(README, tmp_path, monkeypatch)


def test_readme_command_blocks_run(tmp_path):
    if not (Path(sys.executable).parent / "nrnn-train").exists():
        raise AssertionError(f"the command-line programs are not installed beside {sys.executable}: pip install -e .")
    assert run_commands(README, tmp_path) >= 1


@pytest.mark.parametrize("page", GUIDE, ids=lambda p: str(p.relative_to(DOCS)))
def test_guide_python_blocks_run(page, tmp_path, monkeypatch):
    assert run_blocks(page, tmp_path, monkeypatch) >= 1


def test_guide_pages_exist_and_other_pages_hold_no_python():
    assert len(GUIDE) >= 10 and all(p.exists() for p in GUIDE)
    others = [p for p in DOCS.rglob("*.md") if p not in GUIDE and str(p.relative_to(DOCS)) not in NOT_RUN]
    assert [str(p.relative_to(DOCS)) for p in others if python_blocks(p.read_text())] == []

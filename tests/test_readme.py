"""The README's Python code blocks run as written: every ```python block, in order, in one namespace, in a
temporary working directory (run directories land there).

A block preceded by a line `<!-- skip-test: reason -->` is not run (for blocks that need data files or a GPU;
keep them few)."""

import re
from pathlib import Path


README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = re.compile(r"<!--\s*skip-test\b.*-->")


def python_blocks(text: str) -> list[tuple[int, str, bool]]:
    """(first line number, code, skipped) of each ```python block, in order."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            blocks.append((start + 1, "\n".join(lines[start:end]) + "\n", bool(SKIP.fullmatch(before.strip()))))
            i = end
        i += 1
    return blocks


def test_block_extraction():
    text = "a\n```python\nx = 1\n```\n<!-- skip-test: needs data -->\n\n```python\nraise SystemExit\n```\n```bash\nls\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n", False), (8, "raise SystemExit\n", True)]


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = python_blocks(README.read_text())
    run = [b for b in blocks if not b[2]]
    assert len(run) >= 5 and len(blocks) - len(run) <= 2  # skipped blocks stay few
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    for line, code, _ in run:
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"the README's Python block at line {line} failed: {e!r}") from e

"""The one Markdown table writer (command-line output, `nrnn-compare`'s results.md, the demo)."""

from __future__ import annotations


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of `rows` (dicts) in the order of `columns`; floats are shown with 4 decimals, other
    values (e.g. pre-formatted strings) as `str`, missing ones as empty cells."""
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)

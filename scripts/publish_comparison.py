"""Copy an `nrnn-compare` output folder into docs/results: summary.json without the per-example margin
arrays (their medians stay), results.md and the plots; the run directories stay behind.

    python scripts/publish_comparison.py runs/compare-ecg5000-tanh docs/results/ecg5000_tanh
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

PER_EXAMPLE = ("output_margins", "deepfool_margins")
FILES = ("results.md", "robustness.png", "hessian.png", "margins.png", "stability.png")


def publish(src: Path, dst: Path) -> None:
    summary = json.loads((src / "summary.json").read_text())
    for runs in summary["runs"].values():
        for run in runs:
            for name in PER_EXAMPLE:
                run.get("analysis", {}).pop(name, None)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for name in FILES:
        shutil.copyfile(src / name, dst / name)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    publish(Path(sys.argv[1]), Path(sys.argv[2]))

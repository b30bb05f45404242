"""Whether this checkout's compiled train step is the same XLA program as another revision's.

    python -m benchmarks.same_program --rev main --shape ecg

(from the repository root, with `PYTHONPATH=src`.) Builds the train step of each variant of
`benchmarks.compare_revisions` in both versions (the other imported under another name, in the same
process), lowers it for the same arguments and compares the optimized HLO text with source locations and
metadata removed. The same program does the same work, so its step time can differ only by noise.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.benchmark import SHAPES
from benchmarks.compare_revisions import VARIANTS, import_revision, train_step


def program(nj, shape: dict, backend: str, mode: str, method: str) -> str:
    step, state = train_step(nj, shape, backend, mode, method)
    x = np.zeros((shape["batch"], shape["T"], shape["input_dim"]), np.float32)
    y = np.zeros(shape["batch"], np.int32)
    mask = np.ones(shape["batch"], np.float32)
    text = step.lower(state, x, y, mask).compile().as_text()
    text = re.sub(r", metadata=\{[^}]*\}", "", text)
    text = re.sub(r"^HloModule [^\n]*", "", text)
    # the tables of source files, functions and stack frames the metadata pointed into
    keep = [line for line in text.splitlines() if not re.match(r'^\s*(\d+ ["{]|FileNames|FunctionNames|'
                                                                  r'FileLocations|StackFrames)', line)]
    return "\n".join(keep)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="main")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="ecg")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args(argv)
    import nrnn_jax as this

    differ = 0
    with tempfile.TemporaryDirectory() as tmp:
        other = import_revision(args.rev, Path(tmp))
        for name in args.variants.split(","):
            a, b = (program(nj, SHAPES[args.shape], *VARIANTS[name]) for nj in (this, other))
            same = a == b
            differ += not same
            print(f"{name}: {'same program' if same else 'DIFFERENT program'} ({len(a.splitlines())} vs "
                  f"{len(b.splitlines())} lines of optimized HLO)", flush=True)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())

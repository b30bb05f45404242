#!/usr/bin/env bash
# The train-step benchmark (benchmarks/benchmark.py) on an accelerator, prepared to run in a few minutes:
# the paper's pixel-MNIST shape and the ECG5000 shape, every variant, JSON figures under ${OUT:-.}.
#   bash scripts/gpu_benchmark.sh            # uses the active environment (jax[cuda], optional torch)
set -euo pipefail
OUT="${OUT:-.}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# the benchmarks package and the library of this checkout
export PYTHONPATH="$ROOT:$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
python -c "import jax; print('devices:', jax.devices())"
python -m benchmarks.benchmark --shape paper --repeats 11 --variants torch,scan,diffrax,probe --json "$OUT/benchmark_paper.json"
python -m benchmarks.benchmark --shape ecg --repeats 21 --variants torch,scan,scan-autodiff,diffrax,diffrax-autodiff,probe,sweep --json "$OUT/benchmark_ecg.json"

#!/usr/bin/env bash
# The shortened pixel-MNIST protocol of the paper's comparison on one GPU: deterministic, implicit (noise
# injection) and explicit (probe) models on ordered pixel MNIST with the `nrnn-small` preset (the public code's
# Noisy RNN run: its own convention, δ = 0.01, ε = 0.02 / 0.02, Adam 1e-3, batch 128), one seed, EPOCHS epochs
# with the learning rate × 0.1 at epoch DECAY (the public runs: 100 epochs, decay at 90), divergence handled by
# rollback, robustness curves on the whole test split (white noise 0.1–0.4, salt and pepper 0.05–0.2) and the
# heavy analyses (Lanczos, DeepFool) on ANALYSIS examples.
#
# Writes the usual nrnn-compare layout into OUT (summary.json, results.md, plots, run directories) and
# OUT/README.md with the command, the device and the wall time. It resumes: killed (or cut off by a time
# limit), the same command continues every run from its checkpoint and reuses what was measured, and MODES
# (default: all three) lets separate sessions train one mode each into the same OUT before a last call over
# all modes gathers them. Measured on an H100 (docs/results/mnist_pixel/README.md): about 7 s per implicit
# epoch alone; three processes sharing the one GPU time-slice it (22.7 s per epoch each), so the modes run
# one after the other here.
#
#   NRNN_DATA=data/ OUT=docs/results/mnist_pixel bash scripts/gpu_paper.sh
#
# ARCHIVE=FILE also writes the run directories (checkpoints included) into one .tgz, to carry them between
# sessions. The MNIST IDX files must be in $NRNN_DATA (or $NRNN_DATA/mnist). For a quick check of the script on a
# CPU: DATASET=digits PRESET= EPOCHS=1 DECAY=1 ANALYSIS=16 OUT=/tmp/gpu_paper_check bash scripts/gpu_paper.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATASET=${DATASET-mnist_pixel}
PRESET=${PRESET-nrnn-small}
EPOCHS=${EPOCHS-15}
DECAY=${DECAY-13}
ANALYSIS=${ANALYSIS-128}
SEEDS=${SEEDS-1}
MODES=${MODES-deterministic,implicit,explicit}
OUT=${OUT-docs/results/mnist_pixel}
PYTHON=${PYTHON-python}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"

start=$(date +%s)
"$PYTHON" - "$DATASET" "$PRESET" "$EPOCHS" "$DECAY" "$ANALYSIS" "$SEEDS" "$OUT" "$MODES" <<'EOF'
import importlib.util
import os
import sys
from pathlib import Path

from nrnn_jax.compare import CompareConfig, run_compare

dataset, preset, epochs, decay, analysis, seeds, out, modes = sys.argv[1:]
train = {"lr_decay_epochs": (int(decay),), "on_divergence": "rollback",
         # TensorBoard event files need tensorboardX; a bare accelerator image may lack it (metrics.jsonl has all)
         "tensorboard": importlib.util.find_spec("tensorboardX") is not None}
cc = CompareConfig(dataset=dataset, data_dir=os.environ.get("NRNN_DATA"), preset=preset or None,
                   seeds=tuple(int(s) for s in seeds.split(",")), epochs=int(epochs), modes=tuple(modes.split(",")),
                   analysis_examples=int(analysis), lanczos_steps=12, hutchinson_samples=10, lyapunov_time=20.0,
                   train=train)
summary = run_compare(cc, Path(out), resume=True)
print(f"comparison ({modes}) written to {out} ({summary['time_s']:.0f} s)", flush=True)
EOF
end=$(date +%s)

device=$("$PYTHON" -c "import jax; d = jax.devices()[0]; print(d.platform, getattr(d, 'device_kind', ''))")
cat > "$OUT/README.md" <<EOF
# ${DATASET}: the shortened protocol (scripts/gpu_paper.sh)

Command: \`DATASET=${DATASET} PRESET=${PRESET} EPOCHS=${EPOCHS} DECAY=${DECAY} ANALYSIS=${ANALYSIS} SEEDS=${SEEDS} MODES=${MODES} bash scripts/gpu_paper.sh\`

Device: ${device}. Wall time of this call: $((end - start)) s (training what was left, evaluation and analyses).
Date: $(date -u +%Y-%m-%d).

The table is results.md; everything measured is in summary.json.
EOF
echo "wall time $((end - start)) s on ${device}"
if [ -n "${ARCHIVE-}" ]; then
  # the run directories as one file (a device that returns files only down to a limited depth keeps them;
  # unpack into OUT to resume there: tar xzf ARCHIVE -C OUT)
  tar czf "$ARCHIVE" -C "$OUT" $(cd "$OUT" && ls -d deterministic implicit explicit 2>/dev/null)
  echo "run directories archived in $ARCHIVE"
fi

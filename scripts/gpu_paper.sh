#!/usr/bin/env bash
# The shortened pixel-MNIST protocol of the paper's comparison, sized for one GPU run of under 9 minutes on
# one H100: deterministic, implicit (noise injection) and explicit (probe) models on ordered pixel MNIST with
# the `nrnn-small` preset (the public code's Noisy RNN run: its own convention, δ = 0.01, ε = 0.02 / 0.02,
# Adam 1e-3, batch 128), one seed, EPOCHS epochs with the learning rate × 0.1 at epoch DECAY (the public runs:
# 100 epochs, decay at 90), divergence handled by rollback, robustness curves on the whole test split (white
# noise 0.1–0.4, salt and pepper 0.05–0.2) and the heavy analyses (Lanczos, DeepFool) on ANALYSIS examples.
# Writes the usual nrnn-compare layout into OUT (summary.json, results.md, plots, run directories) and
# OUT/README.md with the command, the device and the wall time.
#
#   NRNN_DATA=data/ OUT=docs/results/mnist_pixel bash scripts/gpu_paper.sh
#
# The MNIST IDX files must be in $NRNN_DATA (or $NRNN_DATA/mnist). For a quick check of the script on a
# CPU: DATASET=digits PRESET= EPOCHS=1 DECAY=1 ANALYSIS=16 OUT=/tmp/gpu_paper_check bash scripts/gpu_paper.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATASET=${DATASET-mnist_pixel}
PRESET=${PRESET-nrnn-small}
EPOCHS=${EPOCHS-15}
DECAY=${DECAY-13}
ANALYSIS=${ANALYSIS-128}
SEEDS=${SEEDS-1}
OUT=${OUT-docs/results/mnist_pixel}
PYTHON=${PYTHON-python}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}

start=$(date +%s)
"$PYTHON" - "$DATASET" "$PRESET" "$EPOCHS" "$DECAY" "$ANALYSIS" "$SEEDS" "$OUT" <<'EOF'
import os
import sys
from pathlib import Path

from nrnn_jax.compare import CompareConfig, run_compare

dataset, preset, epochs, decay, analysis, seeds, out = sys.argv[1:]
cc = CompareConfig(dataset=dataset, data_dir=os.environ.get("NRNN_DATA"), preset=preset or None,
                   seeds=tuple(int(s) for s in seeds.split(",")), epochs=int(epochs),
                   analysis_examples=int(analysis), lanczos_steps=12, hutchinson_samples=10, lyapunov_time=20.0,
                   train={"lr_decay_epochs": (int(decay),), "on_divergence": "rollback"})
summary = run_compare(cc, Path(out))
print(f"comparison written to {out} ({summary['time_s']:.0f} s)")
EOF
end=$(date +%s)

device=$("$PYTHON" -c "import jax; d = jax.devices()[0]; print(d.platform, getattr(d, 'device_kind', ''))")
cat > "$OUT/README.md" <<EOF
# ${DATASET}: the shortened protocol (scripts/gpu_paper.sh)

Command: \`DATASET=${DATASET} PRESET=${PRESET} EPOCHS=${EPOCHS} DECAY=${DECAY} ANALYSIS=${ANALYSIS} SEEDS=${SEEDS} bash scripts/gpu_paper.sh\`

Device: ${device}. Wall time: $((end - start)) s (training, evaluation and analyses). Date: $(date -u +%Y-%m-%d).

The table is results.md; everything measured is in summary.json.
EOF
echo "wall time $((end - start)) s on ${device}"

#!/usr/bin/env bash
# The shortened pixel-MNIST protocol of the paper's comparison, sized for one GPU run of under 9 minutes on
# one H100: deterministic, implicit (noise injection) and explicit (probe) models on ordered pixel MNIST with
# the `nrnn-small` preset (the public code's Noisy RNN run: its own convention, δ = 0.01, ε = 0.02 / 0.02,
# Adam 1e-3, batch 128), one seed, EPOCHS epochs with the learning rate × 0.1 at epoch DECAY (the public runs:
# 100 epochs, decay at 90), divergence handled by rollback, robustness curves on the whole test split (white
# noise 0.1–0.4, salt and pepper 0.05–0.2) and the heavy analyses (Lanczos, DeepFool) on ANALYSIS examples.
#
# With PARALLEL=1 (the default) the three modes train and are measured at the same time, one process each on
# the one device (a train step at this shape leaves most of a GPU idle), and a last `resume` call over all
# modes gathers them into the usual nrnn-compare layout without training or measuring anything again:
# OUT/summary.json, results.md, plots, run directories, logs/ (each process's output), and OUT/README.md with
# the command, the device and the wall time. Killed, the same command continues where it stopped.
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
PARALLEL=${PARALLEL-1}
OUT=${OUT-docs/results/mnist_pixel}
PYTHON=${PYTHON-python}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT/logs"

compare() {  # compare MODES: train and measure those modes into $OUT (resuming what is there)
  "$PYTHON" - "$DATASET" "$PRESET" "$EPOCHS" "$DECAY" "$ANALYSIS" "$SEEDS" "$OUT" "$1" <<'EOF'
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
print(f"{modes}: written to {out} ({summary['time_s']:.0f} s)", flush=True)
EOF
}

start=$(date +%s)
if [ "$PARALLEL" = 1 ]; then
  # each process takes a third of the device's memory instead of JAX's default 75 %
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION-0.3}
  pids=()
  for mode in deterministic implicit explicit; do
    compare "$mode" > "$OUT/logs/$mode.log" 2>&1 &
    pids+=($!)
  done
  status=0
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  tail -n 3 "$OUT"/logs/*.log
  [ "$status" = 0 ] || { echo "a mode failed: see $OUT/logs" >&2; exit 1; }
fi
compare deterministic,implicit,explicit 2>&1 | tee "$OUT/logs/gather.log"
end=$(date +%s)

device=$("$PYTHON" -c "import jax; d = jax.devices()[0]; print(d.platform, getattr(d, 'device_kind', ''))")
cat > "$OUT/README.md" <<EOF
# ${DATASET}: the shortened protocol (scripts/gpu_paper.sh)

Command: \`DATASET=${DATASET} PRESET=${PRESET} EPOCHS=${EPOCHS} DECAY=${DECAY} ANALYSIS=${ANALYSIS} SEEDS=${SEEDS} PARALLEL=${PARALLEL} bash scripts/gpu_paper.sh\`

Device: ${device}. Wall time: $((end - start)) s (training, evaluation and analyses$([ "$PARALLEL" = 1 ] && echo ", the three modes in parallel processes on the one device")). Date: $(date -u +%Y-%m-%d).

The table is results.md; everything measured is in summary.json; logs/ holds each process's output.
EOF
echo "wall time $((end - start)) s on ${device}"

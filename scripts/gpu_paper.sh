#!/usr/bin/env bash
# The paper's pixel-MNIST comparison (deterministic, implicit = noise injection, explicit = the probe penalty)
# through `nrnn-compare`, on whatever device JAX finds (one GPU when one is lent), resuming across short device
# sessions. Two protocols, both with the `nrnn-small` preset (the public code's Noisy RNN run: its update rule,
# ε_add = ε_mult = 0.02, hidden 128, batch 128), one seed, robustness curves on the whole test split:
#
#   PROTOCOL=full    the public schedule: Adam 1e-3, δ = 0.01, 100 epochs, learning rate × 0.1 at epoch 90
#   PROTOCOL=short   (default) the protocol of docs/results/mnist_pixel and mnist_permuted, which a 2-core CPU
#                    finishes: Adam 3e-3, δ = 0.03, gradient norm clipped at 1.0, 12 epochs, × 0.1 at epoch 10
#
# DATASET is mnist_pixel (default) or mnist_permuted (the public permutation); MODES (default: all three)
# trains some of the modes, so separate sessions can train one mode each into the same OUT before a last call
# over all modes gathers them without training or measuring again. LAMBDAS (default: the data set's grid,
# λ = 1 for MNIST) sets the explicit penalty's weights, the best on validation kept. Killed or cut off by a
# time limit, the same command continues every run from its last checkpoint (`nrnn-compare --resume`). A
# NaN/Inf loss or gradient redoes its epoch at half the learning rate (`--on-divergence rollback`, at most 3
# times per run; each rollback is recorded in the run's metrics.jsonl and summary) instead of stopping the
# session's run.
#
#   NRNN_DATA=data PROTOCOL=full DATASET=mnist_permuted OUT=runs/paper-permuted bash scripts/gpu_paper.sh
#
# Writes the nrnn-compare layout into OUT (summary.json, results.md, plots, run directories) and appends the
# command, device, date and wall time of this call to OUT/calls.md. ARCHIVE=FILE also writes the run
# directories (checkpoints included) into one .tgz, to carry them between device sessions whose returned files
# are limited in depth: unpack with `tar xzf FILE -C OUT` before the next call. The MNIST IDX files must be in
# $NRNN_DATA (or $NRNN_DATA/mnist). A quick check of the script on a CPU:
#   DATASET=digits PRESET= EPOCHS=1 DECAY=1 ANALYSIS=16 OUT=/tmp/gpu_paper_check bash scripts/gpu_paper.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PROTOCOL=${PROTOCOL-short}
case "$PROTOCOL" in
  full)  def_epochs=100; def_decay=90; protocol_flags=() ;;
  short) def_epochs=12;  def_decay=10; protocol_flags=(--lr 3e-3 --dt 0.03 --grad-clip 1.0) ;;
  *) echo "gpu_paper.sh: PROTOCOL=$PROTOCOL: expected full or short" >&2; exit 2 ;;
esac
DATASET=${DATASET-mnist_pixel}
PRESET=${PRESET-nrnn-small}
EPOCHS=${EPOCHS-$def_epochs}
DECAY=${DECAY-$def_decay}
ANALYSIS=${ANALYSIS-256}
SEEDS=${SEEDS-0}
MODES=${MODES-deterministic,implicit,explicit}
LAMBDAS=${LAMBDAS-}
OUT=${OUT-runs/paper-${DATASET}-${PROTOCOL}}
PYTHON=${PYTHON-python}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}

args=(--dataset "$DATASET" ${PRESET:+--preset "$PRESET"} --seeds "$SEEDS" --epochs "$EPOCHS"
      --lr-decay-epochs "$DECAY" --modes "$MODES" --analysis-examples "$ANALYSIS" --backend scan
      --out "$OUT" --resume --on-divergence rollback ${LAMBDAS:+--lambdas "$LAMBDAS"})
if [ -n "$PRESET" ]; then args+=("${protocol_flags[@]}"); fi
if [ -n "${NRNN_DATA-}" ]; then args+=(--data-dir "$NRNN_DATA"); fi

start=$(date +%s)
"$PYTHON" -c 'import sys; from nrnn_jax.cli import compare_main; sys.exit(compare_main(sys.argv[1:]))' "${args[@]}"
end=$(date +%s)

device=$("$PYTHON" -c "import jax; d = jax.devices()[0]; print(d.platform, getattr(d, 'device_kind', ''))")
jaxv=$("$PYTHON" -c "import jax; print(jax.__version__)")
rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
cat >> "$OUT/calls.md" <<EOF
- $(date -u +%Y-%m-%dT%H:%MZ): \`PROTOCOL=${PROTOCOL} DATASET=${DATASET} MODES=${MODES}${LAMBDAS:+ LAMBDAS=$LAMBDAS} bash scripts/gpu_paper.sh\`
  = \`nrnn-compare ${args[*]}\`; ${device}, JAX ${jaxv}, revision ${rev}; wall time $((end - start)) s
EOF
echo "wall time $((end - start)) s on ${device}"
if [ -n "${ARCHIVE-}" ]; then
  tar czf "$ARCHIVE" -C "$OUT" $(cd "$OUT" && ls -d deterministic implicit explicit 2>/dev/null)
  echo "run directories archived in $ARCHIVE"
fi

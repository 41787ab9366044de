#!/usr/bin/env bash
# Does the standard preset's CPU hour limit its emission lines? (docs/performance.md, "On a GPU")
#   bash bench/gpu_budget.sh CONTRASTIVE_CHECKPOINT OUT_DIR [ITERS] [MINUTES] [MOCK_GALAXIES] [RUNS]
# On a lent GPU, diffusion models of the standard preset train side by side on the standard
# mock, all from the same contrastive image encoder (the CPU run's, carried as CONTRASTIVE_CHECKPOINT):
#   x1     the CPU run's iteration count (ITERS, default 10048) and learning-rate decay: the device control
#   x2     twice the iterations, the per-epoch decay square-rooted so that the last learning rate is the same
# RUNS (default "x1 x2") picks which of them train. Each stops at MINUTES of training at the
# latest (default 6). Their final checkpoints come back in OUT_DIR stripped to what generate.py reads
# (EMA weights and run info); generate.py then samples them on the validation split on the CPU, beside
# the CPU run's model. Needs the non-torch dependencies as wheels in
# .whl/ when the machine has no registry (as bench/gpu_check.sh).
# Measured (bench/gpu_budget_h100.json, docs/performance.md): on one H100 three such runs side by side
# made 17-19 iterations/s each by the training clock, so x1 needs about 9 and x2 18 minutes of training,
# more than one 10-minute command of a lent machine; that run stopped all three at 6 minutes (the
# third trained a loss this project no longer has). One run alone (RUNS=x2) was not timed.
set -u
CON=${1:?contrastive checkpoint}
OUT_DIR=${2:?output folder}
ITERS=${3:-10048}
MINUTES=${4:-6}
MOCK_N=${5:-10000}
RUNS=${6:-x1 x2}
for name in $RUNS; do
  case $name in x1|x2) ;; *) echo "unknown run '$name' in RUNS (expected x1, x2)" >&2; exit 2 ;; esac
done
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg OMP_NUM_THREADS=4
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the project, from its folder (no registry to install it from)
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site" || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"

ROOT=data/mock_ugriz
WORK=/tmp/gpu_budget
rm -rf "$WORK" "$WORK".*.log  # nothing of an earlier run is mixed in
start=$(date +%s)
[ -f $ROOT/catalog.fits ] || python3 -m utils.mock --root $ROOT --n "$MOCK_N" --ugriz >"$WORK.mock.log" 2>&1 \
  || { tail -5 "$WORK.mock.log"; exit 1; }
echo "mock: $(( $(date +%s) - start )) s"
md5sum $ROOT/catalog.fits $ROOT/flux.npy $ROOT/images_ugriz.npy

# twice the iterations with the same last learning rate: decay ** (1/2) per epoch
DECAY2=$(python3 -c "print(round(0.92 ** 0.5, 6))")
common="--preset standard data.source=folder data.root=$ROOT model.image_init=$CON train.max_minutes=$MINUTES"
for name in $RUNS; do
  case $name in
    x1) extra="train.max_iters=$ITERS" ;;
    x2) extra="train.max_iters=$((2 * ITERS)) train.lr_decay=$DECAY2" ;;
  esac
  python3 train_generative.py $common $extra run.out_dir=$WORK/$name >"$WORK.$name.log" 2>&1 &
done
wait
echo "training: $(( $(date +%s) - start )) s since the start"

for name in $RUNS; do
  echo "== $name"
  grep -a -o "validation at iteration [0-9]* .*mse_ratio=[0-9.]*\|run finished.*\|budget.*reached.*\|Error.*" \
    "$WORK.$name.log" | tail -6
  python3 - "$WORK/$name" "$OUT_DIR/$name.pt" <<'PY' || tail -5 "$WORK.$name.log"
import sys
from pathlib import Path
import torch
from utils.checkpoints import find_checkpoint, read_checkpoint
run = next(Path(sys.argv[1]).iterdir())
path = find_checkpoint(run)  # the run's latest checkpoint
state = read_checkpoint(path)
torch.save({"ema_model": state["ema_model"], "run_info": state["run_info"]}, sys.argv[2])
print(f"{path} -> {sys.argv[2]}")
PY
done
tar -cf "$OUT_DIR/logs.tar" -C /tmp $(cd /tmp && ls gpu_budget.*.log gpu_budget/*/*/log.txt \
  gpu_budget/*/*/metrics.json 2>/dev/null)
echo "all: $(( $(date +%s) - start )) s"

#!/usr/bin/env bash
# The CUDA path, checked and timed in one short run on a lent GPU (docs/performance.md, "On a GPU").
#   bash bench/gpu_check.sh OUT_DIR
# Needs the project's non-torch dependencies as wheels in .whl/ when the machine has no registry.
# Stages, each bounded: (1) bf16 against fp32 on the paper-size denoiser and the CUDA tests,
# (2) bench/paper_speed.py at paper size (fp32, bf16, torch.compile), (3) the trainers and
# generate.py end to end on the GPU with bf16 autocast and torch.compile.
set -u
OUT_DIR=${1:-gpu_out}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the project, from its folder (no registry to install it from)
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site" || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"

echo "== 1. bf16 against fp32 (paper-size denoiser, random inputs), CUDA tests"
timeout 120 python3 - <<'PY' 2>&1 | tee "$OUT_DIR/accuracy.txt"
import torch
from utils.builders import build_generative_model
from utils.config import load_config
torch.manual_seed(1)
model = build_generative_model(load_config("generative", [])["model"], 3598, 3).cuda().eval()
for p in model.parameters():  # the zero-initialised output conv would make every error 0/0
    p.data.add_(torch.randn_like(p) * 1e-2)
x, t, img = torch.randn(8, 1, 3598).cuda(), torch.randint(0, 250, (8,)).cuda(), torch.randn(8, 3, 64, 64).cuda()
with torch.no_grad():
    ref = model.double()(x.double(), t, images=img.double()).float(); model.float()
    torch.backends.cuda.matmul.allow_tf32 = False
    fp32 = model(x, t, images=img)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = model(x, t, images=img).float()
rel = lambda a: float((a - ref).norm() / ref.norm())
print(f"relative error against float64: fp32 {rel(fp32):.2e}, bf16 autocast {rel(bf16):.2e}; finite: {bool(bf16.isfinite().all())}")
PY
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_paper_config.py tests/test_diffusion.py 2>&1 | tail -4

echo "== 2. paper-size speed"
# (torch.compile is exercised by stage 3; with --compile here this stage needs about 5 minutes more)
timeout 230 python3 bench/paper_speed.py --rounds 1 --repeats 5 --precisions fp32,bf16 --galaxies 5000 \
  --batch-galaxies 16 --out "$OUT_DIR/paper_speed_gpu.json" 2>&1 | grep -v Warning | tail -16

echo "== 3. end to end on the GPU: paper-size models, bf16 + torch.compile"
D=/tmp/e2e; rm -rf $D
timeout 200 bash -c "
python3 -m utils.mock --root $D/mock --n 1200 >/dev/null 2>&1
python3 train_contrastive.py data.root=$D/mock data.source=folder run.out_dir=$D/con train.max_iters=200 val.every=100 \
  run.checkpoint_every=100 run.precision=bf16 2>&1 | grep -E 'Iteration|top-1|it/s|finished|Error' | tail -3
python3 train_generative.py data.root=$D/mock data.source=folder run.out_dir=$D/gen train.batch_size=32 train.max_iters=300 \
  val.every=300 val.n_objects=16 run.checkpoint_every=300 run.precision=bf16 run.compile=true 2>&1 | tail -4
python3 generate.py data.root=$D/mock data.source=folder sampling.contrastive_run=\$(ls -d $D/con/*/) \
  sampling.generative_run=\$(ls -d $D/gen/*/) sampling.out_dir=$D/out sampling.max_objects=32 sampling.sampler=ddpm sampling.batch_galaxies=16 run.precision=bf16 2>&1 | tail -12
" 2>&1 | tee "$OUT_DIR/e2e.txt" | grep -v Warning
cp $D/gen/*/log.txt "$OUT_DIR/train_generative_log.txt" 2>/dev/null
cp $D/out/*/metrics.json "$OUT_DIR/generate_metrics.json" 2>/dev/null

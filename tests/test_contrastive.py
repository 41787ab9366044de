"""Contrastive network: loss, metrics, encoders, and train_contrastive.py end to end."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, only_run, run_script, tiny_contrastive_args
from models.contrastive import build_contrastive, nt_xent, retrieval_metrics, true_ranks
from models.encoders import ResNet, SpectrumEncoder
from utils.checkpoints import LOCK_FILE


def naive_nt_xent(zi, zs, t):
    z = torch.cat([zi, zs]).double()
    n = len(z)
    b = n // 2
    total = 0.0
    for i in range(n):
        j = (i + b) % n
        num = math.exp(float(z[i] @ z[j]) / t)
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(n) if k != i)
        total += -math.log(num / den)
    return total / n


@pytest.mark.parametrize("b, t", [(3, 0.5), (6, 0.05), (8, 1.0)])
def test_loss_matches_naive_reference(b, t):
    g = torch.Generator().manual_seed(b)
    zi = F.normalize(torch.randn(b, 7, generator=g), dim=1)
    zs = F.normalize(torch.randn(b, 7, generator=g), dim=1)
    assert nt_xent(zi, zs, t).item() == pytest.approx(naive_nt_xent(zi, zs, t), rel=1e-5)


def test_loss_is_finite_at_tiny_temperature():
    z = F.normalize(torch.randn(16, 8), dim=1)
    assert torch.isfinite(nt_xent(z, -z, 1e-4))


def test_aligned_embeddings_give_perfect_retrieval():
    z = F.normalize(torch.randn(40, 16), dim=1)
    m = retrieval_metrics(z, z.clone(), batch_size=8)
    assert m["top1_batch"] == 1.0
    assert m["top5_batch"] == 1.0
    assert m["median_rank"] == 1.0
    assert m["top1_all"] == 1.0
    shuffled = retrieval_metrics(z, z[torch.randperm(40)], batch_size=8)
    assert shuffled["top1_all"] < 0.5
    const = torch.ones(5, 3) / math.sqrt(3)
    assert (true_ranks(const, const) == 4).all()  # ties never count as a hit


def test_encoders_shapes_and_local_weights(tmp_path):
    for depth in (18, 34, 50):
        net = ResNet(depth, in_channels=5, out_dim=12, width=8)
        assert net(torch.randn(2, 5, 64, 64)).shape == (2, 12)
        assert net.features(torch.randn(2, 5, 64, 64)).shape[-2:] == (2, 2)
    spec = SpectrumEncoder(16, 8, (1, 2, 4))
    for length in (449, 563, 3598, 101):
        assert spec(torch.randn(2, 1, length)).shape == (2, 16)
    src = ResNet(18, 3, 10, 8)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    dst = ResNet(18, 3, 128, 8)
    skipped = dst.load_weights(tmp_path / "w.pt")
    assert skipped == ["fc.bias", "fc.weight"]
    assert torch.equal(dst.conv1.weight, src.conv1.weight)


def test_paper_size_spectrum_encoder():
    model = build_contrastive(3)  # SPEC 7: 19.7M parameters in the spectrum encoder
    n = sum(p.numel() for p in model.spectrum_encoder.parameters()) / 1e6
    assert 18.0 < n < 21.5


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    model = build_contrastive(3, 18, 8, 8, (1, 2), 16)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    images, spectra = torch.randn(16, 3, 64, 64), torch.randn(16, 1, 64)
    losses = []
    for _ in range(30):
        loss = nt_xent(*model(images, spectra), 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
def test_train_script_end_to_end(tiny_mock, tmp_path):
    out = tmp_path / "runs"
    result = run_script("train_contrastive.py", tiny_contrastive_args(tiny_mock, out))
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(out)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["iteration"] == 6
    assert {"loss", "top1_batch", "top5_batch", "median_rank"} <= set(metrics["val"])
    assert (run / "config.yml").exists()
    assert (run / "log.txt").exists()
    assert not (run / LOCK_FILE).exists()
    assert list((run / "figures").glob("retrieval_*.png"))
    assert list((run / "checkpoints").glob("latest_*.pt"))
    assert len(list((run / "checkpoints").glob("best_*.pt"))) == 2


@pytest.mark.slow
def test_kill_and_resume_continues_iteration_and_lr(tiny_mock, tmp_path):
    out = tmp_path / "runs"
    args = tiny_contrastive_args(tiny_mock, out) + ["train.max_iters=400", "train.lr_decay=0.5", "val.every=1000"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_contrastive.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    ckpt = None
    while time.time() < deadline:
        found = list(out.glob("*/checkpoints/latest_*.pt"))
        iters = [int(p.stem.split("_")[-1]) for p in found]
        if iters and max(iters) >= 12:  # past the first epoch (4 iterations), so the lr has decayed
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = only_run(out)
    ckpt = next((run / "checkpoints").glob("latest_*.pt"))
    state = torch.load(ckpt, weights_only=False)
    saved_iter = state["trainer"]["iteration"]
    saved_lr = state["optimizer"]["param_groups"][0]["lr"]
    assert saved_lr < 1e-3
    assert not list((run / "checkpoints").glob("*.tmp"))
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == proc.pid  # the killed trainer's, left behind
    resumed = run_script("train_contrastive.py", tiny_contrastive_args(tiny_mock, out) + [
        f"train.max_iters={saved_iter + 4}", "train.lr_decay=0.5", f"run.resume={run}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (run / "log.txt").read_text()
    assert f"at iteration {saved_iter} " in log
    assert f"learning rate {saved_lr:.6g}" in log
    assert json.loads((run / "metrics.json").read_text())["iteration"] == saved_iter + 4
    assert "no longer runs" in resumed.stderr
    assert not (run / LOCK_FILE).exists()  # taken over, then released


@pytest.mark.slow
def test_two_process_gloo_run(tiny_mock, tmp_path):
    out = tmp_path / "runs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           str(ROOT / "train_contrastive.py"), *tiny_contrastive_args(tiny_mock, out), "run.backend=gloo",
           "train.max_iters=4"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(out)
    assert json.loads((run / "metrics.json").read_text())["iteration"] == 4
    assert json.loads((run / "metrics.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_bad_and_incompatible_checkpoints(tiny_mock, tmp_path):
    out = tmp_path / "runs"
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    bad = run_script("train_contrastive.py", tiny_contrastive_args(tiny_mock, out) + [f"run.resume={junk}"])
    assert bad.returncode == 1
    assert "junk.pt" in bad.stderr
    assert "cannot be read" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert not (tmp_path / "checkpoints").exists()  # nothing written beside it
    assert junk.read_bytes() == b"not a checkpoint"
    ok = run_script("train_contrastive.py", tiny_contrastive_args(tiny_mock, out / "a") + ["train.max_iters=2"])
    assert ok.returncode == 0, ok.stderr[-2000:]
    run = only_run(out / "a")
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    wider = run_script("train_contrastive.py", tiny_contrastive_args(tiny_mock, out) + [
        "model.spectrum_width=16", f"run.resume={run}"])
    assert wider.returncode == 1
    assert "trained with other settings: model.spectrum_width (checkpoint 8, this run 16)" in wider.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    shutil.rmtree(out, ignore_errors=True)


@pytest.mark.slow
def test_bf16_autocast_runs_on_cpu(tiny_mock, tmp_path):
    out = tmp_path / "runs"
    result = run_script("train_contrastive.py", tiny_contrastive_args(tiny_mock, out) + ["run.precision=bf16",
                                                                                         "train.max_iters=2"])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((only_run(out) / "metrics.json").read_text())
    assert metrics["iteration"] == 2
    assert math.isfinite(metrics["val"]["loss"])

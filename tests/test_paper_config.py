"""The paper configuration end to end: params files' defaults (full widths, 3,598 pixels, T = 250,
batch 4 for the diffusion model), only the budget shrunk (a few iterations, a tiny dataset, a
handful of galaxies, few sampling steps), so that what a GPU user starts with is run by CI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import only_run, run_script

DATA = ["data.source=folder", "data.num_workers=0"]
# the paper-size networks are the suite's heaviest arithmetic: both cores (about 8 s less than one)


@pytest.mark.slow
def test_paper_configuration_trains_and_generates(tiny_mock, tmp_path):
    runs = tmp_path / "runs"
    contrastive = run_script("train_contrastive.py", [
        f"data.root={tiny_mock}", *DATA, "train.batch_size=4", "val.every=1",
        "run.checkpoint_every=1", "train.max_iters=1", f"run.out_dir={runs / 'contrastive'}"], timeout=300, threads=2)
    assert contrastive.returncode == 0, contrastive.stderr[-3000:]
    generative = run_script("train_generative.py", [
        f"data.root={tiny_mock}", *DATA, "val.every=1", "val.n_objects=2", "val.n_samples=2", "val.steps=2",
        "run.checkpoint_every=1", "train.max_iters=1", f"run.out_dir={runs / 'generative'}"], timeout=300, threads=2)
    assert generative.returncode == 0, generative.stderr[-3000:]
    run = only_run(runs / "generative")
    log = (run / "log.txt").read_text()
    assert "3598 pixels; denoiser 23.66M + image encoder 11.18M parameters; T = 250" in log
    ckpt = torch.load(next((run / "checkpoints").glob("latest_*.pt")), map_location="cpu", weights_only=False)
    assert ckpt["model"]["mid.1.self_attn.qkv.weight"].shape == (1536, 512)  # the published bottleneck
    assert json.loads((run / "metrics.json").read_text())["iteration"] == 1

    out = tmp_path / "outputs"
    generated = run_script("generate.py", [
        f"data.root={tiny_mock}", *DATA, f"sampling.contrastive_run={only_run(runs / 'contrastive')}",
        f"sampling.generative_run={run}", f"sampling.out_dir={out}", "sampling.max_objects=3",
        "sampling.n_samples=2", "sampling.sampler=ddim", "sampling.steps=2", "sampling.top_k=1",
        # science: tests/test_science.py, test_generate.py
        "sampling.figures=1", "sampling.science=false"], timeout=300, threads=2)
    assert generated.returncode == 0, generated.stderr[-3000:]
    metrics = json.loads((only_run(out) / "metrics.json").read_text())
    assert metrics["n_galaxies"] == 3
    assert all(np.isfinite(v) for v in metrics["metrics"].values())

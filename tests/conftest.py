"""Shared fixtures: a tiny mock survey made once per test session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def tiny_mock(tmp_path_factory) -> Path:
    """48 mock galaxies with gri and ugriz images (seed 3)."""
    from utils.data.mock import generate_mock

    root = tmp_path_factory.mktemp("mock") / "survey"
    return generate_mock(root, n_objects=48, seed=3, ugriz=True, progress=False)


def tiny_contrastive_args(data_root: Path, out_dir: Path) -> list[str]:
    """Overrides that make train_contrastive.py run in seconds on the tiny mock."""
    return [f"data.root={data_root}", "data.source=folder", "data.downsample=8", "data.num_workers=0",
            "model.image_depth=18", "model.image_width=8", "model.spectrum_width=8", "model.latent_dim=16",
            "train.batch_size=8", "train.lr=1e-3", "val.every=3",
            "run.checkpoint_every=2", f"run.out_dir={out_dir}", "train.max_iters=6"]


def run_script(script: str, args: list[str], timeout: float = 240, threads: int = 1, **kw):
    """Run an entry script (or ``-m`` and a module in ``args``) with the test interpreter
    (``threads`` intra-op threads); returns the CompletedProcess."""
    import subprocess

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    target = ["-m"] if script == "-m" else [str(ROOT / script)]
    return subprocess.run([sys.executable, *target, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


def only_run(out_dir: Path) -> Path:
    runs = sorted(p for p in Path(out_dir).iterdir() if p.is_dir())
    assert len(runs) == 1, runs
    return runs[0]


def tiny_generative_args(data_root: Path, out_dir: Path) -> list[str]:
    """Overrides that make train_generative.py run in seconds on the tiny mock."""
    return [f"data.root={data_root}", "data.source=folder", "data.downsample=16", "data.num_workers=0",
            "model.width=8", "model.mults=[1, 2, 4]", "model.attn_levels=[2]", "model.image_width=8",
            "diffusion.timesteps=20", "train.batch_size=8", "train.lr=1e-3",
            "val.every=3", "val.n_objects=4", "val.n_samples=2", "val.steps=4", "run.checkpoint_every=2",
            f"run.out_dir={out_dir}", "train.max_iters=4"]


@pytest.fixture(scope="session")
def trained_runs(tiny_mock, tmp_path_factory):
    """A contrastive network and a diffusion model trained for a few iterations on the tiny mock
    (gri, 16-pixel blocks): (contrastive run, diffusion run)."""
    out = tmp_path_factory.mktemp("runs")
    c = run_script("train_contrastive.py", tiny_contrastive_args(tiny_mock, out / "contrastive") +
                   ["data.downsample=16", "train.max_iters=3"])
    assert c.returncode == 0, c.stderr[-3000:]
    # a velocity-predicting model (the quick preset's); tests/test_diffusion.py trains the paper's
    # noise predictor
    g = run_script("train_generative.py", tiny_generative_args(tiny_mock, out / "generative") +
                   ["train.max_iters=3", "diffusion.prediction=v", f"model.image_init={only_run(out / 'contrastive')}"])
    assert g.returncode == 0, g.stderr[-3000:]
    assert "v prediction" in (only_run(out / "generative") / "log.txt").read_text()
    return only_run(out / "contrastive"), only_run(out / "generative")


def gen_args(tiny_mock, runs, out, *extra):
    """generate.py overrides that use ``runs`` on the tiny mock's validation split, writing under ``out``."""
    contrastive, generative = runs
    return [f"data.root={tiny_mock}", "data.source=folder", "data.downsample=16",
            f"sampling.contrastive_run={contrastive}", f"sampling.generative_run={generative}",
            f"sampling.out_dir={out}", "sampling.split=val",
            "sampling.n_samples=4", "sampling.steps=3", "sampling.top_k=2", "sampling.figures=1",
            "sampling.batch_galaxies=3", *extra]

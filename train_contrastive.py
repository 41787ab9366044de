"""Train the contrastive image-spectrum network (SPEC section 2) on PyTorch Ignite.

    python train_contrastive.py [--preset quick] [--config FILE] [section.key=value ...]
    torchrun --nproc_per_node=2 train_contrastive.py run.backend=gloo ...

Each run writes into ``run.out_dir/<timestamp>/``: config.yml, log.txt, checkpoints/,
figures/ and, at the end, metrics.json.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine

from models.contrastive import ContrastiveModel, nt_xent, retrieval_metrics
from utils.builders import build_contrastive_model
from utils.checkpoints import GRID_KEY
from utils.errors import cli
from utils.plotting import plot_retrieval
from utils.runtime import autocast, maybe_compile, unwrap
from utils.training import attach_training, launch, run_training, start_run

logger = logging.getLogger("train_contrastive")
KIND = "contrastive"


@torch.no_grad()
def embed(model: ContrastiveModel, dataset, batch_size: int, device: torch.device, precision: str = "fp32"):
    """Image and spectrum embeddings ``(N, D)`` of a dataset, in row order."""
    model.eval()
    zi, zs = [], []
    for batch in dataset.iter_batches(batch_size):
        with autocast(precision, device):
            a, b = model(batch["image"].to(device), batch["spectrum"].to(device))
        zi.append(a.float().cpu())
        zs.append(b.float().cpu())
    return torch.cat(zi), torch.cat(zs)


def make_validate(model, val_set, config: dict, device: torch.device, run_dir: Path):
    """Validation: NT-Xent loss and retrieval in groups of train.batch_size galaxies, whole-set
    ranks, a figure."""
    group = config["train"]["batch_size"]
    temperature = config["train"]["temperature"]

    def validate(engine: Engine) -> dict:
        net = unwrap(model)
        zi, zs = embed(net, val_set, group, device, config["run"]["precision"])
        losses = [nt_xent(zi[s:s + group], zs[s:s + group], temperature).item()
                  for s in range(0, len(zi) - 1, group) if len(zi[s:s + group]) > 1]
        metrics = {"loss": float(np.mean(losses)), **retrieval_metrics(zi, zs, group)}
        save_figure(zi, zs, val_set, run_dir / "figures" / f"retrieval_{engine.state.iteration:07d}.png",
                    engine.state.iteration)  # validation runs on rank 0 only (utils.training.create_validation)
        return metrics

    return validate


def save_figure(zi: torch.Tensor, zs: torch.Tensor, val_set, path: Path, iteration: int, query: int = 0) -> None:
    """The first validation spectrum with the 5 most similar images and the 3 most similar spectra."""
    image_scores = zi @ zs[query]
    top_images = torch.argsort(image_scores, descending=True)[:5].tolist()
    spec_scores = zs @ zs[query]
    spec_scores[query] = -2
    top_spectra = torch.argsort(spec_scores, descending=True)[:3].tolist()
    raw = val_set.survey.images[val_set.kind]
    rows = val_set.rows
    plot_retrieval(path, val_set.wave, val_set.spectrum(query)[0], raw[rows[query]],
                   [raw[rows[j]] for j in top_images], [float(image_scores[j]) for j in top_images],
                   [j == query for j in top_images], np.stack([val_set.spectrum(j)[0] for j in top_spectra]),
                   [float(spec_scores[j]) for j in top_spectra],
                   title=f"iteration {iteration}: validation spectrum {query} and its nearest images and spectra")


def run(local_rank: int, config: dict) -> None:
    start = start_run(config, config["val"]["n_objects"], KIND)
    run_dir, device, train_set, val_set = start.run_dir, start.device, start.train_set, start.val_set
    model = build_contrastive_model(config["model"], train_set.n_channels)
    logger.info("run folder %s; %d train / %d val galaxies, %d pixels; %.1fM image + %.1fM spectrum parameters",
                run_dir, len(train_set), len(val_set), train_set.n_pixels,
                sum(p.numel() for p in model.image_encoder.parameters()) / 1e6,
                sum(p.numel() for p in model.spectrum_encoder.parameters()) / 1e6)
    model = idist.auto_model(model)
    optimizer = idist.auto_optim(torch.optim.Adam(model.parameters(), lr=config["train"]["lr"],
                                                  weight_decay=config["train"]["weight_decay"], fused=True))
    forward = maybe_compile(model, config["run"]["compile"])
    temperature, precision = config["train"]["temperature"], config["run"]["precision"]

    def step(engine: Engine, batch: dict) -> float:
        model.train()
        images = batch["image"].to(device, non_blocking=True)
        spectra = batch["spectrum"].to(device, non_blocking=True)
        with autocast(precision, device):
            zi, zs = forward(images, spectra)
        loss = nt_xent(zi, zs, temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    trainer = Engine(step)
    attach_training(trainer, config=config, kind=KIND, run_dir=run_dir, optimizer=optimizer,
                    to_save={"model": model, "optimizer": optimizer},
                    validate=make_validate(model, val_set, config, device, run_dir), best_key="loss",
                    resume_from=start.resume, loader=start.loader, run_extras={GRID_KEY: train_set.loglam})
    run_training(trainer, start.loader, config, run_dir)


def main(argv: Sequence[str]) -> None:
    launch(run, KIND, argv)


if __name__ == "__main__":
    cli(main)

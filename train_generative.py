"""Train the conditional diffusion model (SPEC section 3) on PyTorch Ignite.

    python train_generative.py [--preset quick] [--config FILE] [section.key=value ...]
    torchrun --nproc_per_node=2 train_generative.py run.backend=gloo ...

Each run writes into ``run.out_dir/<timestamp>/``: config.yml, log.txt, checkpoints/ (model,
EMA model, optimizer, scheduler, engine), figures/ and, at the end, metrics.json.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine
from ignite.handlers import EMAHandler

from models.diffusion import GaussianDiffusion
from utils.builders import build_diffusion, build_generative_model, clip_value
from utils.checkpoints import GRID_KEY, MEAN_SPECTRUM_KEY
from utils.errors import UserError, cli
from utils.generation import VAL_SAMPLER, run_mean_spectrum, super_stage_input, validation_errors
from utils.plotting import plot_spectra_grid
from utils.runtime import autocast, maybe_compile, unwrap
from utils.trained import LowStage, build_low_stage, find_low_stage, warm_start_image_encoder
from utils.training import attach_ema, attach_training, launch, run_training, start_run

logger = logging.getLogger("train_generative")
KIND = "generative"
#: galaxies shown in the validation figure, and samples drawn for each
FIGURE_GALAXIES = 5
FIGURE_SAMPLES = 3


def make_validate(ema: EMAHandler, diffusion: GaussianDiffusion, val_set, config: dict, device: torch.device,
                  run_dir: Path, baseline: np.ndarray, low_stage: LowStage | None):
    """Validation with the EMA model: MSE of the mean of N samples against the truth, next to
    the MSE of the mean training spectrum; a figure of a few galaxies. A super stage is validated
    on samples of its ``low_stage``."""
    v = config["val"]

    def validate(engine: Engine) -> dict:
        mse, base, first = validation_errors(unwrap(ema.ema_model), diffusion, val_set, baseline,
                                             n_samples=v["n_samples"], steps=v["steps"], seed=config["run"]["seed"],
                                             device=device, precision=config["run"]["precision"],
                                             clip=clip_value(config["data"]["preprocessing"]), low_stage=low_stage)
        metrics = {"mse_mean": float(np.mean(mse)), "mse_mean_train_spectrum": float(np.mean(base))}
        metrics["mse_ratio"] = metrics["mse_mean"] / metrics["mse_mean_train_spectrum"]
        if first is not None:  # validation runs on rank 0 only (utils.training.create_validation)
            rows, truth, samples = (a[:FIGURE_GALAXIES] for a in first)
            samples = samples[:, :FIGURE_SAMPLES]
            images = [val_set.survey.images[val_set.kind][r] for r in rows]
            plot_spectra_grid(run_dir / "figures" / f"samples_{engine.state.iteration:07d}.png", val_set.wave, images,
                              truth, samples, title=f"iteration {engine.state.iteration}: validation galaxies, true "
                              f"spectrum and {samples.shape[1]} samples (EMA model, {VAL_SAMPLER} {v['steps']} "
                              f"steps)", ylabel=f"{config['data']['preprocessing']} flux")
        return metrics

    return validate


def run(local_rank: int, config: dict) -> None:
    low_stage = validation_low_stage(config) if config["model"]["stage"] == "super" else None  # before a run folder
    start = start_run(config, config["val"]["n_objects"], KIND)
    run_dir, device, train_set, val_set = start.run_dir, start.device, start.train_set, start.val_set
    m = config["model"]
    max_level = int(round(config["train"]["cond_noise"] * (config["diffusion"]["timesteps"] - 1)))
    model = build_generative_model(m, train_set.n_pixels, train_set.n_channels, config["train"]["cond_noise"] > 0)
    if low_stage is not None:
        build_low_stage(low_stage, train_set.n_pixels, train_set.n_channels, device)
    if m["image_init"] and start.resume is None:  # a resumed run has its own trained weights
        warm_start_image_encoder(model, m["image_init"], config["data"]["image"], m["image_depth"], m["image_width"],
                                 m["stage"])
    diffusion = build_diffusion(config["diffusion"])
    n_enc = sum(p.numel() for p in getattr(model, "image_encoder", torch.nn.Module()).parameters())
    n_all = sum(p.numel() for p in model.parameters())
    logger.info("run folder %s; %d train / %d val galaxies, %d pixels; denoiser %.2fM + image encoder %.2fM "
                "parameters; T = %d (%s schedule, %s prediction)", run_dir, len(train_set), len(val_set),
                train_set.n_pixels, (n_all - n_enc) / 1e6, n_enc / 1e6, diffusion.num_timesteps,
                config["diffusion"]["schedule"], diffusion.prediction)
    model = idist.auto_model(model)
    optimizer = idist.auto_optim(torch.optim.Adam(model.parameters(), lr=config["train"]["lr"], fused=True))
    forward = maybe_compile(model, config["run"]["compile"])
    precision = config["run"]["precision"]

    upsample = torch.from_numpy(train_set.low.upsample_matrix()).to(device) if m["stage"] == "super" else None

    def step(engine: Engine, batch: dict) -> float:
        model.train()
        x0 = batch["spectrum"].to(device, non_blocking=True)
        images = batch["image"].to(device, non_blocking=True)
        extra = {} if upsample is None else super_stage_input(batch["low"].to(device), diffusion, max_level, upsample)
        with autocast(precision, device):
            loss = diffusion.training_loss(forward, x0, images=images, **extra)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    trainer = Engine(step)
    ema = attach_ema(trainer, unwrap(model), config["train"]["ema_decay"])
    baseline = run_mean_spectrum(run_dir, train_set)
    attach_training(trainer, config=config, kind=KIND, run_dir=run_dir, optimizer=optimizer,
                    to_save={"model": model, "ema_model": ema.ema_model, "optimizer": optimizer},
                    validate=make_validate(ema, diffusion, val_set, config, device, run_dir, baseline, low_stage),
                    best_key="mse_mean", resume_from=start.resume, loader=start.loader,
                    run_extras={MEAN_SPECTRUM_KEY: baseline, GRID_KEY: train_set.loglam})
    run_training(trainer, start.loader, config, run_dir)


def validation_low_stage(config: dict) -> LowStage:
    """The low-stage model whose samples the super stage is validated on (``val.low_run``,
    default the newest finished low-stage run in ``run.out_dir``)."""
    try:
        return find_low_stage(config["val"]["low_run"], False, config["data"], config, "this run",
                              Path(config["run"]["out_dir"]))
    except UserError as err:
        raise UserError(f"the super stage is validated on samples of its low stage (val.low_run): {err}") from None


def main(argv: Sequence[str]) -> None:
    launch(run, KIND, argv)


if __name__ == "__main__":
    cli(main)

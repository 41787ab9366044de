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
from ignite.engine import Engine, Events
from ignite.handlers import EMAHandler
from tqdm import tqdm

from models.diffusion import GaussianDiffusion
from models.samplers import get_sampler
from models.unet import ConditionalUNet1D
from utils.config import ConfigError, cli
from utils.plotting import plot_spectra_grid
from utils.training import attach_training, autocast, launch, maybe_compile, run_training, start_run, unwrap

PARAMS = Path(__file__).resolve().with_name("params_generative.yml")
logger = logging.getLogger("train_generative")
KIND = "generative"
#: galaxies shown in the validation figure, and samples drawn for each
FIGURE_GALAXIES = 5
FIGURE_SAMPLES = 3


def build_model(config: dict, length: int, image_channels: int) -> ConditionalUNet1D:
    m = config["model"]
    try:
        return ConditionalUNet1D(length, image_channels, width=m["width"], mults=tuple(m["mults"]),
                                 attn_levels=tuple(m["attn_levels"]), head_dim=m["head_dim"],
                                 conditioning=m["conditioning"], image_depth=m["image_depth"],
                                 image_width=m["image_width"], context_pos=m.get("context_pos", False),
                                 grad_checkpoint=m["grad_checkpoint"], cond_drop=m.get("cond_drop", 0.0))
    except ValueError as err:
        raise ConfigError(f"model settings: {err}") from None


def build_diffusion(config: dict) -> GaussianDiffusion:
    d = config["diffusion"]  # runs saved before the prediction key existed predicted the noise
    return GaussianDiffusion.from_config(d["schedule"], d["timesteps"], d.get("prediction", "eps"))


def clip_value(config: dict) -> float | None:
    """x_0 estimates are clipped to [-1, 1] for the 'scale' preprocessing, whose data lie there."""
    return 1.0 if config["data"]["preprocessing"] == "scale" else None


@torch.no_grad()
def sample_for_images(model: ConditionalUNet1D, diffusion: GaussianDiffusion, images: torch.Tensor, n_samples: int,
                      sampler: str, steps: int, config: dict, generator: torch.Generator | None = None,
                      eta: float = 0.0, guidance: float = 1.0) -> torch.Tensor:
    """``n_samples`` spectra per image, ``(G, N, L)``: the image context is computed once per
    galaxy and all G x N samples are drawn in one batch. ``guidance`` w != 1 uses classifier-free
    guidance, eps = eps_null + w (eps_cond - eps_null), for a model trained with cond_drop > 0."""
    model.eval()
    device = images.device
    with autocast(config, device):
        context = model.encode(images)
    if context is not None:
        context = context.repeat_interleave(n_samples, dim=0)
    g = images.shape[0]
    shape = (g * n_samples, 1, model.length)
    noise = torch.randn(shape, generator=generator, device=generator.device if generator else device).to(device)

    def denoiser(x, t, ctx):
        with autocast(config, device):
            if guidance == 1.0 or ctx is None:
                return model(x, t, ctx)
            both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([ctx, model.unconditional(ctx)]))
            cond, null = both.float().chunk(2)
            return null + guidance * (cond - null)

    x0 = get_sampler(sampler)(denoiser, noise, diffusion, context, generator=generator, steps=steps, eta=eta,
                              clip=clip_value(config))
    return x0.float().reshape(g, n_samples, -1)


def mean_spectrum(dataset, n: int = 2000) -> np.ndarray:
    """Mean preprocessed spectrum ``(L,)`` of up to ``n`` training objects (the naive predictor)."""
    rows = np.linspace(0, len(dataset) - 1, min(n, len(dataset))).astype(int)
    return np.mean([dataset[int(i)]["spectrum"][0].numpy() for i in rows], axis=0)


def validation_errors(model: ConditionalUNet1D, diffusion: GaussianDiffusion, val_set, config: dict,
                      device: torch.device, baseline: np.ndarray, progress: bool = False):
    """Per-galaxy MSE of the mean of ``val.n_samples`` samples and of the mean training spectrum
    ``baseline``, drawn with the ``val`` sampler; also returns the first batch (index, truth,
    samples) for a figure. Seeded by ``run.seed``, so repeated calls give the same numbers."""
    v = config["val"]
    generator = torch.Generator(device="cpu").manual_seed(config["run"]["seed"])
    mse, base, first = [], [], None
    batch_size = max(1, 512 // v["n_samples"])
    for batch in tqdm(val_set.iter_batches(batch_size), total=-(-len(val_set) // batch_size), disable=not progress,
                      desc="validation", unit="batch"):
        truth = batch["spectrum"][:, 0].numpy()
        samples = sample_for_images(model, diffusion, batch["image"].to(device), v["n_samples"], v["sampler"],
                                    v["steps"], config, generator, guidance=v["guidance"]).cpu().numpy()
        mse.extend(((samples.mean(1) - truth) ** 2).mean(1))
        base.extend(((baseline[None] - truth) ** 2).mean(1))
        if first is None:
            first = (batch["index"].numpy(), truth, samples)
    return np.asarray(mse), np.asarray(base), first


def make_validate(ema: EMAHandler, diffusion: GaussianDiffusion, val_set, config: dict, device: torch.device,
                  run_dir: Path, baseline: np.ndarray):
    """Validation with the EMA model: MSE of the mean of N samples against the truth, next to
    the MSE of the mean training spectrum; a figure of a few galaxies."""
    v = config["val"]

    def validate(engine: Engine) -> dict:
        mse, base, first = validation_errors(unwrap(ema.ema_model), diffusion, val_set, config, device, baseline)
        metrics = {"mse_mean": float(np.mean(mse)), "mse_mean_train_spectrum": float(np.mean(base))}
        metrics["mse_ratio"] = metrics["mse_mean"] / metrics["mse_mean_train_spectrum"]
        if idist.get_rank() == 0 and first is not None:
            rows, truth, samples = (a[:FIGURE_GALAXIES] for a in first)
            samples = samples[:, :FIGURE_SAMPLES]
            images = [val_set.survey.images[val_set.kind][r] for r in rows]
            plot_spectra_grid(run_dir / "figures" / f"samples_{engine.state.iteration:07d}.png", val_set.wave, images,
                              truth, samples, title=f"iteration {engine.state.iteration}: validation galaxies, true "
                              f"spectrum and {samples.shape[1]} samples (EMA model, {v['sampler']} {v['steps']} "
                              f"steps)", ylabel=f"{config['data']['preprocessing']} flux")
        return metrics

    return validate


def run(local_rank: int, config: dict) -> None:
    start = start_run(config, config["val"]["n_objects"], KIND)
    run_dir, device, train_set, val_set = start.run_dir, start.device, start.train_set, start.val_set
    model = build_model(config, train_set.n_pixels, train_set.n_channels)
    diffusion = build_diffusion(config)
    n_enc = sum(p.numel() for p in getattr(model, "image_encoder", torch.nn.Module()).parameters())
    n_all = sum(p.numel() for p in model.parameters())
    logger.info("run folder %s; %d train / %d val galaxies, %d pixels; denoiser %.2fM + image encoder %.2fM "
                "parameters; T = %d (%s schedule, %s prediction)", run_dir, len(train_set), len(val_set),
                train_set.n_pixels, (n_all - n_enc) / 1e6, n_enc / 1e6, diffusion.num_timesteps,
                config["diffusion"]["schedule"], diffusion.prediction)
    model = idist.auto_model(model)
    optimizer = idist.auto_optim(torch.optim.Adam(model.parameters(), lr=config["train"]["lr"], fused=True))
    ema = EMAHandler(unwrap(model), momentum=1.0 - config["train"]["ema_decay"])
    forward = maybe_compile(model, config)

    def step(engine: Engine, batch: dict) -> float:
        model.train()
        x0 = batch["spectrum"].to(device, non_blocking=True)
        images = batch["image"].to(device, non_blocking=True)
        with autocast(config, device):
            loss = diffusion.training_loss(forward, x0, images=images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    trainer = Engine(step)
    ema.attach(trainer, name="ema_momentum", event=Events.ITERATION_COMPLETED)
    baseline = mean_spectrum(train_set)
    attach_training(trainer, config=config, kind=KIND, run_dir=run_dir, optimizer=optimizer,
                    to_save={"model": model, "ema_model": ema.ema_model, "optimizer": optimizer},
                    validate=make_validate(ema, diffusion, val_set, config, device, run_dir, baseline),
                    best_key="mse_mean", resume_from=start.resume, epoch_length=len(start.loader),
                    loader=start.loader)
    run_training(trainer, start.loader, config)


def main(argv: Sequence[str]) -> None:
    launch(run, PARAMS, argv)


if __name__ == "__main__":
    cli(main)

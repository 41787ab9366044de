"""Sampling, model loading and scoring shared by training validation, generate.py and bench/.

Samples for a batch of galaxies are drawn in one batch with the image context computed once
(:func:`sample_for_images`; :func:`draw_samples` for a whole dataset, :func:`validation_calibration`
for the interval calibration); trained models are found by their run folders or checkpoint files
(whose ``run_info`` carries their configuration) and built through :mod:`utils.builders`. What a
sampling run is asked for travels as a :class:`SamplingPlan` of values.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from tqdm import tqdm

from models.diffusion import GaussianDiffusion
from models.samplers import Generators, get_sampler, noise_like
from models.unet import ConditionalUNet1D
from utils.builders import build_diffusion, clip_value
from utils.checkpoints import (
    MEAN_SPECTRUM_FILE,
    MEAN_SPECTRUM_KEY,
    default_runs,
)
from utils.data.dataset import SpectraDataset, splitmix64
from utils.data.survey import configured_dataset, load_survey, subset
from utils.errors import UserError
from utils.eval.calibration import Calibration, calibrate
from utils.runtime import autocast
from utils.trained import LowStage, TrainedPair, build_denoiser, load_trained

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingPlan:
    """How to draw a galaxy's samples: ``n_samples`` per galaxy with ``sampler`` over ``steps``
    (DDPM walks all T), classifier-free ``guidance``, ``batch_galaxies`` galaxies at a time, in
    ``precision``, x_0 estimates clipped to ``clip`` (None: not clipped). A cascade first draws
    ``low_samples`` low-resolution samples, keeps the ``low_keep`` best-ranked and shares the
    ``n_samples`` among them; the super stage sees them noised to ``cond_noise`` x T steps."""

    n_samples: int
    sampler: str
    steps: int
    guidance: float = 1.0
    batch_galaxies: int = 16
    precision: str = "fp32"
    clip: float | None = None
    low_samples: int = 3
    low_keep: int = 2
    cond_noise: float = 0.0

    @classmethod
    def from_config(cls, config: dict) -> "SamplingPlan":
        """The plan of generate.py's ``sampling`` section."""
        s = config["sampling"]
        return cls(s["n_samples"], s["sampler"], s["steps"], s["guidance"], s["batch_galaxies"],
                   config["run"]["precision"], clip_value(config["data"]["preprocessing"]), s["low_samples"],
                   s["low_keep"], s["cond_noise"])

    def shares(self) -> np.ndarray:
        """The super samples each kept low-resolution sample gets, the best-ranked first
        ``(low_keep,)``; they add up to ``n_samples``."""
        keep = min(self.low_keep, self.low_samples)
        return np.array([self.n_samples // keep + (i < self.n_samples % keep) for i in range(keep)])


@torch.no_grad()
def sample_for_images(model: ConditionalUNet1D, diffusion: GaussianDiffusion, images: torch.Tensor, n_samples: int,
                      sampler: str, steps: int, *, precision: str = "fp32", clip: float | None = None,
                      generator: Generators = None, guidance: float = 1.0, low: torch.Tensor | None = None,
                      level: int = 0) -> torch.Tensor:
    """``n_samples`` spectra per image, ``(G, N, L)``: the image context is computed once per
    galaxy and all G x N samples are drawn in one batch. ``generator``: one for the batch, or one
    per galaxy (:func:`galaxy_generators`: a galaxy's samples then depend on nothing but its
    generator). ``guidance`` w != 1 uses classifier-free guidance, eps = eps_null + w (eps_cond -
    eps_null), for a model trained with cond_drop > 0. A super-stage model is given each sample's
    low-resolution spectrum on the full grid, ``low`` ``(G, N, L)``, and its noise step ``level``."""
    model.eval()
    device = images.device
    with autocast(precision, device):
        context = model.encode(images)
    if context is not None:  # (G * N, ...), galaxy-major
        context = context.repeat_interleave(n_samples, dim=0)
    g = images.shape[0]
    noise = starting_noise(g, n_samples, model.length, generator).to(device)
    extra = {}
    if getattr(model, "low_channel", False):
        if low is None:
            raise ValueError("a super-stage model samples given low-resolution spectra (low)")
        extra["low"] = low.reshape(g * n_samples, 1, -1).to(device)
        extra["level"] = torch.full((g * n_samples,), int(level), dtype=torch.long, device=device)

    def denoiser(x, t, ctx):
        with autocast(precision, device):
            if guidance == 1.0 or ctx is None:
                return model(x, t, ctx, **extra)
            doubled = {k: torch.cat([v, v]) for k, v in extra.items()}
            both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([ctx, model.unconditional(ctx)]), **doubled)
            cond, null = both.float().chunk(2)
            return null + guidance * (cond - null)

    x0 = get_sampler(sampler)(denoiser, noise, diffusion, context, generator=generator, steps=steps, clip=clip)
    return x0.float().reshape(g, n_samples, -1)


def starting_noise(galaxies: int, n_samples: int, length: int, generator: Generators = None) -> torch.Tensor:
    """Standard normal starting points ``(galaxies * n_samples, 1, length)``, galaxy by galaxy
    (with one generator per galaxy, each galaxy's from its own)."""
    return noise_like(torch.empty((galaxies * n_samples, 1, length)), generator)


def galaxy_seeds(seed: int, objid: np.ndarray) -> np.ndarray:
    """``(G,)`` non-negative int64 seeds of the galaxies ``objid`` under the run seed ``seed``:
    a hash of both, so that a galaxy's samples depend on nothing but the seed and its id (not on
    the catalogue's order, its chunks, batches, a resumption or the number of processes)."""
    mixed = splitmix64(np.asarray(objid, dtype=np.int64).astype(np.uint64) ^ splitmix64(np.array([seed]))[0])
    return (mixed >> np.uint64(1)).astype(np.int64)


def galaxy_generators(seed: int, objid: np.ndarray) -> list[torch.Generator]:
    """One CPU generator per galaxy, seeded by :func:`galaxy_seeds`."""
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in galaxy_seeds(seed, objid)]


@torch.no_grad()
def sequential_ddpm(model: ConditionalUNet1D, diffusion: GaussianDiffusion, image: torch.Tensor, n: int,
                    generator: torch.Generator) -> torch.Tensor:
    """The research code's way to draw ``n`` samples ``(n, L)`` for one image ``(C, 64, 64)``: one
    sample at a time, re-encoding the image at every DDPM step (fp32, x_0 clipped to [-1, 1]). Kept
    to time against :func:`sample_for_images` and to check that both draw the same samples."""
    out = []
    for _ in range(n):
        x = torch.randn((1, 1, model.length), generator=generator).to(image.device)
        for i in range(diffusion.num_timesteps - 1, -1, -1):
            t = torch.full((1,), i, device=image.device, dtype=torch.long)
            output = model(x, t, context=model.encode(image[None]))  # the encoder at every step
            x0 = diffusion.split_output(x, t, output)[0].clamp(-1, 1)
            mean, _, log_var = diffusion.q_posterior(x0, x, t)
            noise = torch.randn(x.shape, generator=generator).to(x.device)
            x = mean + (torch.exp(0.5 * log_var) * noise if i > 0 else 0)
        out.append(x[0, 0])
    return torch.stack(out)


def run_mean_spectrum(run_dir: Path, train_set) -> np.ndarray:
    """The run's mean training spectrum ``(L,)``: computed at the run's first start and kept in
    ``run_dir`` (a resumed run reads it back; checkpoints carry it for generate.py)."""
    path = Path(run_dir) / MEAN_SPECTRUM_FILE
    if path.is_file():
        stored = np.load(path)
        if stored.shape == (train_set.n_pixels,):
            return stored
    mean = mean_spectrum(train_set)
    if idist.get_rank() == 0:
        np.save(path, mean)
    return mean


def mean_spectrum(dataset, n: int = 2000) -> np.ndarray:
    """Mean preprocessed spectrum ``(L,)`` of up to ``n`` training objects (the naive predictor)."""
    rows = np.linspace(0, len(dataset) - 1, min(n, len(dataset))).astype(int)
    return np.mean([dataset.spectrum(int(i))[0] for i in rows], axis=0)


#: validation samples are drawn with deterministic DDIM over ``val.steps``
VAL_SAMPLER = "ddim"


def validation_errors(model: ConditionalUNet1D, diffusion: GaussianDiffusion, val_set, baseline: np.ndarray, *,
                      n_samples: int, steps: int, seed: int, device: torch.device, precision: str = "fp32",
                      clip: float | None = None, progress: bool = False, low_stage: LowStage | None = None):
    """Per-galaxy MSE of the mean of ``n_samples`` DDIM samples and of the mean training spectrum
    ``baseline``; also returns the first batch (index, truth, samples) for a figure. Seeded by
    ``seed``, so repeated calls give the same numbers. A super-stage ``model`` is validated on
    what it will be given (SPEC 5's research code gave it the truth's low-resolution version): one
    sample of the ``low_stage`` per galaxy conditions all its ``n_samples``."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    mse, base, first = [], [], None
    batch_size = max(1, 512 // n_samples)
    for batch in tqdm(val_set.iter_batches(batch_size), total=-(-len(val_set) // batch_size), disable=not progress,
                      desc="validation", unit="batch"):
        truth = batch["spectrum"][:, 0].numpy()
        images = batch["image"].to(device)
        extra = {}
        if low_stage is not None:
            low = sample_for_images(low_stage.denoiser, low_stage.diffusion, images, 1, VAL_SAMPLER, steps,
                                    precision=precision, clip=clip, generator=generator)
            extra = {"low": condition(low_stage, low.repeat(1, n_samples, 1), 0, generator), "level": 0}
        samples = sample_for_images(model, diffusion, images, n_samples, VAL_SAMPLER, steps, precision=precision,
                                    clip=clip, generator=generator, **extra).cpu().numpy()
        mse.extend(((samples.mean(1) - truth) ** 2).mean(1))
        base.extend(((baseline[None] - truth) ** 2).mean(1))
        if first is None:
            first = (batch["index"].numpy(), truth, samples)
    return np.asarray(mse), np.asarray(base), first


def validate_run(run: str | Path | None, galaxies: int, steps: int | None = None, n_samples: int | None = None,
                 progress: bool = False) -> dict:
    """A trained diffusion model's validation measure on ``galaxies`` validation galaxies (a fixed
    subset, seeded like the run's own validation): the MSE of the mean of its samples over the MSE
    of the mean training spectrum, with the run's own ``val`` settings unless ``steps`` /
    ``n_samples`` are given. Returns the per-galaxy errors and the settings used."""
    config, weights, path, info = load_trained(run, default_runs("generative"), "diffusion model", "generative")
    v = config["val"]
    steps, n_samples = steps or v["steps"], n_samples or v["n_samples"]
    survey = load_survey(config["data"])
    val = subset(configured_dataset(survey, "val", config["data"]), galaxies, seed=config["run"]["seed"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_denoiser(config, weights, path, val.n_pixels, val.n_channels, device)
    baseline = info.get(MEAN_SPECTRUM_KEY)
    if baseline is None:
        baseline = mean_spectrum(configured_dataset(survey, "train", config["data"]))
    mse, base, _ = validation_errors(model, build_diffusion(config["diffusion"]), val, baseline, n_samples=n_samples,
                                     steps=steps, seed=config["run"]["seed"], device=device,
                                     precision=config["run"]["precision"],
                                     clip=clip_value(config["data"]["preprocessing"]), progress=progress)
    return {"checkpoint": path, "mse": mse, "base": base, "steps": steps, "n_samples": n_samples}


@torch.no_grad()
def score(contrastive, images: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``(G, N)`` of each galaxy's image to each of its N samples (batched)."""
    g, n, length = samples.shape
    z_image = contrastive.embed_images(images)  # (G, D), once per galaxy
    z_spec = contrastive.embed_spectra(samples.reshape(g * n, 1, length)).reshape(g, n, -1)
    return torch.einsum("gd,gnd->gn", z_image, z_spec)


@dataclass
class Draws:
    """What :func:`draw_samples` returns for G galaxies: samples ``(G, N, L)`` (preprocessed
    units), their contrastive scores ``(G, N)``, the true spectra ``(G, L)`` (None where
    unknown), the preprocessing parameters ``(G, 2)`` and the sampling wall time; for a cascade
    also the low-resolution samples ``(G, N_low, L_low)`` and their low-stage scores."""

    samples: np.ndarray
    scores: np.ndarray
    truth: np.ndarray | None
    params: np.ndarray
    seconds: float
    low_samples: np.ndarray | None = None
    low_scores: np.ndarray | None = None


@dataclass
class BatchDraw:
    """One batch's samples ``(G, N, L)`` and scores ``(G, N)``, and a cascade's low stage's."""

    samples: torch.Tensor
    scores: torch.Tensor
    low_samples: torch.Tensor | None = None
    low_scores: torch.Tensor | None = None


def noise_level(low: LowStage, cond_noise: float) -> int:
    """The step to which the super stage's low-resolution input is noised: ``cond_noise`` of T."""
    return int(round(cond_noise * (low.level_steps - 1)))


def condition(low: LowStage, kept: torch.Tensor, level: int, generator) -> torch.Tensor:
    """Low-resolution samples ``(G, M, L_low)`` as the super stage's input ``(G, M, L)``: noised
    to step ``level`` (none at 0 without a trained noise level) and interpolated onto the full grid."""
    g, m, n_low = kept.shape
    x = kept.reshape(g * m, 1, n_low)
    if level > 0:
        t = torch.full((g * m,), level, dtype=torch.long, device=x.device)
        x = low.diffusion.q_sample(x, t, noise_like(x, generator).to(x.device))
    return (x @ low.upsample.T.to(x.dtype)).reshape(g, m, -1)


def super_stage_input(low: torch.Tensor, diffusion: GaussianDiffusion, max_level: int, upsample: torch.Tensor) -> dict:
    """The super stage's low-resolution input for a batch of the truth's low versions ``(B, 1,
    L_low)``: with conditioning augmentation (Ho et al. 2021; ``max_level`` > 0) each noised to a
    random step in 0..max_level, that step told to the network; on the full grid ``(B, 1, L)``."""
    level = torch.randint(0, max_level + 1, (low.shape[0],), device=low.device)
    if max_level > 0:
        low = diffusion.q_sample(low, level, torch.randn_like(low))
    return {"low": low @ upsample.T, "level": level}


def check_plan(pair: TrainedPair, plan: SamplingPlan) -> None:
    """Refuse, before anything is drawn or written, a plan the built models cannot follow: noisy
    low-resolution inputs (``sampling.cond_noise`` > 0) for a super stage trained on clean ones."""
    low = pair.low_stage
    if low is not None and noise_level(low, plan.cond_noise) > 0 and not hasattr(pair.denoiser, "level_embed"):
        raise UserError(f"sampling.cond_noise {plan.cond_noise} asks for noisy low-resolution inputs; the super stage "
                        f"'{pair.gen_path}' was trained on clean ones (train.cond_noise 0): set sampling.cond_noise=0")


def draw_batch(pair: TrainedPair, batch: dict, objid: np.ndarray, plan: SamplingPlan, seed: int) -> BatchDraw:
    """Samples and contrastive scores of one batch of galaxies (their ids ``objid``), each galaxy
    drawn from its own generator (:func:`galaxy_generators`). A cascade (SPEC 5): ``low_samples``
    low-resolution samples ranked by the low-stage ranker, the ``low_keep`` best each given its
    share of the ``n_samples`` super samples (:meth:`SamplingPlan.shares`), those ranked by the
    full-spectrum ranker."""
    device = next(pair.denoiser.parameters()).device
    images = batch["image"].to(device)
    generators = galaxy_generators(seed, objid)
    options = dict(precision=plan.precision, clip=plan.clip, generator=generators, guidance=plan.guidance)
    low = pair.low_stage
    if low is None:
        drawn = sample_for_images(pair.denoiser, pair.diffusion, images, plan.n_samples, plan.sampler, plan.steps,
                                  **options)
        return BatchDraw(drawn, score(pair.contrastive, images, drawn))
    low_samples = sample_for_images(low.denoiser, low.diffusion, images, plan.low_samples, plan.sampler, plan.steps,
                                    **options)
    low_scores = score(low.contrastive, images, low_samples)
    order = torch.argsort(torch.nan_to_num(low_scores, nan=-torch.inf), dim=1, descending=True, stable=True)
    shares = plan.shares()
    picks = torch.repeat_interleave(order[:, : len(shares)], torch.as_tensor(shares, device=order.device), dim=1)
    kept = torch.take_along_dim(low_samples, picks[:, :, None], dim=1)  # (G, N, L_low)
    level = noise_level(low, plan.cond_noise)
    drawn = sample_for_images(pair.denoiser, pair.diffusion, images, plan.n_samples, plan.sampler, plan.steps,
                              low=condition(low, kept, level, generators), level=level, **options)
    return BatchDraw(drawn, score(pair.contrastive, images, drawn), low_samples, low_scores)


def draw_samples(pair: TrainedPair, dataset: SpectraDataset, plan: SamplingPlan, known: bool, seed: int,
                 desc: str = "generate") -> Draws:
    """``plan.n_samples`` spectra for every galaxy of ``dataset``, drawn in batches of
    ``plan.batch_galaxies`` (a progress bar) and scored by the contrastive network; each galaxy's
    seeded by ``seed`` and its id."""
    objids = np.asarray(dataset.survey.catalog["objid"], dtype=np.int64)
    parts: dict[str, list] = {"samples": [], "scores": [], "truth": [], "params": [], "low_samples": [],
                              "low_scores": []}
    start = time.perf_counter()
    with tqdm(total=len(dataset), desc=desc, unit="gal") as bar:
        for batch in dataset.iter_batches(plan.batch_galaxies):
            drawn = draw_batch(pair, batch, objids[batch["index"].numpy()], plan, seed)
            for name in ("samples", "scores", "low_samples", "low_scores"):
                if getattr(drawn, name) is not None:
                    parts[name].append(getattr(drawn, name).float().cpu().numpy())
            parts["truth"].append(batch["spectrum"][:, 0].numpy())
            parts["params"].append(batch["params"].numpy())
            bar.update(len(drawn.samples))
    joined = {k: np.concatenate(v) if v else None for k, v in parts.items()}
    return Draws(joined["samples"], joined["scores"], joined["truth"] if known else None, joined["params"],
                 time.perf_counter() - start, joined["low_samples"], joined["low_scores"])


def validation_calibration(pair: TrainedPair, survey, data: dict, plan: SamplingPlan, n: int, seed: int,
                           weights: np.ndarray | None) -> Calibration:
    """The interval calibration (utils.eval.calibration) fitted on a fixed subset of ``n`` galaxies
    of the validation split, drawn like the evaluated ones (each galaxy's samples seeded by
    ``seed`` and its id), and measured with the evaluation's redshift-fit ``weights``."""
    val_set = configured_dataset(survey, "val", data)
    if len(val_set) == 0:
        raise UserError(f"sampling.calibration_objects > 0 needs validation galaxies: split 'val' of "
                        f"'{survey.root}' is empty")
    val_set = subset(val_set, n, seed=0)
    drawn = draw_samples(pair, val_set, plan, known=True, seed=seed, desc="calibrate (val)")
    flux = val_set.deprocess(drawn.samples, drawn.params[:, None])
    truth = val_set.deprocess(drawn.truth, drawn.params)
    calibration = calibrate(flux, val_set.wave, truth, drawn.samples, drawn.truth,
                            val_set.survey.catalog[val_set.rows], weights)
    logger.info("intervals calibrated on %d validation galaxies: 68%% factors %s", len(val_set),
                ", ".join(f"{q} {by_level[0.68]:.2f}" for q, by_level in calibration.factors.items()
                          if q in ("pixels", "z", "dn4000", "ew_halpha")))
    return calibration

"""Sampling, model loading and scoring shared by training validation, generate.py and bench/.

Samples for a batch of galaxies are drawn in one batch with the image context computed once
(:func:`draw` for a whole dataset, :func:`validation_calibration` for the interval calibration);
trained models are found by their run folders or checkpoint files (whose ``run_info`` carries
their configuration) and built through :mod:`utils.builders`.
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
from models.samplers import get_sampler
from models.unet import ConditionalUNet1D
from utils.builders import (CONTRASTIVE_PARAMS, build_contrastive_model, build_diffusion, build_generative_model,
                            clip_value)
from utils.checkpoints import (DATA_KEYS, MEAN_SPECTRUM_FILE, MEAN_SPECTRUM_KEY, RUN_INFO_KEY, WEIGHTS_KEY,
                               CheckpointError, best_checkpoint, checkpoint_kind, default_runs, find_checkpoint,
                               newest_finished_run, read_checkpoint)
from utils.calibration import Calibration
from utils.dataset import IMAGE_FILES, SpectraDataset, check_finite, open_survey
from utils.errors import UserError
from utils.report import calibrate
from utils.runtime import autocast, unwrap
from utils.training import subset

logger = logging.getLogger(__name__)


@torch.no_grad()
def sample_for_images(model: ConditionalUNet1D, diffusion: GaussianDiffusion, images: torch.Tensor, n_samples: int,
                      sampler: str, steps: int, config: dict, generator: torch.Generator | None = None,
                      eta: float = 0.0, guidance: float = 1.0, photometry: torch.Tensor | None = None,
                      antithetic: bool = False, views: int = 1) -> torch.Tensor:
    """``n_samples`` spectra per image, ``(G, N, L)``: the image context (with the images'
    ``(G, F)`` photometry, for a model built with it) is computed once per galaxy and all
    G x N samples are drawn in one batch. ``guidance`` w != 1 uses classifier-free
    guidance, eps = eps_null + w (eps_cond - eps_null), for a model trained with cond_drop > 0.
    ``antithetic``: the last N // 2 starting noises of each galaxy are the negatives of its first
    ones (:func:`starting_noise`; meant for a deterministic sampler). ``views`` > 1 spreads each
    galaxy's samples over that many flips of its image (:data:`VIEWS`; sample j is conditioned on
    view j mod ``views``), so that the encoder's view-dependent errors average out over the N."""
    model.eval()
    device = images.device
    if not 1 <= views <= len(VIEWS):
        raise ValueError(f"views must be in 1..{len(VIEWS)}, got {views}")
    with autocast(config, device):
        contexts = [model.encode(images.flip(VIEWS[v]) if VIEWS[v] else images, photometry) for v in range(views)]
    context = None
    if contexts[0] is not None:  # (G * N, ...): galaxy-major, the views cycling within each galaxy
        stacked = torch.stack(contexts, 1)  # (G, V, ...)
        context = stacked[:, torch.arange(n_samples, device=stacked.device) % views].flatten(0, 1)
    g = images.shape[0]
    noise = starting_noise(g, n_samples, model.length, generator, antithetic).to(device)

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


#: the image views of ``sampling.views``, as the dims each flips: the centre-cropped image, then its
#: left-right, up-down and both flips (the flips of the training augmentation, utils.dataset)
VIEWS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-1, -2))


def starting_noise(galaxies: int, n_samples: int, length: int, generator: torch.Generator | None = None,
                   antithetic: bool = False) -> torch.Tensor:
    """Standard normal starting points ``(galaxies * n_samples, 1, length)``, galaxy by galaxy.

    ``antithetic`` draws ceil(N / 2) per galaxy and appends the negatives of the first N // 2:
    every sample is still a draw from the model, but a deterministic sampler's mirrored pairs
    cancel the part of the samples' scatter that is odd in the noise, so summaries over a
    galaxy's N samples (their median, mean, quantiles) vary less from one draw to the next."""
    drawn = (n_samples + 1) // 2 if antithetic else n_samples
    noise = torch.randn((galaxies, drawn, 1, length), generator=generator,
                        device=generator.device if generator is not None else "cpu")
    if antithetic:
        noise = torch.cat([noise, -noise[:, :n_samples // 2]], dim=1)
    return noise.reshape(galaxies * n_samples, 1, length)


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


def photometry_of(model: torch.nn.Module, dataset, batch: dict, device: torch.device) -> torch.Tensor | None:
    """The photometric features of a batch of ``dataset`` on ``device`` when ``model`` (a denoiser,
    possibly wrapped) was built to read them (``model.photometry``), else None."""
    if not getattr(unwrap(model), "n_photometry", 0):
        return None
    return torch.from_numpy(dataset.photometry(batch["index"].numpy())).to(device)


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
                                    v["steps"], config, generator, guidance=v["guidance"],
                                    photometry=photometry_of(model, val_set, batch, device)).cpu().numpy()
        mse.extend(((samples.mean(1) - truth) ** 2).mean(1))
        base.extend(((baseline[None] - truth) ** 2).mean(1))
        if first is None:
            first = (batch["index"].numpy(), truth, samples)
    return np.asarray(mse), np.asarray(base), first


def load_trained(path: str | None, default_dir: Path, what: str, kind: str) -> tuple[dict, dict, Path, dict]:
    """``(run config, weights, checkpoint path, run info)`` of a trained model of ``kind``, from a
    run folder (its best checkpoint, else its latest), a checkpoint file alone, or the newest
    finished run in ``default_dir``. The configuration is the one saved in the checkpoint; the
    run info also holds what the run computed once (``mean_train_spectrum`` for diffusion runs)."""
    run = Path(path) if path else newest_finished_run(default_dir, what)
    checkpoint = best_checkpoint(run) if run.is_dir() else find_checkpoint(run)
    # mapped, not read: only the weights used are paged in, not the optimizer state beside them
    state = read_checkpoint(checkpoint, f"{what} checkpoint", mmap=True)
    config = checkpoint_kind(state, checkpoint, kind, f"{what} checkpoint")
    return config, state[WEIGHTS_KEY[kind]], checkpoint, state[RUN_INFO_KEY]


def check_compatible(config: dict, gen_cfg: dict, con_cfg: dict, gen_path: Path, con_path: Path) -> None:
    """Both models must have been trained on data prepared like the data we generate for."""
    for key in DATA_KEYS:
        values = {"this run": config["data"][key], f"diffusion model ({gen_path})": gen_cfg["data"][key],
                  f"contrastive network ({con_path})": con_cfg["data"][key]}
        if len(set(map(str, values.values()))) > 1:
            shown = "; ".join(f"{k}: {v!r}" for k, v in values.items())
            raise UserError(f"data.{key} differs between the models and the data ({shown}): the spectrum length, "
                            f"bands and preprocessing must match")


def unwrapped(weights: dict) -> dict:
    """A state dict without the prefixes data parallelism ('module.') and torch.compile ('_orig_mod.') add."""
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in weights.items()}


def load_weights(model: torch.nn.Module, weights: dict, path: Path, what: str) -> None:
    weights = unwrapped(weights)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"{what} checkpoint '{path}' does not fit the model built from its own configuration: "
                              f"{str(err).splitlines()[0]}") from None


@dataclass
class TrainedPair:
    """The two trained networks generate.py needs, with where they came from."""

    gen_cfg: dict
    con_cfg: dict
    gen_path: Path
    con_path: Path
    gen_weights: dict
    con_weights: dict
    mean_train_spectrum: np.ndarray | None = None  # (L,), as the diffusion run computed it
    denoiser: torch.nn.Module | None = None
    contrastive: torch.nn.Module | None = None
    diffusion: GaussianDiffusion | None = None


def find_models(config: dict) -> TrainedPair:
    """Locate both trained models (config paths or newest finished runs) and check that they fit
    the configured data."""
    s = config["sampling"]
    gen_cfg, gen_w, gen_path, gen_info = load_trained(s["generative_run"], Path(config["run"]["out_dir"]),
                                                      "diffusion model", "generative")
    con_cfg, con_w, con_path, _ = load_trained(s["contrastive_run"], default_runs(CONTRASTIVE_PARAMS),
                                               "contrastive network", "contrastive")
    check_compatible(config, gen_cfg, con_cfg, gen_path, con_path)
    return TrainedPair(gen_cfg, con_cfg, gen_path, con_path, gen_w, con_w,
                       mean_train_spectrum=gen_info.get(MEAN_SPECTRUM_KEY))


def warm_start_image_encoder(model: ConditionalUNet1D, source: str, config: dict) -> Path:
    """Copy a trained contrastive network's image encoder into the diffusion model's condition
    encoder before training (``model.image_init``), which then trains on jointly as before.

    ``source`` is 'contrastive' (the newest finished run in the contrastive runs folder) or a
    contrastive run folder or checkpoint file. The two encoders must be the same ResNet (depth,
    width) on the same image bands; the contrastive projection head is not copied. Returns the
    checkpoint used.
    """
    if getattr(model, "image_encoder", None) is None:
        raise UserError("model.image_init needs an image encoder to initialise: model.conditioning is 'none'")
    con_cfg, weights, path, _ = load_trained(None if source == "contrastive" else source,
                                             default_runs(CONTRASTIVE_PARAMS), "contrastive network", "contrastive")
    differ = [f"{section}.{key}: {config[section][key]!r} here, {con_cfg[section][key]!r} in {path}"
              for section, key in (("data", "image"), ("model", "image_depth"), ("model", "image_width"))
              if config[section][key] != con_cfg[section][key]]
    if differ:
        raise UserError(f"model.image_init: the contrastive network's image encoder differs from the diffusion "
                        f"model's ({'; '.join(differ)})")
    prefix = "image_encoder."
    state = {k[len(prefix):]: v for k, v in unwrapped(weights).items()
             if k.startswith(prefix) and not k.startswith(prefix + "fc.")}
    try:
        model.image_encoder.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"model.image_init: the image encoder of '{path}' does not fit: "
                              f"{str(err).splitlines()[0]}") from None
    logger.info("image encoder initialised from the contrastive network %s", path)
    return path


def build_denoiser(config: dict, weights: dict, path: Path, n_pixels: int, n_channels: int,
                   device: torch.device) -> torch.nn.Module:
    """The trained diffusion model from its run config and weights, on ``device``, in eval mode."""
    model = build_generative_model(config, n_pixels, n_channels)
    load_weights(model, weights, path, "diffusion model")
    return model.to(device).eval()


def build_models(pair: TrainedPair, n_pixels: int, n_channels: int, device: torch.device) -> TrainedPair:
    """Build both networks from their own run configs, load the weights, move them to ``device``."""
    pair.denoiser = build_denoiser(pair.gen_cfg, pair.gen_weights, pair.gen_path, n_pixels, n_channels, device)
    pair.contrastive = build_contrastive_model({**pair.con_cfg, "model": {**pair.con_cfg["model"], "image_weights": None}},
                                               n_channels)
    load_weights(pair.contrastive, pair.con_weights, pair.con_path, "contrastive network")
    pair.contrastive.to(device).eval()
    pair.diffusion = build_diffusion(pair.gen_cfg)
    return pair


def generation_set(config: dict, survey) -> tuple[SpectraDataset, bool]:
    """The galaxies to generate for and whether their true spectra are known."""
    s, d = config["sampling"], config["data"]
    if s["catalog"]:
        images = open_survey(s["catalog"], check_values=False)  # its flux may be NaN: spectra not known
        if d["image"] in images.images:  # a NaN pixel would turn every sample of its galaxy into NaN
            check_finite(images.root / IMAGE_FILES[d["image"]], images.images[d["image"]])
        images.meta["image_stats"] = survey.meta["image_stats"]  # normalise like the training images
        if len(images.loglam) != len(survey.loglam) or not np.allclose(images.loglam, survey.loglam):
            raise UserError(f"sampling.catalog '{s['catalog']}' has a different wavelength grid from data.root")
        known = bool(np.isfinite(np.asarray(images.flux)).all())
        dataset = SpectraDataset.from_config(images, None, d, spectra=known)
        return subset(dataset, s["max_objects"], seed=0), known
    dataset = SpectraDataset.from_config(survey, s["split"], d)
    if len(dataset) == 0:
        raise UserError(f"split '{s['split']}' of '{survey.root}' is empty")
    return subset(dataset, s["max_objects"], seed=0), True


@torch.no_grad()
def score(contrastive, images: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``(G, N)`` of each galaxy's image to each of its N samples (batched)."""
    g, n, length = samples.shape
    z_image = contrastive.embed_images(images)  # (G, D), once per galaxy
    z_spec = contrastive.embed_spectra(samples.reshape(g * n, 1, length)).reshape(g, n, -1)
    return torch.einsum("gd,gnd->gn", z_image, z_spec)


@dataclass
class Draws:
    """What :func:`draw` returns for G galaxies: samples ``(G, N, L)`` (preprocessed units), their
    contrastive scores ``(G, N)``, the true spectra ``(G, L)`` (None where unknown), the
    preprocessing parameters ``(G, 2)`` and the sampling wall time."""

    samples: np.ndarray
    scores: np.ndarray
    truth: np.ndarray | None
    params: np.ndarray
    seconds: float


def draw(pair: TrainedPair, dataset: SpectraDataset, config: dict, known: bool, seed: int,
         desc: str = "generate") -> Draws:
    """``sampling.n_samples`` spectra for every galaxy of ``dataset``, drawn with the ``sampling``
    settings in batches of ``sampling.batch_galaxies`` (a progress bar) and scored by the
    contrastive network; seeded by ``seed``."""
    s = config["sampling"]
    cfg = {**pair.gen_cfg, "run": {**pair.gen_cfg["run"], "precision": config["run"]["precision"]}}
    device = next(pair.denoiser.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    samples, scores, truth, params = [], [], [], []
    start = time.perf_counter()
    with tqdm(total=len(dataset), desc=desc, unit="gal") as bar:
        for batch in dataset.iter_batches(s["batch_galaxies"]):
            images = batch["image"].to(device)
            drawn = sample_for_images(pair.denoiser, pair.diffusion, images, s["n_samples"], s["sampler"], s["steps"],
                                      cfg, generator, eta=s["eta"], guidance=s["guidance"],
                                      photometry=photometry_of(pair.denoiser, dataset, batch, device),
                                      antithetic=s["antithetic"], views=s["views"])
            scores.append(score(pair.contrastive, images, drawn).float().cpu().numpy())
            samples.append(drawn.cpu().numpy())
            truth.append(batch["spectrum"][:, 0].numpy())
            params.append(batch["params"].numpy())
            bar.update(len(images))
    return Draws(np.concatenate(samples), np.concatenate(scores), np.concatenate(truth) if known else None,
                 np.concatenate(params), time.perf_counter() - start)


def calibration_draws(pair: TrainedPair, survey, config: dict, n: int) -> tuple[SpectraDataset, Draws]:
    """The calibration's validation galaxies (a fixed subset of ``n``) and their samples, drawn
    like the evaluated ones with their own seed (``run.seed`` + 1), so that the evaluated
    galaxies' samples are the same with or without a calibration."""
    val_set = SpectraDataset.from_config(survey, "val", config["data"])
    if len(val_set) == 0:
        raise UserError(f"sampling.calibration_objects > 0 needs validation galaxies: split 'val' of "
                        f"'{survey.root}' is empty")
    val_set = subset(val_set, n, seed=0)
    return val_set, draw(pair, val_set, config, known=True, seed=config["run"]["seed"] + 1, desc="calibrate (val)")


def validation_calibration(pair: TrainedPair, survey, config: dict, weights: np.ndarray | None) -> Calibration:
    """The interval calibration (utils.calibration) fitted on ``sampling.calibration_objects``
    galaxies of the validation split (:func:`calibration_draws`) and measured with the
    evaluation's redshift-fit ``weights``."""
    # utils.config refuses a calibration when the validation split is the one evaluated
    val_set, drawn = calibration_draws(pair, survey, config, config["sampling"]["calibration_objects"])
    flux = val_set.invert(drawn.samples, drawn.params[:, None])
    truth = val_set.invert(drawn.truth, drawn.params)
    calibration = calibrate(flux, val_set.wave, truth, drawn.samples, drawn.truth,
                            val_set.survey.catalog[val_set.rows], weights)
    logger.info("intervals calibrated on %d validation galaxies: 68%% factors %s", len(val_set),
                ", ".join(f"{q} {by_level[0.68]:.2f}" for q, by_level in calibration.factors.items()
                          if q in ("pixels", "z", "dn4000", "ew_halpha")))
    return calibration

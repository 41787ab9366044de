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
from utils.builders import build_contrastive_model, build_diffusion, build_generative_model, clip_value
from utils.checkpoints import (
    DATA_KEYS,
    GRID_KEY,
    MEAN_SPECTRUM_FILE,
    MEAN_SPECTRUM_KEY,
    RUN_INFO_KEY,
    WEIGHTS_KEY,
    CheckpointError,
    best_checkpoint,
    checkpoint_kind,
    default_runs,
    find_checkpoint,
    newest_finished_run,
    read_checkpoint,
)
from utils.data.dataset import IMAGE_FILES, SpectraDataset, check_finite, open_survey, splitmix64
from utils.data.survey import configured_dataset, load_survey, subset
from utils.errors import UserError
from utils.eval.calibration import Calibration, calibrate
from utils.runtime import autocast

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingPlan:
    """How to draw a galaxy's samples: ``n_samples`` per galaxy with ``sampler`` over ``steps``
    (DDPM walks all T), classifier-free ``guidance``, ``batch_galaxies`` galaxies at a time, in
    ``precision``, x_0 estimates clipped to ``clip`` (None: not clipped)."""

    n_samples: int
    sampler: str
    steps: int
    guidance: float = 1.0
    batch_galaxies: int = 16
    precision: str = "fp32"
    clip: float | None = None

    @classmethod
    def from_config(cls, config: dict) -> "SamplingPlan":
        """The plan of generate.py's ``sampling`` section."""
        s = config["sampling"]
        return cls(s["n_samples"], s["sampler"], s["steps"], s["guidance"], s["batch_galaxies"],
                   config["run"]["precision"], clip_value(config["data"]["preprocessing"]))


@torch.no_grad()
def sample_for_images(model: ConditionalUNet1D, diffusion: GaussianDiffusion, images: torch.Tensor, n_samples: int,
                      sampler: str, steps: int, *, precision: str = "fp32", clip: float | None = None,
                      generator: Generators = None, guidance: float = 1.0) -> torch.Tensor:
    """``n_samples`` spectra per image, ``(G, N, L)``: the image context is computed once per
    galaxy and all G x N samples are drawn in one batch. ``generator``: one for the batch, or one
    per galaxy (:func:`galaxy_generators`: a galaxy's samples then depend on nothing but its
    generator). ``guidance`` w != 1 uses classifier-free guidance, eps = eps_null + w (eps_cond -
    eps_null), for a model trained with cond_drop > 0."""
    model.eval()
    device = images.device
    with autocast(precision, device):
        context = model.encode(images)
    if context is not None:  # (G * N, ...), galaxy-major
        context = context.repeat_interleave(n_samples, dim=0)
    g = images.shape[0]
    noise = starting_noise(g, n_samples, model.length, generator).to(device)

    def denoiser(x, t, ctx):
        with autocast(precision, device):
            if guidance == 1.0 or ctx is None:
                return model(x, t, ctx)
            both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([ctx, model.unconditional(ctx)]))
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
                      clip: float | None = None, progress: bool = False):
    """Per-galaxy MSE of the mean of ``n_samples`` DDIM samples and of the mean training spectrum
    ``baseline``; also returns the first batch (index, truth, samples) for a figure. Seeded by
    ``seed``, so repeated calls give the same numbers."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    mse, base, first = [], [], None
    batch_size = max(1, 512 // n_samples)
    for batch in tqdm(val_set.iter_batches(batch_size), total=-(-len(val_set) // batch_size), disable=not progress,
                      desc="validation", unit="batch"):
        truth = batch["spectrum"][:, 0].numpy()
        samples = sample_for_images(model, diffusion, batch["image"].to(device), n_samples, VAL_SAMPLER, steps,
                                    precision=precision, clip=clip, generator=generator).cpu().numpy()
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
    model = build_denoiser(config["model"], weights, path, val.n_pixels, val.n_channels, device)
    baseline = info.get(MEAN_SPECTRUM_KEY)
    if baseline is None:
        baseline = mean_spectrum(configured_dataset(survey, "train", config["data"]))
    mse, base, _ = validation_errors(model, build_diffusion(config["diffusion"]), val, baseline, n_samples=n_samples,
                                     steps=steps, seed=config["run"]["seed"], device=device,
                                     precision=config["run"]["precision"],
                                     clip=clip_value(config["data"]["preprocessing"]), progress=progress)
    return {"checkpoint": path, "mse": mse, "base": base, "steps": steps, "n_samples": n_samples}


def load_trained(path: str | Path | None, default_dir: Path, what: str, kind: str) -> tuple[dict, dict, Path, dict]:
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


def check_compatible(data: dict, gen_data: dict, con_data: dict, gen_path: Path, con_path: Path) -> None:
    """Both models must have been trained on data prepared like the ``data`` we generate for (the
    ``data`` sections of this run and of both models' runs)."""
    for key in DATA_KEYS:
        values = {"this run": data[key], f"diffusion model ({gen_path})": gen_data[key],
                  f"contrastive network ({con_path})": con_data[key]}
        if len(set(map(str, values.values()))) > 1:
            shown = "; ".join(f"{k}: {v!r}" for k, v in values.items())
            raise UserError(f"data.{key} differs between the models and the data ({shown}): the spectrum length, "
                            f"bands and preprocessing must match")


def strip_prefixes(weights: dict) -> dict:
    """A state dict without the key prefixes data parallelism ('module.') and torch.compile
    ('_orig_mod.') add."""
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in weights.items()}


def load_weights(model: torch.nn.Module, weights: dict, path: Path, what: str) -> None:
    try:
        model.load_state_dict(strip_prefixes(weights))
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
    gen_grid: np.ndarray | None = None  # (L,) loglam each network was trained on (None: not recorded)
    con_grid: np.ndarray | None = None
    denoiser: torch.nn.Module | None = None
    contrastive: torch.nn.Module | None = None
    diffusion: GaussianDiffusion | None = None


def find_models(config: dict) -> TrainedPair:
    """Locate both trained models (config paths or newest finished runs) and check that they fit
    the configured data."""
    s = config["sampling"]
    gen_cfg, gen_w, gen_path, gen_info = load_trained(s["generative_run"], Path(config["run"]["out_dir"]),
                                                      "diffusion model", "generative")
    con_cfg, con_w, con_path, con_info = load_trained(s["contrastive_run"], default_runs("contrastive"),
                                                      "contrastive network", "contrastive")
    check_compatible(config["data"], gen_cfg["data"], con_cfg["data"], gen_path, con_path)
    return TrainedPair(gen_cfg, con_cfg, gen_path, con_path, gen_w, con_w,
                       mean_train_spectrum=gen_info.get(MEAN_SPECTRUM_KEY), gen_grid=gen_info.get(GRID_KEY),
                       con_grid=con_info.get(GRID_KEY))


def check_grid(pair: TrainedPair, loglam: np.ndarray, where: str) -> None:
    """Both networks must have been trained on the wavelength grid ``loglam`` ``(L,)`` (log10 A)
    that the spectra are generated on (``where`` names its dataset); networks whose checkpoints do
    not record their grid are taken at their word."""
    for grid, what, path in ((pair.gen_grid, "diffusion model", pair.gen_path),
                             (pair.con_grid, "contrastive network", pair.con_path)):
        if grid is None:
            continue
        grid = np.asarray(grid)
        if grid.shape != np.shape(loglam) or not np.allclose(grid, loglam, rtol=0, atol=1e-6):
            shown = lambda g: f"{len(g)} pixels, {10 ** g[0]:.1f}-{10 ** g[-1]:.1f} A"  # noqa: E731
            raise UserError(f"the {what} ({path}) was trained on another wavelength grid ({shown(grid)}) than "
                            f"{where} gives ({shown(np.asarray(loglam))}): use the models of that data, or its "
                            f"data.root and data.downsample")


def warm_start_image_encoder(model: ConditionalUNet1D, source: str, image: str, image_depth: int,
                             image_width: int) -> Path:
    """Copy a trained contrastive network's image encoder into the diffusion model's condition
    encoder before training (``model.image_init``), which then trains on jointly as before.

    ``source`` is 'contrastive' (the newest finished run in the contrastive runs folder) or a
    contrastive run folder or checkpoint file. The two encoders must be the same ResNet
    (``image_depth``, ``image_width``) on the same ``image`` bands; the contrastive projection head
    is not copied. Returns the checkpoint used.
    """
    if getattr(model, "image_encoder", None) is None:
        raise UserError("model.image_init needs an image encoder to initialise: model.conditioning is 'none'")
    con_cfg, weights, path, _ = load_trained(None if source == "contrastive" else source,
                                             default_runs("contrastive"), "contrastive network", "contrastive")
    mine = {"data.image": image, "model.image_depth": image_depth, "model.image_width": image_width}
    differ = [f"{key}: {value!r} here, {con_cfg[key.split('.')[0]][key.split('.')[1]]!r} in {path}"
              for key, value in mine.items() if value != con_cfg[key.split(".")[0]][key.split(".")[1]]]
    if differ:
        raise UserError(f"model.image_init: the contrastive network's image encoder differs from the diffusion "
                        f"model's ({'; '.join(differ)})")
    prefix = "image_encoder."
    state = {k[len(prefix):]: v for k, v in strip_prefixes(weights).items()
             if k.startswith(prefix) and not k.startswith(prefix + "fc.")}
    try:
        model.image_encoder.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"model.image_init: the image encoder of '{path}' does not fit: "
                              f"{str(err).splitlines()[0]}") from None
    logger.info("image encoder initialised from the contrastive network %s", path)
    return path


def build_denoiser(model: dict, weights: dict, path: Path, n_pixels: int, n_channels: int,
                   device: torch.device) -> torch.nn.Module:
    """The trained diffusion model of a run's ``model`` section and weights, on ``device``, in
    eval mode."""
    net = build_generative_model(model, n_pixels, n_channels)
    load_weights(net, weights, path, "diffusion model")
    return net.to(device).eval()


def build_models(pair: TrainedPair, n_pixels: int, n_channels: int, device: torch.device) -> TrainedPair:
    """Build both networks from their own run configs, load the weights, move them to ``device``."""
    pair.denoiser = build_denoiser(pair.gen_cfg["model"], pair.gen_weights, pair.gen_path, n_pixels, n_channels,
                                   device)
    pair.contrastive = build_contrastive_model(pair.con_cfg["model"], n_channels, image_weights=False)
    load_weights(pair.contrastive, pair.con_weights, pair.con_path, "contrastive network")
    pair.contrastive.to(device).eval()
    pair.diffusion = build_diffusion(pair.gen_cfg["diffusion"])
    return pair


def split_set(config: dict, survey) -> SpectraDataset:
    """The galaxies of a configuration's split (a fixed subset of ``sampling.max_objects``), or
    of its ``sampling.catalog`` when that holds spectra: the galaxies evaluated against their
    truth."""
    s, d = config["sampling"], config["data"]
    if s["catalog"]:
        other = open_survey(s["catalog"])
        dataset = configured_dataset(other, None, d, image_stats=survey.meta["image_stats"].get(d["image"]))
        where = f"sampling.catalog '{s['catalog']}'"
    else:
        dataset = configured_dataset(survey, s["split"], d)
        where = f"split '{s['split']}' of '{survey.root}'"
    if len(dataset) == 0:
        raise UserError(f"{where} is empty")
    return subset(dataset, s["max_objects"], seed=0)


def catalog_set(config: dict, survey, images) -> SpectraDataset:
    """Every galaxy of a catalog of images only (``images``, opened), on the grid of the training
    data ``survey`` and with its image standardisation; images of the kind the models read are
    required, with finite pixels (a NaN pixel would make every sample of its galaxy NaN)."""
    d = config["data"]
    if d["image"] not in images.images:
        raise UserError(f"sampling.catalog '{images.root}' has {', '.join(IMAGE_FILES[k] for k in images.images)}; "
                        f"the models read {d['image']} images (data.image): prepare the catalog with "
                        f"{'--images (gri JPEGs)' if d['image'] == 'gri' else '--ugriz (5-band cutouts)'}")
    check_finite(images.root / IMAGE_FILES[d["image"]], images.images[d["image"]])
    return configured_dataset(images, None, d, loglam=survey.loglam, image_stats=survey.meta["image_stats"][d["image"]])


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
    unknown), the preprocessing parameters ``(G, 2)`` and the sampling wall time."""

    samples: np.ndarray
    scores: np.ndarray
    truth: np.ndarray | None
    params: np.ndarray
    seconds: float


def draw_batch(pair: TrainedPair, batch: dict, objid: np.ndarray, plan: SamplingPlan, seed: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples ``(G, N, L)`` and their contrastive scores ``(G, N)`` of one batch of galaxies
    (their ids ``objid``), each galaxy drawn from its own generator (:func:`galaxy_generators`)."""
    device = next(pair.denoiser.parameters()).device
    images = batch["image"].to(device)
    drawn = sample_for_images(pair.denoiser, pair.diffusion, images, plan.n_samples, plan.sampler, plan.steps,
                              precision=plan.precision, clip=plan.clip, generator=galaxy_generators(seed, objid),
                              guidance=plan.guidance)
    return drawn, score(pair.contrastive, images, drawn)


def draw_samples(pair: TrainedPair, dataset: SpectraDataset, plan: SamplingPlan, known: bool, seed: int,
                 desc: str = "generate") -> Draws:
    """``plan.n_samples`` spectra for every galaxy of ``dataset``, drawn in batches of
    ``plan.batch_galaxies`` (a progress bar) and scored by the contrastive network; each galaxy's
    seeded by ``seed`` and its id."""
    objids = np.asarray(dataset.survey.catalog["objid"], dtype=np.int64)
    samples, scores, truth, params = [], [], [], []
    start = time.perf_counter()
    with tqdm(total=len(dataset), desc=desc, unit="gal") as bar:
        for batch in dataset.iter_batches(plan.batch_galaxies):
            drawn, scored = draw_batch(pair, batch, objids[batch["index"].numpy()], plan, seed)
            images = batch["image"]
            scores.append(scored.float().cpu().numpy())
            samples.append(drawn.cpu().numpy())
            truth.append(batch["spectrum"][:, 0].numpy())
            params.append(batch["params"].numpy())
            bar.update(len(images))
    return Draws(np.concatenate(samples), np.concatenate(scores), np.concatenate(truth) if known else None,
                 np.concatenate(params), time.perf_counter() - start)


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

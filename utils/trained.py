"""Trained models: found by their run folders or checkpoint files (whose ``run_info`` carries
their configuration, their training grid and what the run computed once), checked against each
other and the data, and built through :mod:`utils.builders`; and the galaxies a generate.py run
draws for."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.diffusion import GaussianDiffusion
from models.unet import ConditionalUNet1D
from utils.builders import build_contrastive_model, build_diffusion, build_generative_model
from utils.checkpoints import (
    DATA_KEYS,
    GRID_KEY,
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
from utils.astro.spectra import LowResolution
from utils.data.dataset import IMAGE_FILES, SpectraDataset, check_finite, open_survey
from utils.data.survey import configured_dataset, subset
from utils.errors import UserError

logger = logging.getLogger(__name__)


#: the stages whose networks model full spectra (a ranker of either ranks full spectra)
FULL_STAGES = ("single", "super")


def load_trained(path: str | Path | None, default_dir: Path, what: str, kind: str,
                 stages: tuple[str, ...] | None = None) -> tuple[dict, dict, Path, dict]:
    """``(run config, weights, checkpoint path, run info)`` of a trained model of ``kind``, from a
    run folder (its best checkpoint, else its latest), a checkpoint file alone, or the newest
    finished run in ``default_dir`` (of one of the cascade ``stages``). The configuration is the
    one saved in the checkpoint; the run info also holds what the run computed once
    (``mean_train_spectrum`` for diffusion runs, the training grid)."""
    run = Path(path) if path else newest_finished_run(default_dir, what, stages)
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
class LowStage:
    """The cascade's first stage (SPEC 5): the low-stage diffusion model and (for generation) its
    ranker, with where they came from; :func:`build_low_stage` builds them for a full grid."""

    gen_cfg: dict
    gen_path: Path
    gen_weights: dict
    gen_grid: np.ndarray | None = None
    con_cfg: dict | None = None
    con_path: Path | None = None
    con_weights: dict | None = None
    con_grid: np.ndarray | None = None
    denoiser: torch.nn.Module | None = None
    contrastive: torch.nn.Module | None = None
    diffusion: GaussianDiffusion | None = None
    low: LowResolution | None = None  # of the full grid
    upsample: torch.Tensor | None = None  # (L, L_low): full = low @ upsample.T

    @property
    def level_steps(self) -> int:
        return self.diffusion.num_timesteps


@dataclass
class TrainedPair:
    """The two trained networks generate.py needs, with where they came from; a super-stage
    diffusion model comes with its cascade's first stage (``low_stage``)."""

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
    low_stage: LowStage | None = None


def require_stage(config: dict, path: Path, stages: tuple[str, ...], what: str, key: str) -> None:
    """Refuse, naming ``key``, a model of another cascade stage than ``stages``."""
    stage = config["model"]["stage"]
    if stage not in stages:
        raise UserError(f"{key} '{path}' is a {stage}-stage {what}, expected a {' or '.join(stages)}-stage one")


def find_models(config: dict) -> TrainedPair:
    """Locate both trained models (config paths or newest finished runs of full spectra) and check
    that they fit the configured data; a super-stage diffusion model brings its low stage
    (:func:`find_low_stage` with ``sampling.low_run`` and ``sampling.low_contrastive_run``)."""
    s = config["sampling"]
    gen_cfg, gen_w, gen_path, gen_info = load_trained(s["generative_run"], Path(config["run"]["out_dir"]),
                                                      "diffusion model", "generative", FULL_STAGES)
    require_stage(gen_cfg, gen_path, FULL_STAGES, "diffusion model", "sampling.generative_run")
    con_cfg, con_w, con_path, con_info = load_trained(s["contrastive_run"], default_runs("contrastive"),
                                                      "contrastive network", "contrastive", FULL_STAGES)
    require_stage(con_cfg, con_path, FULL_STAGES, "contrastive network", "sampling.contrastive_run")
    check_compatible(config["data"], gen_cfg["data"], con_cfg["data"], gen_path, con_path)
    pair = TrainedPair(gen_cfg, con_cfg, gen_path, con_path, gen_w, con_w,
                       mean_train_spectrum=gen_info.get(MEAN_SPECTRUM_KEY), gen_grid=gen_info.get(GRID_KEY),
                       con_grid=con_info.get(GRID_KEY))
    if gen_cfg["model"]["stage"] == "super":
        pair.low_stage = find_low_stage(s["low_run"], s["low_contrastive_run"], config["data"], gen_cfg, gen_path,
                                        Path(config["run"]["out_dir"]))
    return pair


def find_low_stage(low_run: str | None, low_contrastive_run: str | None | bool, data: dict, super_cfg: dict,
                   super_path: Path | str, runs: Path) -> LowStage:
    """The low stage of the super-stage model ``super_cfg`` (``super_path``): the diffusion run
    ``low_run`` (default: the newest finished low-stage run under ``runs``) and, unless
    ``low_contrastive_run`` is False, its ranker (default: the newest finished low-stage
    contrastive run). Both must be low-stage models of the super stage's low resolution, trained
    on data prepared like ``data``."""
    gen_cfg, gen_w, gen_path, gen_info = load_trained(low_run, runs, "low-stage diffusion model", "generative",
                                                      ("low",))
    require_stage(gen_cfg, gen_path, ("low",), "diffusion model", "sampling.low_run")
    check_compatible(data, gen_cfg["data"], gen_cfg["data"], gen_path, gen_path)
    stage = LowStage(gen_cfg, gen_path, gen_w, gen_info.get(GRID_KEY))
    models = [(gen_cfg, gen_path)]
    if low_contrastive_run is not False:
        con_cfg, con_w, con_path, con_info = load_trained(low_contrastive_run, default_runs("contrastive"),
                                                          "low-stage contrastive network", "contrastive", ("low",))
        require_stage(con_cfg, con_path, ("low",), "contrastive network", "sampling.low_contrastive_run")
        check_compatible(data, gen_cfg["data"], con_cfg["data"], gen_path, con_path)
        stage.con_cfg, stage.con_path, stage.con_weights, stage.con_grid = (con_cfg, con_path, con_w,
                                                                            con_info.get(GRID_KEY))
        models.append((con_cfg, con_path))
    for cfg, path in models:
        for key in ("low_factor", "low_reduction"):
            if cfg["model"][key] != super_cfg["model"][key]:
                raise UserError(f"model.{key} of the low stage '{path}' is {cfg['model'][key]!r}, of the super stage "
                                f"'{super_path}' {super_cfg['model'][key]!r}: a cascade's stages must share it")
    return stage


def check_grid(pair: TrainedPair, loglam: np.ndarray, where: str) -> None:
    """Every network must have been trained on the wavelength grid ``loglam`` ``(L,)`` (log10 A)
    that the spectra are generated on (``where`` names its dataset), a low stage on its low
    resolution; networks whose checkpoints do not record their grid are taken at their word."""
    checks = [(pair.gen_grid, "diffusion model", pair.gen_path, loglam),
              (pair.con_grid, "contrastive network", pair.con_path, loglam)]
    low = pair.low_stage
    if low is not None:
        m = low.gen_cfg["model"]
        low_loglam = LowResolution(len(loglam), m["low_factor"], m["low_reduction"]).coordinate(loglam)
        checks += [(low.gen_grid, "low-stage diffusion model", low.gen_path, low_loglam),
                   (low.con_grid, "low-stage contrastive network", low.con_path, low_loglam)]
    for grid, what, path, expected in checks:
        if grid is None:
            continue
        grid = np.asarray(grid)
        if grid.shape != np.shape(expected) or not np.allclose(grid, expected, rtol=0, atol=1e-6):
            shown = lambda g: f"{len(g)} pixels, {10 ** g[0]:.1f}-{10 ** g[-1]:.1f} A"  # noqa: E731
            raise UserError(f"the {what} ({path}) was trained on another wavelength grid ({shown(grid)}) than "
                            f"{where} gives ({shown(np.asarray(expected))}): use the models of that data, or its "
                            f"data.root and data.downsample")


def warm_start_image_encoder(model: ConditionalUNet1D, source: str, image: str, image_depth: int,
                             image_width: int, stage: str = "single") -> Path:
    """Copy a trained contrastive network's image encoder into the diffusion model's condition
    encoder before training (``model.image_init``), which then trains on jointly as before.

    ``source`` is 'contrastive' (the newest finished run of the diffusion model's cascade
    ``stage`` in the contrastive runs folder: a stage's ranker saw the spectra that stage models)
    or a contrastive run folder or checkpoint file. The two encoders must be the same ResNet
    (``image_depth``, ``image_width``) on the same ``image`` bands; the contrastive projection head
    is not copied. Returns the checkpoint used.
    """
    if getattr(model, "image_encoder", None) is None:
        raise UserError("model.image_init needs an image encoder to initialise: model.conditioning is 'none'")
    con_cfg, weights, path, _ = load_trained(None if source == "contrastive" else source,
                                             default_runs("contrastive"), "contrastive network", "contrastive",
                                             (stage,) if source == "contrastive" else None)
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


def build_denoiser(config: dict, weights: dict, path: Path, n_pixels: int, n_channels: int,
                   device: torch.device) -> torch.nn.Module:
    """The trained diffusion model of a run's configuration and weights, on ``device``, in eval
    mode."""
    net = build_generative_model(config["model"], n_pixels, n_channels, config["train"]["cond_noise"] > 0)
    load_weights(net, weights, path, "diffusion model")
    return net.to(device).eval()


def build_models(pair: TrainedPair, n_pixels: int, n_channels: int, device: torch.device) -> TrainedPair:
    """Build both networks from their own run configs, load the weights, move them to ``device``."""
    pair.denoiser = build_denoiser(pair.gen_cfg, pair.gen_weights, pair.gen_path, n_pixels, n_channels, device)
    pair.contrastive = build_ranker(pair.con_cfg, pair.con_weights, pair.con_path, n_channels, device)
    pair.diffusion = build_diffusion(pair.gen_cfg["diffusion"])
    if pair.low_stage is not None:
        build_low_stage(pair.low_stage, n_pixels, n_channels, device)
    return pair


def build_ranker(config: dict, weights: dict, path: Path, n_channels: int, device: torch.device) -> torch.nn.Module:
    """A trained contrastive network on ``device``, in eval mode."""
    net = build_contrastive_model(config["model"], n_channels, image_weights=False)
    load_weights(net, weights, path, "contrastive network")
    return net.to(device).eval()


def build_low_stage(stage: LowStage, n_pixels: int, n_channels: int, device: torch.device) -> LowStage:
    """Build a cascade's low stage for full spectra of ``n_pixels``: its networks on ``device``
    and the low resolution with its interpolation back onto the full grid."""
    m = stage.gen_cfg["model"]
    stage.low = LowResolution(n_pixels, m["low_factor"], m["low_reduction"])
    stage.upsample = torch.from_numpy(stage.low.upsample_matrix()).to(device)
    stage.denoiser = build_denoiser(stage.gen_cfg, stage.gen_weights, stage.gen_path, stage.low.n_low, n_channels,
                                    device)
    stage.diffusion = build_diffusion(stage.gen_cfg["diffusion"])
    if stage.con_cfg is not None:
        stage.contrastive = build_ranker(stage.con_cfg, stage.con_weights, stage.con_path, n_channels, device)
    return stage


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

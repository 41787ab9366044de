"""Build the networks and the diffusion process from a resolved configuration.

One place for what the trainers, generate.py, the benchmarks and the tests construct (the shape
of improved-diffusion's ``script_util``); entry scripts are never imported.
"""
from __future__ import annotations

import logging
from pathlib import Path

from models.contrastive import ContrastiveModel, build_contrastive
from models.diffusion import GaussianDiffusion
from models.unet import ConditionalUNet1D
from utils.errors import ConfigError, UserError
from utils.photometry import N_FEATURES

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
#: the parameter files of the two trainers (generate.py reads the generative one)
CONTRASTIVE_PARAMS = ROOT / "params_contrastive.yml"
GENERATIVE_PARAMS = ROOT / "params_generative.yml"


def build_contrastive_model(config: dict, in_channels: int) -> ContrastiveModel:
    """The contrastive image-spectrum network of ``params_contrastive.yml``'s ``model`` section."""
    m = config["model"]
    model = build_contrastive(in_channels, m["image_depth"], m["image_width"], m["spectrum_width"],
                              tuple(m["spectrum_mults"]), m["latent_dim"])
    if m["image_weights"]:
        try:
            skipped = model.image_encoder.load_weights(m["image_weights"])
        except (OSError, RuntimeError, ValueError) as err:
            raise UserError(f"model.image_weights '{m['image_weights']}' cannot be loaded: {err}") from None
        logger.info("image encoder weights from %s (not loaded: %s)", m["image_weights"], ", ".join(skipped) or "none")
    return model


def build_generative_model(config: dict, length: int, image_channels: int) -> ConditionalUNet1D:
    """The conditional UNet of ``params_generative.yml``'s ``model`` section for ``length`` pixels."""
    m = config["model"]
    try:
        return ConditionalUNet1D(length, image_channels, width=m["width"], mults=tuple(m["mults"]),
                                 attn_levels=tuple(m["attn_levels"]), head_dim=m["head_dim"],
                                 conditioning=m["conditioning"], image_depth=m["image_depth"],
                                 image_width=m["image_width"], context_pos=m.get("context_pos", False),
                                 grad_checkpoint=m["grad_checkpoint"], cond_drop=m.get("cond_drop", 0.0),
                                 global_context=m.get("global_context", False),
                                 photometry=N_FEATURES if m.get("photometry", False) else 0)
    except ValueError as err:
        raise ConfigError(f"model settings: {err}") from None


def build_diffusion(config: dict) -> GaussianDiffusion:
    d = config["diffusion"]  # runs saved before the prediction and shift keys existed: eps, no shift
    return GaussianDiffusion.from_config(d["schedule"], d["timesteps"], d.get("prediction", "eps"), d.get("shift", 1.0))


def clip_value(config: dict) -> float | None:
    """x_0 estimates are clipped to [-1, 1] for the 'scale' preprocessing, whose data lie there."""
    return 1.0 if config["data"]["preprocessing"] == "scale" else None



"""Build the networks and the diffusion process from a resolved configuration's sections.

One place for what the trainers, generate.py, the benchmarks and the tests construct (the shape
of improved-diffusion's ``script_util``); entry scripts are never imported. Everything below the
builders takes values, not the configuration.
"""
from __future__ import annotations

import logging

from models.contrastive import ContrastiveModel, build_contrastive
from models.diffusion import GaussianDiffusion
from models.unet import ConditionalUNet1D
from utils.errors import ConfigError, UserError

logger = logging.getLogger(__name__)


def build_contrastive_model(model: dict, in_channels: int, image_weights: bool = True) -> ContrastiveModel:
    """The contrastive image-spectrum network of a ``model`` section; ``image_weights`` False skips
    ``model.image_weights`` (a trained network's own weights are loaded instead)."""
    net = build_contrastive(in_channels, model["image_depth"], model["image_width"], model["spectrum_width"],
                            latent_dim=model["latent_dim"])
    if image_weights and model["image_weights"]:
        try:
            skipped = net.image_encoder.load_weights(model["image_weights"])
        except (OSError, RuntimeError, ValueError) as err:
            raise UserError(f"model.image_weights '{model['image_weights']}' cannot be loaded: {err}") from None
        logger.info("image encoder weights from %s (not loaded: %s)", model["image_weights"],
                    ", ".join(skipped) or "none")
    return net


def build_generative_model(model: dict, length: int, image_channels: int, noise_level: bool = False
                           ) -> ConditionalUNet1D:
    """The conditional UNet of a generative ``model`` section for ``length`` pixels; a super-stage
    network takes its low-resolution input as a second channel, and with ``noise_level`` (trained
    with ``train.cond_noise`` > 0) that input's noise level."""
    try:
        return ConditionalUNet1D(length, image_channels, width=model["width"], mults=tuple(model["mults"]),
                                 attn_levels=tuple(model["attn_levels"]), conditioning=model["conditioning"],
                                 image_depth=model["image_depth"], image_width=model["image_width"],
                                 context_pos=model["context_pos"], grad_checkpoint=model["grad_checkpoint"],
                                 cond_drop=model["cond_drop"], low_channel=model["stage"] == "super",
                                 noise_level=noise_level)
    except ValueError as err:
        raise ConfigError(f"model settings: {err}") from None


def build_diffusion(diffusion: dict) -> GaussianDiffusion:
    """The diffusion process of a ``diffusion`` section."""
    return GaussianDiffusion.from_schedule(diffusion["schedule"], diffusion["timesteps"], diffusion["prediction"])


def clip_value(preprocessing: str) -> float | None:
    """x_0 estimates are clipped to [-1, 1] for the 'scale' preprocessing, whose data lie there."""
    return 1.0 if preprocessing == "scale" else None

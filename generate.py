"""Generate, rank, evaluate and export spectra (SPEC section 4).

    python generate.py [--preset quick] [section.key=value ...]

Loads the diffusion model (EMA weights) and the contrastive network, by default from the newest
finished runs in runs/generative and runs/contrastive, and draws ``sampling.n_samples`` spectra per
galaxy, ranked by the contrastive similarity to the galaxy's image. On galaxies whose true spectra
are known (a split, or a catalog with spectra) it measures the samples' errors and physics against
honest baselines (utils.split_run); on a catalog of images without spectra it writes a property
catalogue, streamed in shards (utils.catalog_run). Outputs go to ``sampling.out_dir/<time>/``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from utils import split_run
from utils.config import load_config
from utils.data.survey import load_survey
from utils.errors import cli
from utils.generation import build_models, find_models, generation_set
from utils.runtime import default_device, keep_freed_memory

logger = logging.getLogger("generate")


def run(config: dict) -> Path:
    pair = find_models(config)
    survey = load_survey(config["data"])
    dataset, known = generation_set(config, survey)
    device = default_device()
    pair = build_models(pair, dataset.n_pixels, dataset.n_channels, device)
    return split_run.run(config, pair, survey, dataset, device)


def main(argv: Sequence[str]) -> None:
    config = load_config("generative", argv)
    keep_freed_memory()
    run(config)


if __name__ == "__main__":
    cli(main)

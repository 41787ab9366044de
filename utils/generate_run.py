"""One generate.py run: find the models, choose the galaxies, and evaluate a split
(utils.split_run) or predict for a catalogue of images only (utils.catalog_run), in one process or
in each process of a torchrun / ignite.distributed launch."""
from __future__ import annotations

import logging
from pathlib import Path

import ignite.distributed as idist

from utils import catalog_run, split_run
from utils.data.dataset import open_survey
from utils.data.survey import load_survey
from utils.errors import ConfigError, UserError
from utils.trained import build_models, catalog_set, check_grid, find_models, split_set

logger = logging.getLogger(__name__)


def run(config: dict) -> Path:
    pair = find_models(config)
    survey = load_survey(config["data"])
    catalog = config["sampling"]["catalog"]
    images = open_survey(catalog, check_values=False, need_spectra=False) if catalog else None
    device = idist.device()
    if images is not None and not images.has_spectra:
        dataset = catalog_set(config, survey, images)
        check_grid(pair, dataset.loglam, f"data.root '{survey.root}'")
        return catalog_run.run(config, build_models(pair, dataset.n_pixels, dataset.n_channels, device), survey,
                               dataset)
    if idist.get_world_size() > 1:
        raise UserError("several processes share the prediction for a catalogue of images only (sampling.catalog); "
                        "evaluate a split or a catalogue with spectra in one process")
    if config["run"]["resume"]:
        raise ConfigError("config key 'run.resume': continues a catalogue prediction (sampling.catalog of images "
                          "only); an evaluation is run anew")
    dataset = split_set(config, survey)
    check_grid(pair, dataset.loglam, f"'{dataset.survey.root}'")
    pair = build_models(pair, dataset.n_pixels, dataset.n_channels, device)
    return split_run.run(config, pair, survey, dataset, device)


def _process(local_rank: int, config: dict) -> None:
    run(config)


def launch(config: dict) -> None:
    """:func:`run` in one process, or in each process of a launch with ``run.backend``."""
    backend = None if config["run"]["backend"] == "none" else config["run"]["backend"]
    with idist.Parallel(backend=backend) as parallel:
        parallel.run(_process, config)

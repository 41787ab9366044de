"""The one place that opens a survey from a configuration's ``data`` section, and the fixed
subsets of it that training, generation and the benchmarks work on.

Everything that reads a dataset because a configuration says so comes through here: the
trainers, generate.py and the bench scripts. Below it, functions take the opened
:class:`~utils.data.dataset.Survey` and :class:`~utils.data.dataset.SpectraDataset` values.
"""
from __future__ import annotations

import ignite.distributed as idist
import numpy as np

from utils.data.dataset import SpectraDataset, Stage, Survey, open_survey


def load_survey(data: dict) -> Survey:
    """Open the dataset of ``data`` (a configuration's ``data`` section); when its source is the
    mock survey and the folder is missing, generate it first (on rank 0, the others wait)."""
    if data["source"] == "mock" and idist.get_rank() == 0:
        from utils.data.mock import ensure_mock  # here, not at the top: the mock's imports cost every script ~1 s

        ensure_mock(data["root"], data["mock_objects"], data["mock_seed"], ugriz=data["image"] == "ugriz",
                    grid=data["mock_grid"])
    if idist.get_world_size() > 1:
        idist.barrier()
    return open_survey(data["root"])


def configured_dataset(survey: Survey, split: str | None, data: dict, train: bool = False, **kwargs) -> SpectraDataset:
    """The :class:`SpectraDataset` of one ``split`` that ``data`` describes (image bands, binning,
    preprocessing); ``train`` turns on the training augmentation."""
    return SpectraDataset(survey, split, data["image"], data["preprocessing"], data["downsample"], train=train,
                          **kwargs)


def stage_of(model: dict) -> Stage:
    """The :class:`Stage` of a configuration's ``model`` section."""
    return Stage(model["stage"], model["low_factor"], model["low_reduction"])


def subset_rows(rows: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """A fixed random subset of ``n`` of ``rows``, sorted (all of them when ``n`` is larger)."""
    if n >= len(rows):
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, size=n, replace=False))


def subset(dataset: SpectraDataset, n: int, seed: int = 0) -> SpectraDataset:
    """A fixed random subset of ``n`` rows of ``dataset`` (all rows when ``n`` is larger)."""
    return dataset if n >= len(dataset) else dataset.like(subset_rows(dataset.rows, n, seed))

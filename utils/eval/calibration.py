"""Calibrated intervals from the samples: split-conformal widening fitted on validation.

A diffusion model's samples can be too narrow (SPEC section 4's 10-step DDIM sampler, a model
that has not learnt the full spread of the spectra). The samples themselves are left alone; the
*intervals* a user reads off them are widened. For a quantity q (a pixel, the redshift, an
equivalent width) and a nominal level l, the interval is the central l interval of the samples,
each side stretched about the samples' median by one factor c:

    [med - c (med - lo_l), med + c (hi_l - med)]

c is fitted on galaxies of the validation split, never on those evaluated: each validation
galaxy's score is the smallest c whose interval holds its truth, and c is their
ceil((n + 1) l) / n empirical quantile, which gives at least l coverage on exchangeable new
galaxies and at most l + 1 / (n + 1) in expectation (split conformal prediction; Vovk et al.
2005, Lei et al. 2018). Pixels share one factor per level, fitted on all pixels of all validation
galaxies. A factor above 1 says the samples were too narrow, below 1 too wide.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from utils.astro.science import RedshiftFitter, measure
from utils.eval.metrics import COVERAGE_LEVELS, median_and_interval, reference_values, sample_properties

#: the levels a calibration is fitted at: the reported ones and the coverage figure's grid
CALIBRATION_LEVELS = tuple(sorted({*COVERAGE_LEVELS, *(round(x, 2) for x in np.linspace(0.1, 0.9, 9))}))
#: the quantity name of the per-pixel intervals
PIXELS = "pixels"


def widening_scores(samples: np.ndarray, truth: np.ndarray, level: float) -> np.ndarray:
    """For each truth ``(G, ...)``, the smallest factor by which the central ``level`` interval of
    its samples ``(G, N, ...)`` must be stretched about their median to hold it: 0 at the
    median, 1 on the interval's edge, inf beyond a side of zero width, NaN where the truth or
    every sample is not finite."""
    med, lo, hi = median_and_interval(samples, level)
    truth = np.asarray(truth, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        below = np.where(truth < med, (med - truth) / (med - lo), 0.0)
        above = np.where(truth > med, (truth - med) / (hi - med), 0.0)
    unbounded = {"nan": np.inf, "posinf": np.inf}  # x / 0: the truth beyond a side of zero width
    score = np.maximum(np.nan_to_num(below, **unbounded), np.nan_to_num(above, **unbounded))
    return np.where(np.isfinite(truth) & ~np.isnan(lo) & ~np.isnan(hi), score, np.nan)


def conformal_factor(scores: np.ndarray, level: float) -> float:
    """The ceil((n + 1) level)-th smallest of the n finite-or-infinite scores (NaNs left out): the
    split-conformal factor; inf when there are too few scores for the level."""
    scores = np.sort(np.asarray(scores, dtype=np.float64)[~np.isnan(scores)], axis=None)
    rank = math.ceil((len(scores) + 1) * level)
    return float(scores[rank - 1]) if 0 < rank <= len(scores) else math.inf


@dataclass
class Calibration:
    """Widening factors ``{quantity: {level: factor}}`` fitted on ``n_galaxies`` of ``split``."""

    factors: dict = field(default_factory=dict)
    n_galaxies: int = 0
    split: str = "val"

    def factor(self, quantity: str, level: float) -> float:
        """The fitted factor, 1 (the samples' own interval) for a quantity or level not fitted."""
        return self.factors.get(quantity, {}).get(round(level, 2), 1.0)

    def to_dict(self) -> dict:
        """For metrics.json: unbounded factors as None (JSON has no infinity)."""
        return {"split": self.split, "n_galaxies": self.n_galaxies,
                "method": "split conformal: central sample intervals widened about the median",
                "factors": {q: {f"{lv:.2f}": (f if math.isfinite(f) else None) for lv, f in by_level.items()}
                            for q, by_level in self.factors.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration":
        return cls({q: {round(float(lv), 2): (math.inf if f is None else float(f)) for lv, f in by_level.items()}
                    for q, by_level in data["factors"].items()}, int(data["n_galaxies"]), data["split"])


def uncalibrated() -> Calibration:
    """No widening: every factor is 1, the samples' own intervals."""
    return Calibration()


def fit_calibration(sample_props: dict, truth: dict, samples_pre: np.ndarray | None = None,
                    truth_pre: np.ndarray | None = None, levels=CALIBRATION_LEVELS, split: str = "val") -> Calibration:
    """Fit the factors of every property in both ``sample_props`` ``{name: (G, N)}`` and ``truth``
    ``{name: (G,)}``, and of the pixels from ``samples_pre`` ``(G, N, L)`` and ``truth_pre``
    ``(G, L)`` (preprocessed units), at each of ``levels``."""
    pairs = {name: (values, truth[name]) for name, values in sample_props.items()
             if name in truth and np.asarray(values).dtype.kind == "f"}
    if samples_pre is not None and truth_pre is not None:
        pairs[PIXELS] = (samples_pre, truth_pre)
    factors = {name: {round(lv, 2): conformal_factor(widening_scores(s, t, lv), lv) for lv in levels}
               for name, (s, t) in pairs.items()}
    n = len(next(iter(pairs.values()))[1]) if pairs else 0
    return Calibration(factors, n, split)


def calibration_inputs(samples: np.ndarray, wave: np.ndarray, truth: np.ndarray, catalog,
                       weights: np.ndarray | None = None) -> tuple[dict, dict]:
    """The samples' properties ``{name: (G, N)}`` and the reference values ``{name: (G,)}`` they
    are judged against, measured like :func:`science_report` does: samples ``(G, N, L)`` and
    truth ``(G, L)`` in flux units, the galaxies' catalog rows, the redshift fit's ``weights``."""
    fitter = RedshiftFitter(wave, weights=weights)
    reference, _ = reference_values(measure(truth, wave, fitter=fitter).table(), catalog)
    return sample_properties(samples, wave, fitter), reference


def calibrate(samples: np.ndarray, wave: np.ndarray, truth: np.ndarray, samples_pre: np.ndarray,
              truth_pre: np.ndarray, catalog, weights: np.ndarray | None = None, split: str = "val") -> Calibration:
    """Fit the interval calibration (utils.eval.calibration) on galaxies whose truth is known and that
    are not evaluated (the validation split): their samples ``(G, N, L)`` and truth ``(G, L)`` in
    flux and preprocessed units (see :func:`calibration_inputs`)."""
    props, reference = calibration_inputs(samples, wave, truth, catalog, weights)
    return fit_calibration(props, reference, samples_pre, truth_pre, split=split)

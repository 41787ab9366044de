"""Calibrated intervals (utils.eval.calibration): split-conformal widening fitted on some galaxies
restores the nominal coverage on others, and the science report uses it where given."""
from __future__ import annotations

import math

import numpy as np
import pytest

from utils.eval.calibration import (
    CALIBRATION_LEVELS,
    Calibration,
    conformal_factor,
    fit_calibration,
    uncalibrated,
    widening_scores,
)
from utils.eval.metrics import central_interval, interval_coverage


def gaussian_survey(n_galaxies, n_samples, spread, seed, shape=()):
    """Truths ~ N(mu, 1) and samples ~ N(mu, spread^2) around a per-galaxy mu known to the model."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(0, 3, (n_galaxies, *shape))
    truth = mu + rng.normal(size=mu.shape)
    samples = mu[:, None] + spread * rng.normal(size=(n_galaxies, n_samples, *shape))
    return samples, truth


@pytest.mark.parametrize("spread", [0.5, 2.0])
def test_widening_fitted_on_some_galaxies_calibrates_others(spread):
    """Samples half (twice) as wide as the truth's scatter: the intervals cover far too little
    (much), the fitted factor is about 2 (1/2), and fresh galaxies are covered at the nominal level."""
    fit_samples, fit_truth = gaussian_survey(3000, 50, spread, seed=1)
    samples, truth = gaussian_survey(3000, 50, spread, seed=2)
    calibration = fit_calibration({"z": fit_samples}, {"z": fit_truth})
    assert calibration.n_galaxies == 3000
    assert set(calibration.factors["z"]) == set(CALIBRATION_LEVELS)
    for level in (0.68, 0.90):
        raw = interval_coverage(samples, truth, level)
        assert abs(raw - level) > 0.09  # miscalibrated before
        factor = calibration.factor("z", level)
        scatter = math.sqrt(1 + (1.2533 * spread) ** 2 / 50)  # the truth about the median of 50 samples
        assert factor == pytest.approx(scatter / spread, rel=0.1)
        assert interval_coverage(samples, truth, level, factor) == pytest.approx(level, abs=0.025)


def test_pixels_share_one_factor_per_level():
    fit_samples, fit_truth = gaussian_survey(200, 40, 0.5, seed=3, shape=(30,))
    calibration = fit_calibration({}, {}, fit_samples, fit_truth)
    assert set(calibration.factors) == {"pixels"}
    samples, truth = gaussian_survey(200, 40, 0.5, seed=4, shape=(30,))
    covered = interval_coverage(samples, truth, 0.9, calibration.factor("pixels", 0.9))
    assert covered == pytest.approx(0.9, abs=0.02)
    assert interval_coverage(samples, truth, 0.9) < 0.7


def test_scores_at_the_edges():
    samples = np.array([[[0.0], [1.0], [2.0], [3.0], [4.0]]])[..., 0]  # one galaxy, median 2
    lo, hi = central_interval(samples, 0.5)
    assert (lo[0], hi[0]) == (1.0, 3.0)
    scores = widening_scores(np.repeat(samples, 4, 0), np.array([2.0, 3.0, 0.0, np.nan]), 0.5)
    assert scores[:3].tolist() == [0.0, 1.0, 2.0]
    assert np.isnan(scores[3])  # NaN truth: left out
    flat = np.ones((2, 5))  # all samples agree: a zero-width interval
    assert widening_scores(flat, np.array([1.0, 1.5]), 0.68).tolist() == [0.0, math.inf]
    assert conformal_factor(np.array([0.5, np.nan, 1.0, 2.0]), 0.5) == 1.0  # ceil(4 * 0.5) = 2nd of 3
    assert conformal_factor(np.array([0.5, 1.0]), 0.9) == math.inf  # too few galaxies for the level
    # an unbounded factor makes an unbounded interval, which holds every finite truth
    assert interval_coverage(flat, np.array([1.0, 7.0]), 0.68, math.inf) == 1.0


def test_calibration_survives_json():
    import json

    calibration = Calibration({"z": {0.68: 1.7, 0.9: math.inf}, "pixels": {0.68: 0.8}}, 300, "val")
    text = json.dumps(calibration.to_dict())  # strict JSON: no Infinity
    assert "Infinity" not in text
    again = Calibration.from_dict(json.loads(text))
    assert again == calibration
    assert again.factor("z", 0.9) == math.inf
    assert again.factor("dn4000", 0.68) == 1.0
    assert uncalibrated().factor("z", 0.68) == 1.0


def test_science_report_writes_calibrated_intervals_and_reports_both_coverages():
    """science_report with a calibration: the 68% columns are widened by its factors, the
    reported coverage is the widened intervals', the samples' own coverage sits beside it."""
    from utils.astro.spectra import block_grid, neurips_loglam
    from utils.astro.templates import TemplateSpectra
    from utils.eval.report import science_report

    wave = 10 ** block_grid(neurips_loglam(), 16)
    rng = np.random.default_rng(0)
    g, n = 12, 6
    z = rng.uniform(0.05, 0.2, g)
    truth = TemplateSpectra().observed(z, rng.uniform(0, 1, (g, 5)), np.log10(wave))
    truth *= 10 / np.median(truth, 1, keepdims=True)
    samples = truth[:, None] * rng.uniform(0.8, 1.2, (g, n, 1)) + rng.normal(0, 0.3, (g, n, len(wave)))
    calibration = Calibration({"z": {0.68: 3.0, 0.9: 2.0}, "dn4000": {0.68: 0.5}, "pixels": {0.68: 2.0, 0.9: 1.5}},
                              40, "val")
    plain = science_report(samples, wave, truth, samples, truth, n_boot=5)
    widened = science_report(samples, wave, truth, samples, truth, n_boot=5, calibration=calibration)
    for prop, factor in (("z", 3.0), ("dn4000", 0.5), ("ew_halpha", 1.0)):
        med = plain.columns[f"{prop}_gen"]
        assert np.allclose(widened.columns[f"{prop}_gen"], med, equal_nan=True)
        for side in ("lo", "hi"):
            expected = med + factor * (plain.columns[f"{prop}_gen_{side}"] - med)
            assert np.allclose(widened.columns[f"{prop}_gen_{side}"], expected, equal_nan=True), (prop, side)
    stats, before = widened.summary["predictors"]["samples"], plain.summary["predictors"]["samples"]
    assert stats["coverage68_pixels"][0] == pytest.approx(interval_coverage(samples, truth, 0.68, 2.0))
    assert stats["coverage90_pixels"][0] == pytest.approx(interval_coverage(samples, truth, 0.9, 1.5))
    for key in ("coverage68_pixels", "coverage90_z", "coverage68_dn4000"):
        assert stats[f"{key}_raw"] == before[key]
        assert f"{key}_raw" not in before
    assert stats["coverage68_pixels"][0] > before["coverage68_pixels"][0]
    assert widened.summary["calibration"]["factors"]["z"]["0.68"] == 3.0
    assert "interval coverage: pixels (raw)" in widened.table
    assert "(raw)" not in plain.table
    assert stats["mse"] == before["mse"]  # the samples themselves are unchanged


def test_coverage_of_a_property_nobody_measured_is_nan_without_a_warning():
    """A property the grid cannot measure (all NaN) has no coverage, and says so quietly: the
    quickstart's output must not print numpy's 'Mean of empty slice'."""
    import warnings

    samples = np.full((4, 5), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(interval_coverage(samples, np.full(4, np.nan), 0.68))
    assert interval_coverage(np.tile(np.arange(5.0), (4, 1)), np.full(4, 2.0), 0.68) == 1.0

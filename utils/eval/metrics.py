"""Ranking generated spectra and scoring them against the truth (SPEC section 4), the statistics
of physical properties against a truth, what that truth is, and putting spectra without a
measured counterpart on a flux scale from photometry."""
from __future__ import annotations

import warnings

import astropy.units as u
import numpy as np

from utils.astro.science import PROPERTIES, RedshiftFitter, measure

#: metric names written to metrics.json and the console table, with their meaning
METRICS = {
    "mse_mean": "MSE of the mean of all N samples",
    "mse_contrastive": "MSE of the top-ranked sample",
    "mse_contrastive_mean": "MSE of the mean of the top-k samples",
    "mse_random_sample": "MSE of one sample picked at random",
    "mse_mean_train_spectrum": "MSE of the mean training spectrum",
}


def rank(scores: np.ndarray) -> np.ndarray:
    """Indices ``(G, N)`` ordering each galaxy's samples from the highest score to the lowest.

    NaN scores rank last (a broken embedding never wins).
    """
    safe = np.where(np.isfinite(scores), scores, -np.inf)
    return np.argsort(-safe, axis=1, kind="stable")


def summarise_samples(samples: np.ndarray, scores: np.ndarray, truth: np.ndarray | None, top_k: int,
                      baseline: np.ndarray | None = None, rng: np.random.Generator | None = None
                      ) -> dict[str, np.ndarray]:
    """Per-galaxy products and errors.

    Parameters
    ----------
    samples : ``(G, N, L)`` generated spectra (preprocessed units).
    scores : ``(G, N)`` contrastive similarity of each sample to its galaxy's image.
    truth : ``(G, L)`` true spectra, or None.
    top_k : how many of the best-ranked samples the 'contrastive mean' averages.
    baseline : ``(L,)`` mean training spectrum (a reference predictor).

    Returns
    -------
    dict with ``order`` ``(G, N)``, ``ranked`` ``(G, N, L)``, ``ranked_scores`` ``(G, N)``,
    ``mean`` and ``topk_mean`` ``(G, L)``; with truth also the per-galaxy ``(G,)`` arrays named
    in :data:`METRICS`.
    """
    order = rank(scores)
    ranked = np.take_along_axis(samples, order[:, :, None], axis=1)
    out = {"order": order, "ranked": ranked, "ranked_scores": np.take_along_axis(scores, order, axis=1),
           "mean": samples.mean(1), "topk_mean": ranked[:, :top_k].mean(1)}
    if truth is not None:
        mse = lambda pred: ((pred - truth) ** 2).mean(-1)  # noqa: E731
        rng = rng or np.random.default_rng(0)
        pick = rng.integers(0, samples.shape[1], size=len(samples))
        out["mse_mean"] = mse(out["mean"])
        out["mse_contrastive"] = mse(ranked[:, 0])
        out["mse_contrastive_mean"] = mse(out["topk_mean"])
        out["mse_random_sample"] = mse(samples[np.arange(len(samples)), pick])
        if baseline is not None:
            out["mse_mean_train_spectrum"] = mse(np.broadcast_to(baseline, truth.shape))
    return out


def photometric_params(x: np.ndarray, wave: np.ndarray, mag_r: np.ndarray, mag_i: np.ndarray, kind: str
                       ) -> np.ndarray:
    """Preprocessing parameters ``(G, 2)`` that put spectra without a measured counterpart on the
    flux scale of their catalog r and i magnitudes.

    ``x`` ``(G, L)`` are preprocessed spectra (e.g. the top-ranked sample); the fluxes implied by
    the parameters are linear in them, so the parameters solve a small least-squares problem
    against the r and i band fluxes synthesised with speclite's SDSS filters: for 'scale' the
    offset and span (min, max), for 'log' the norm.
    """
    import speclite.filters

    from utils.astro.spectra import deprocess

    bands = speclite.filters.load_filters("sdss2010-r", "sdss2010-i")
    target = 10 ** (-0.4 * np.stack([mag_r, mag_i], 1))  # maggies
    unit = 1e-17 * u.erg / u.s / u.cm ** 2 / u.AA

    def maggies(flux: np.ndarray) -> np.ndarray:
        padded, grid = bands.pad_spectrum(flux, wave, method="edge")
        table = bands.get_ab_maggies(padded * unit, grid * u.AA)
        return np.stack([np.asarray(table[name]) for name in table.colnames], 1)

    if kind == "log":
        base = maggies(deprocess(x, np.tile([1.0, 0.0], (len(x), 1)), kind))
        norm = (base * target).sum(1) / (base ** 2).sum(1)
        return np.stack([norm, np.zeros_like(norm)], 1)
    shape = maggies((np.asarray(x, dtype=np.float64) + 1) / 2)  # flux = lo + span * shape
    flat = maggies(np.ones_like(x, dtype=np.float64))
    params = np.zeros((len(x), 2))
    for g in range(len(x)):
        design = np.stack([flat[g], shape[g]], 1)
        lo, span = np.linalg.lstsq(design, target[g], rcond=None)[0]
        params[g] = (lo, lo + span)
    return params


def format_table(metrics: dict, top_k: int, n: int) -> str:
    """The console table of the mean metrics over ``n`` galaxies."""
    width = max(len(v) for v in METRICS.values()) + 4
    lines = [f"Evaluation over {n} galaxies (preprocessed units, lower is better)", "-" * (width + 12)]
    for key, value in metrics.items():
        label = METRICS[key].replace("top-k", f"top-{top_k}")
        lines.append(f"{label:<{width}}{value:12.5f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# statistics of physical properties (utils.astro.science) against a truth
# --------------------------------------------------------------------------------------------
#: |dz| / (1 + z) above which a redshift counts as an outlier
OUTLIER_DZ = 0.15
#: central intervals whose coverage is reported
COVERAGE_LEVELS = (0.68, 0.90)


def nmad(x: np.ndarray) -> float:
    """Normalised median absolute deviation, 1.4826 median|x - median(x)| (a robust sigma)."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(1.4826 * np.median(np.abs(x - np.median(x)))) if len(x) else float("nan")


def redshift_stats(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """sigma_NMAD, bias (median) and outlier fraction of dz / (1 + z); a NaN prediction is an outlier."""
    dz = (np.asarray(pred, float) - true) / (1 + np.asarray(true, float))
    finite = np.isfinite(dz)
    return {"sigma_nmad": nmad(dz), "bias": float(np.median(dz[finite])) if finite.any() else float("nan"),
            "outliers": float(np.mean(~finite | (np.abs(dz) > OUTLIER_DZ)))}


def property_stats(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Bias (median difference), scatter (NMAD of the difference) and Spearman rank correlation,
    over the galaxies where both are finite."""
    from scipy.stats import spearmanr

    pred, true = np.asarray(pred, float), np.asarray(true, float)
    ok = np.isfinite(pred) & np.isfinite(true)
    if ok.sum() < 3:
        return {"bias": float("nan"), "scatter": float("nan"), "corr": float("nan")}
    d = pred[ok] - true[ok]
    corr = spearmanr(pred[ok], true[ok]).statistic if np.ptp(pred[ok]) > 0 and np.ptp(true[ok]) > 0 else np.nan
    return {"bias": float(np.median(d)), "scatter": nmad(d), "corr": float(corr)}


def median_and_interval(samples: np.ndarray, level: float, factor: float = 1.0
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The median of ``samples`` along axis 1 and their central ``level`` interval ``(lo, hi)``,
    each side widened about the median by ``factor`` (1: the samples' own quantiles; a
    calibration's factor, utils.eval.calibration; inf: unbounded); NaN where every sample is NaN."""
    samples = np.asarray(samples, dtype=np.float64)
    quantile = np.nanquantile if np.isnan(samples).any() else np.quantile  # the same values; nanquantile is slow
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices
        lo, med, hi = quantile(samples, [(1 - level) / 2, 0.5, (1 + level) / 2], axis=1)
    if factor == 1.0:
        return med, lo, hi
    if not np.isfinite(factor):  # no finite widening was enough: the whole line (a zero-width side included)
        return med, np.where(np.isnan(med), np.nan, -np.inf), np.where(np.isnan(med), np.nan, np.inf)
    return med, med - factor * (med - lo), med + factor * (hi - med)


def central_interval(samples: np.ndarray, level: float, factor: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The central ``level`` interval ``(lo, hi)`` of ``samples`` along axis 1, widened by
    ``factor`` (see :func:`median_and_interval`)."""
    return median_and_interval(samples, level, factor)[1:]


def inside_interval(samples: np.ndarray, truth: np.ndarray, level: float, factor: float = 1.0) -> np.ndarray:
    """Whether each truth lies inside the central ``level`` interval of its samples (widened by
    ``factor``, see :func:`central_interval`): ``samples`` ``(G, N, ...)``, ``truth`` ``(G, ...)``;
    returns ``(G, ...)`` floats, 1 inside, 0 outside, NaN where the truth or every sample is not
    finite."""
    lo, hi = central_interval(samples, level, factor)
    ok = ~np.isnan(lo) & ~np.isnan(hi) & np.isfinite(truth)
    return np.where(ok, (truth >= lo) & (truth <= hi), np.nan)


def interval_coverage(samples: np.ndarray, truth: np.ndarray, level: float, factor: float = 1.0) -> float:
    """Share of truths inside the central ``level`` interval of their samples, widened by
    ``factor`` (see :func:`inside_interval`); non-finite entries are left out, NaN when none is
    left (a property the grid cannot measure)."""
    inside = inside_interval(samples, truth, level, factor)
    return float(np.nanmean(inside)) if np.any(np.isfinite(inside)) else float("nan")


def crps(samples: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Continuous ranked probability score of the ensemble ``samples`` ``(G, N, ...)`` for
    ``truth`` ``(G, ...)``: E|X - y| - E|X - X'| / 2, exactly for the empirical distribution; for
    one sample (a point prediction) it is the absolute error. Returns ``(G, ...)``."""
    x = np.sort(np.asarray(samples, dtype=np.float64), axis=1)
    n = x.shape[1]
    spread_weights = (2 * np.arange(1, n + 1) - n - 1).reshape((1, n) + (1,) * (x.ndim - 2))
    spread = 2 * (spread_weights * x).sum(1) / n ** 2  # E|X - X'|
    return np.abs(x - truth[:, None]).mean(1) - spread / 2


def ratio_se(values: np.ndarray, reference: np.ndarray, draws: int = 2000, seed: int = 0) -> float:
    """Bootstrap standard error over galaxies of mean(``values``) / mean(``reference``), two
    per-galaxy arrays of the same galaxies."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), (draws, len(values)))
    return float(np.std(values[idx].mean(1) / reference[idx].mean(1)))


def confusion(pred: np.ndarray, true: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts ``(n_classes, n_classes)``: rows the true class, columns the predicted one."""
    return np.bincount(np.asarray(true) * n_classes + np.asarray(pred), minlength=n_classes ** 2
                       ).reshape(n_classes, n_classes)


# --------------------------------------------------------------------------------------------
# what the samples are judged against
# --------------------------------------------------------------------------------------------
def sample_properties(samples: np.ndarray, wave: np.ndarray, fitter: RedshiftFitter) -> dict:
    """Every property of utils.astro.science measured on every sample ``(G, N, L)``: ``{name: (G, N)}``."""
    g, n, length = samples.shape
    table = measure(samples.reshape(g * n, length), wave, fitter=fitter).table()
    return {k: v.reshape(g, n) for k, v in table.items()}


def catalog_truth(catalog) -> dict:
    """Intrinsic properties a mock catalog carries (``true_<property>``, ``true_bpt``; utils.data.mock),
    by property name; empty for catalogs without them."""
    if catalog is None:
        return {}
    out = {prop: np.asarray(catalog[f"true_{prop}"], dtype=np.float64) for prop in PROPERTIES
           if f"true_{prop}" in catalog.colnames}
    if out and "true_bpt" in catalog.colnames:
        out["bpt"] = np.asarray(catalog["true_bpt"], dtype=int)
    return out


def reference_values(true_props: dict, catalog) -> tuple[dict, bool]:
    """What the samples are judged against, and whether it is a mock's intrinsic truth: the
    catalog's intrinsic properties where it has them (utils.data.mock), else ``true_props`` measured
    on the true spectra; the redshift is the catalog's."""
    known = catalog_truth(catalog)
    values = known or dict(true_props)
    if catalog is not None and "z" in catalog.colnames:
        values["z"] = np.asarray(catalog["z"], dtype=np.float64)
    return values, bool(known)

"""Which one number per property should a galaxy's N samples give, and how many samples a
correlation target needs (validation outputs only; bench/point_estimates.py is the command line).

Point estimates of each property from the N samples (the median generate.py reports, the mean,
a trimmed mean, the median of the best-ranked, one sample, the mean spectrum's value) are compared
by their Spearman correlation with the truth. The correlation of the median of n samples follows
the attenuation of a correlation by estimation noise, rho(n) = rho_inf / sqrt(1 + c / n): a
galaxy's median of n samples is its model's median plus noise of variance ~ 1/n, c is that noise's
variance per sample relative to the spread of the models' medians over the galaxies, and rho_inf
is what infinitely many samples of these models would reach.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from utils.astro.science import RedshiftFitter, measure, redshift_weights
from utils.eval.metrics import property_stats, reference_values, sample_properties
from utils.eval.outputs import read_validation_output
from utils.eval.report import CORRELATION_TARGETS


def read_output(folder: Path, root: str | None) -> dict:
    """The samples (ranked, best first), truth and reference values of one generate.py output."""
    out = read_validation_output(folder, ("samples", "true_flux", "true_ivar"), root, purpose="point estimates")
    samples = np.asarray(out.columns["samples"], np.float64)
    truth, ivar = np.asarray(out.columns["true_flux"], np.float64), np.asarray(out.columns["true_ivar"], np.float64)
    fitter = RedshiftFitter(out.wave, weights=redshift_weights(ivar))
    reference, _ = reference_values(measure(truth, out.wave, fitter=fitter).table(), out.catalog)
    return {"props": sample_properties(samples, out.wave, fitter), "mean_props": measure(samples.mean(1), out.wave,
            fitter=fitter).table(), "reference": reference, "top_k": int(out.header["TOPK"]), "n": samples.shape[1]}


def trimmed_mean(values: np.ndarray, cut: float = 0.2) -> np.ndarray:
    """``(G,)`` mean of each row's finite values of ``values`` ``(G, N)`` without the lowest and
    the highest ``cut`` share of them (floor of it); NaN for a row without finite values."""
    ordered = np.sort(values, 1)  # NaN last
    n = np.isfinite(values).sum(1, keepdims=True)
    drop = np.floor(cut * n)
    rank = np.arange(values.shape[1])[None]
    keep = (rank >= drop) & (rank < n - drop)
    with np.errstate(invalid="ignore"):
        return np.where(keep, ordered, 0.0).sum(1) / keep.sum(1)


def estimates(out: dict, prop: str) -> dict[str, np.ndarray]:
    """Point estimates ``{name: (G,)}`` of ``prop`` from the ranked samples' values ``(G, N)``."""
    values, k = out["props"][prop], out["top_k"]
    # k of the N drawn at random for each galaxy, the same draw for every property: the ranking's
    # fair comparison (a median of k is noisier than one of N whatever the ranking)
    shuffled = np.take_along_axis(values, np.random.default_rng(0).random(values.shape).argsort(1), 1)
    return {"median of all N": np.nanmedian(values, 1), "mean of all N": np.nanmean(values, 1),
            "20%-trimmed mean of all N": trimmed_mean(values),
            f"median of the top {k}": np.nanmedian(values[:, :k], 1),
            f"median of {k} at random": np.nanmedian(shuffled[:, :k], 1),
            "the top-ranked sample": values[:, 0], "one sample at random": shuffled[:, 0],
            "of the mean spectrum": out["mean_props"][prop]}


def compare_estimates(est: dict[str, np.ndarray], truth: np.ndarray, boot: int, seed: int = 0) -> dict[str, dict]:
    """Spearman correlation of each estimate with the truth, and its paired difference to the
    first estimate with a bootstrap standard error over galaxies (the correlation generate.py
    reports: utils.eval.metrics.property_stats)."""
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(truth), len(truth)) for _ in range(boot)]
    corr = lambda x, i: property_stats(x[i], truth[i])["corr"]  # noqa: E731
    every = np.arange(len(truth))
    base = next(iter(est.values()))
    base_corr, base_boot = corr(base, every), np.array([corr(base, i) for i in draws])
    result = {}
    for name, x in est.items():
        diffs = np.array([corr(x, i) for i in draws]) - base_boot
        result[name] = {"corr": float(corr(x, every)), "minus_median": float(corr(x, every) - base_corr),
                        "se": float(np.std(diffs, ddof=1))}
    return result


#: sample counts of ``--curve`` (those up to each output's N, and N itself)
CURVE_COUNTS = (1, 2, 5, 10, 25, 50, 100, 200, 400, 800)
#: the fit of ``--curve`` starts here: the median of fewer samples is not yet near-normal
FIT_MIN = 5


def attenuated(n: np.ndarray, rho_inf: float, c: float) -> np.ndarray:
    """The correlation of a median of ``n`` samples: rho_inf / sqrt(1 + c / n)."""
    return rho_inf / np.sqrt(1 + c / np.asarray(n, float))


def fit_curve(counts: np.ndarray, corr: np.ndarray) -> tuple[float, float]:
    """Least-squares ``(rho_inf, c)`` of :func:`attenuated` through ``(counts, corr)`` (c >= 0)."""
    from scipy.optimize import OptimizeWarning, curve_fit

    ok = np.isfinite(corr)
    if ok.sum() < 2:
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)  # no covariance from two points: it is not used
        (rho_inf, c), _ = curve_fit(attenuated, counts[ok], corr[ok], p0=(corr[ok][-1], 10.0),
                                    bounds=([-1.0, 0.0], [1.0, np.inf]))
    return float(rho_inf), float(c)


def samples_needed(rho_inf: float, c: float, target: float) -> float:
    """Samples per galaxy at which :func:`attenuated` reaches ``target``; inf where it never does."""
    if not (np.isfinite(rho_inf) and target < rho_inf):
        return float("inf")
    return float(c / ((rho_inf / target) ** 2 - 1))


def sample_curve(values: np.ndarray, truth: np.ndarray, boot: int, fit_max: int, draws: int = 10,
                 seed: int = 0) -> dict:
    """The correlation with ``truth`` of the median of n of each galaxy's samples ``values`` (G, N)
    for each n of :data:`CURVE_COUNTS` up to N (and N), and the fit of the module docstring, each
    with its bootstrap standard error over galaxies."""
    rng = np.random.default_rng(seed)
    n_all = values.shape[1]
    counts = np.array(sorted({n for n in CURVE_COUNTS if n < n_all} | {n_all}))
    medians = {}  # n -> (draws, G): the same random subsets on every bootstrap resample
    for n in counts:
        picks = [rng.random(values.shape).argsort(1)[:, :n] for _ in range(draws if n < n_all else 1)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a galaxy whose picked samples are all NaN
            medians[n] = np.stack([np.nanmedian(np.take_along_axis(values, p, 1), 1) for p in picks])
    fitted = (counts >= FIT_MIN) & (counts <= fit_max)

    def curve(rows: np.ndarray) -> np.ndarray:
        return np.array([np.mean([property_stats(m[rows], truth[rows])["corr"] for m in medians[n]]) for n in counts])

    every = np.arange(len(truth))
    corr = curve(every)
    rho_inf, c = fit_curve(counts[fitted], corr[fitted])
    boot_corr, boot_fit = [], []
    for _ in range(boot):
        rows = rng.integers(0, len(truth), len(truth))
        boot_corr.append(curve(rows))
        boot_fit.append(fit_curve(counts[fitted], boot_corr[-1][fitted]))
    boot_corr, boot_fit = np.array(boot_corr), np.array(boot_fit)
    se = lambda x: float(np.nanstd(x, ddof=1)) if boot > 1 else float("nan")  # noqa: E731
    return {"counts": counts.tolist(), "draws": draws, "corr": corr.tolist(),
            "se": [se(boot_corr[:, i]) for i in range(len(counts))],
            "fit_counts": counts[fitted].tolist(), "rho_inf": rho_inf, "rho_inf_se": se(boot_fit[:, 0]), "c": c,
            "predicted": attenuated(counts, rho_inf, c).tolist()}


#: the utils.eval.ceilings predictor drawn as a ceiling: the best one that sees only the noisy images
IMAGE_CEILING = "MLP: + fibre aperture"


def plot_curves(path: Path, curves: dict[str, dict], ceilings: list[dict]) -> Path:
    """One panel per property of utils.eval.report.CORRELATION_TARGETS: each output's measured curve
    (+- bootstrap SE) and its fit, the target, and each ceilings file's image-photometry network."""
    import matplotlib.pyplot as plt  # after utils.plotting, which selects the Agg backend

    from utils.plotting import save

    props = [p for p in CORRELATION_TARGETS if any(p in c for c in curves.values())]
    fig, axes = plt.subplots(1, len(props), figsize=(5.2 * len(props), 4), squeeze=False)
    for ax, prop in zip(axes[0], props):
        for i, (label, output) in enumerate(curves.items()):
            curve = output[prop]
            colour = f"C{i}"
            ax.errorbar(curve["counts"], curve["corr"], yerr=curve["se"], fmt="o", color=colour, ms=4, capsize=2,
                        label=f"{label}: rho_inf {curve['rho_inf']:.3f} +- {curve['rho_inf_se']:.3f}")
            grid = np.geomspace(curve["fit_counts"][0], 1000, 100)
            ax.plot(grid, attenuated(grid, curve["rho_inf"], curve["c"]), "-", color=colour, lw=1)
        ax.axhline(CORRELATION_TARGETS[prop], color="k", ls="--", lw=1, label=f"target {CORRELATION_TARGETS[prop]}")
        for j, ceiling in enumerate(ceilings):
            value, err = ceiling["predictors"][IMAGE_CEILING][f"{prop}_corr"]
            ax.axhspan(value - err, value + err, color=f"C{j + len(curves)}", alpha=0.15, lw=0)
            ax.axhline(value, color=f"C{j + len(curves)}", lw=1, label=f"network on the images' photometry, "
                       f"{ceiling.get('split', 'val')} galaxies: {value:.3f}")
        ax.set_xscale("log")
        ax.set_xlabel("samples per galaxy pooled (median of n)")
        name = {"dn4000": "Dn4000", "ew_halpha": "EW(H-alpha)"}.get(prop, prop)
        ax.set_ylabel(f"{name}: Spearman correlation with the truth")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save(fig, path)

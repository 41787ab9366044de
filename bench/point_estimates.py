"""Which one number per property should a galaxy's N samples give? Validation outputs only.

    python bench/point_estimates.py OUTPUT [OUTPUT ...] [--root DATA] [--boot 300] [--out FILE.json]
                                    [--curve [--fit-max 100] [--figure FILE.png] [--labels A B ...]
                                     [--ceilings bench/ceilings_val.json ...]]

Each OUTPUT is a folder generate.py wrote on the validation split (its spectra.fits and
config.yml; e.g. ``python generate.py --preset standard sampling.split=val
sampling.calibration_objects=0``). For Dn4000 and the four lines' equivalent widths it measures
every sample like generate.py does (utils.report) and compares point estimates of the N samples
by their Spearman correlation with the reference values generate.py judges against (a mock's
intrinsic truth, else the true spectrum's): the median of all N (what generate.py reports), their
mean and their mean without the lowest and highest 20%, the median of the k best-ranked by the contrastive network (the FITS header's TOPK) and of
k drawn at random (the ranking's fair comparison), the best-ranked sample alone and one drawn at
random, and the property measured on the mean spectrum of the N. Each row gives the paired difference to the median with its bootstrap
standard error over galaxies. Outputs of the test split are refused: estimators are chosen on
validation.

With ``--curve`` it also asks how many samples a galaxy needs: the correlation of the median of
n of its N samples drawn at random, for n = 1, 2, 5, ... up to N (10 draws each, the same draws
on every bootstrap resample of the galaxies), and a fit of those with n from 5 to ``--fit-max``
to rho(n) = rho_inf / sqrt(1 + c / n). That is the attenuation of a correlation by estimation
noise: a galaxy's median of n samples is its model's median plus noise of variance ~ 1/n, c is
that noise's variance per sample relative to the spread of the models' medians over the
galaxies, and rho_inf is what infinitely many samples of these models would reach (a model of
the curve, checked by the points beyond --fit-max where N allows). It reports rho_inf with its
bootstrap standard error and the samples that the correlation targets of generate.py
(utils.report.CORRELATION_TARGETS) would need. ``--figure`` draws the curves of those targets'
properties, one line per output (``--labels`` names them), with the best image-photometry
predictor of each ``--ceilings`` file (bench/ceilings.py with --regression) for comparison.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.errors import UserError  # noqa: E402
from utils.evaluation import property_stats  # noqa: E402
from utils.export import read_validation_output  # noqa: E402
from utils.report import COMPARED, CORRELATION_TARGETS, reference_values, sample_properties  # noqa: E402
from utils.science import RedshiftFitter, measure, redshift_weights  # noqa: E402


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


def compare(est: dict[str, np.ndarray], truth: np.ndarray, boot: int, seed: int = 0) -> dict[str, dict]:
    """Spearman correlation of each estimate with the truth, and its paired difference to the
    first estimate with a bootstrap standard error over galaxies (the correlation generate.py
    reports: utils.evaluation.property_stats)."""
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
    return {"counts": counts.tolist(), "draws": draws, "corr": corr.tolist(), "se": [se(boot_corr[:, i]) for i in range(len(counts))],
            "fit_counts": counts[fitted].tolist(), "rho_inf": rho_inf, "rho_inf_se": se(boot_fit[:, 0]), "c": c,
            "predicted": attenuated(counts, rho_inf, c).tolist()}


def print_curve(prop: str, curve: dict) -> None:
    """One property's curve as a Markdown table, then its fit and the samples its target needs."""
    print(f"\n{prop}: correlation of the median of n samples ({curve['draws']} random draws of n; fit on n = "
          f"{curve['fit_counts'][0]}-{curve['fit_counts'][-1]})\n")
    print("| n | " + " | ".join(str(n) for n in curve["counts"]) + " |\n" + "|---" * (len(curve["counts"]) + 1) + "|")
    print("| measured | " + " | ".join(f"{v:.3f} +- {e:.3f}" for v, e in zip(curve["corr"], curve["se"])) + " |")
    print("| fit | " + " | ".join(f"{v:.3f}" for v in curve["predicted"]) + " |")
    line = f"rho_inf = {curve['rho_inf']:.3f} +- {curve['rho_inf_se']:.3f}, c = {curve['c']:.1f}"
    if prop in CORRELATION_TARGETS:
        target = CORRELATION_TARGETS[prop]
        need = samples_needed(curve["rho_inf"], curve["c"], target)
        line += f"; the target {target} needs " + (f"{need:.0f} samples" if np.isfinite(need) else "more than "
                                                  "infinitely many samples of these models")
    print(line)


#: the bench/ceilings.py predictor drawn as a ceiling: the best one that sees only the noisy images
IMAGE_CEILING = "MLP: + fibre aperture"


def plot_curves(path: Path, curves: dict[str, dict], ceilings: list[dict]) -> Path:
    """One panel per property of utils.report.CORRELATION_TARGETS: each output's measured curve
    (+- bootstrap SE) and its fit, the target, and each ceilings file's image-photometry network."""
    from utils.plotting import save
    import matplotlib.pyplot as plt  # after utils.plotting, which selects the Agg backend

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outputs", nargs="+", type=Path, help="generate.py output folders of the validation split")
    ap.add_argument("--root", default=None, help="dataset folder (default: the data.root of each output's config)")
    ap.add_argument("--boot", type=int, default=300, help="bootstrap resamples of the galaxies")
    ap.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    ap.add_argument("--curve", action="store_true", help="also the correlation against the number of samples")
    ap.add_argument("--fit-max", type=int, default=100, help="largest sample count the --curve fit uses")
    ap.add_argument("--figure", type=Path, default=None, help="draw the --curve of the targets' properties here")
    ap.add_argument("--labels", nargs="+", default=None, help="names of the outputs in the figure")
    ap.add_argument("--ceilings", nargs="*", type=Path, default=[], help="bench/ceilings.py --regression outputs "
                    "to draw beside the curves")
    args = ap.parse_args()
    if (args.figure or args.ceilings) and not args.curve:
        ap.error("--figure and --ceilings draw the --curve: add --curve")
    if args.labels and len(args.labels) != len(args.outputs):
        ap.error(f"--labels names {len(args.labels)} outputs, {len(args.outputs)} given")
    ceilings = []
    for path in args.ceilings:
        try:
            ceilings.append(json.loads(path.read_text()))
            ceilings[-1]["predictors"][IMAGE_CEILING]
        except (OSError, ValueError, KeyError, TypeError) as err:
            ap.error(f"--ceilings {path}: not a bench/ceilings.py --regression output ({err!r})")
    report = {}
    try:
        for folder in args.outputs:
            out = read_output(folder, args.root)
            rows = {prop: compare(estimates(out, prop), out["reference"][prop], args.boot)
                    for prop in COMPARED if prop in out["reference"]}
            report[str(folder)] = rows
            print(f"\n{folder} ({len(out['reference']['z'])} galaxies x {out['n']} samples; Spearman correlation "
                  "with the truth, in brackets minus the median's +- bootstrap SE)\n")
            names = list(next(iter(rows.values())))
            print("| property | " + " | ".join(names) + " |\n" + "|---" * (len(names) + 1) + "|")
            for prop, r in rows.items():
                cells = [f"{v['corr']:.3f}" + ("" if i == 0 else f" ({v['minus_median']:+.3f} +- {v['se']:.3f})")
                         for i, v in enumerate(r.values())]
                print(f"| {prop} | " + " | ".join(cells) + " |")
            if args.curve:
                curves = {prop: sample_curve(out["props"][prop], out["reference"][prop], args.boot, args.fit_max)
                          for prop in COMPARED if prop in out["reference"]}
                for prop, curve in curves.items():
                    print_curve(prop, curve)
                report.setdefault("curves", {})[str(folder)] = curves
    except UserError as err:
        sys.exit(f"error: {err}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    if args.figure:
        labels = args.labels or [str(folder) for folder in args.outputs]
        curves = dict(zip(labels, report["curves"].values()))
        print(f"figure: {plot_curves(args.figure, curves, ceilings)}")


if __name__ == "__main__":
    main()

"""Which one number per property should a galaxy's N samples give? Validation outputs only.

    python bench/point_estimates.py OUTPUT [OUTPUT ...] [--root DATA] [--boot 300] [--out FILE.json]

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
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.errors import UserError  # noqa: E402
from utils.evaluation import property_stats  # noqa: E402
from utils.export import read_validation_output  # noqa: E402
from utils.report import COMPARED, reference_values, sample_properties  # noqa: E402
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outputs", nargs="+", type=Path, help="generate.py output folders of the validation split")
    ap.add_argument("--root", default=None, help="dataset folder (default: the data.root of each output's config)")
    ap.add_argument("--boot", type=int, default=300, help="bootstrap resamples of the galaxies")
    ap.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    args = ap.parse_args()
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
    except UserError as err:
        sys.exit(f"error: {err}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

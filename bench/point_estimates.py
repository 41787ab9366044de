"""Which one number per property should a galaxy's N samples give? Validation outputs only.

    python bench/point_estimates.py OUTPUT [OUTPUT ...] [--root DATA] [--boot 300] [--out FILE.json]
                                    [--curve [--fit-max 100] [--figure FILE.png] [--labels A B ...]
                                     [--ceilings bench/ceilings_val.json ...]]

Each OUTPUT is a folder generate.py wrote on the validation split (its spectra.fits and
config.yml; e.g. ``python generate.py --preset standard sampling.split=val
sampling.calibration_objects=0``). For Dn4000 and the four lines' equivalent widths it measures
every sample like generate.py does (utils.eval.report) and compares point estimates of the N samples
by their Spearman correlation with the reference values generate.py judges against (a mock's
intrinsic truth, else the true spectrum's): the median of all N (what generate.py reports), their
mean and their mean without the lowest and highest 20%, the median of the k best-ranked by the
contrastive network (the FITS header's TOPK) and of k drawn at random (the ranking's fair
comparison), the best-ranked sample alone and one drawn at random, and the property measured on
the mean spectrum of the N. Each row gives the paired difference to the median with its bootstrap
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
(utils.eval.report.CORRELATION_TARGETS) would need. ``--figure`` draws the curves of those targets'
properties, one line per output (``--labels`` names them), with the best image-photometry
predictor of each ``--ceilings`` file (bench/ceilings.py with --regression) for comparison.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from utils.errors import UserError
from utils.eval.estimates import (
    IMAGE_CEILING,
    compare_estimates,
    estimates,
    plot_curves,
    read_output,
    sample_curve,
    samples_needed,
)
from utils.eval.report import COMPARED, CORRELATION_TARGETS


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
            rows = {prop: compare_estimates(estimates(out, prop), out["reference"][prop], args.boot)
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

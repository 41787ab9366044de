"""Paired comparison of two generate.py outputs on the same validation galaxies.

    python bench/compare_outputs.py BASE OTHER [--root DATA] [--boot 1000] [--out FILE.json]

BASE and OTHER are folders generate.py wrote on the validation split (e.g. two models, samplers
or sample counts, each ``python generate.py ... sampling.split=val sampling.calibration_objects=0``).
For the galaxies both hold (matched by object id) it prints, for OTHER and BASE and their
difference OTHER - BASE with a bootstrap standard error over galaxies (the same resamples for
both, so that what the galaxies share cancels): the Spearman correlation of the samples' point
values (``<property>_gen``) with the truth generate.py judges them against (a mock's intrinsic
truth from its catalog, else the values measured on the true spectrum, ``<property>_true``), the
redshift sigma_NMAD against the catalog redshift and the MSE of the mean of the samples. Outputs of
the test split are refused: settings are chosen on validation.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from utils.errors import UserError
from utils.eval.outputs import compare_outputs, format_comparison, read_columns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", type=Path, help="generate.py output folder (validation split): the reference")
    ap.add_argument("other", type=Path, help="generate.py output folder (validation split): the variant")
    ap.add_argument("--root", default=None, help="dataset folder (default: the data.root of each output's config)")
    ap.add_argument("--boot", type=int, default=1000, help="bootstrap resamples of the galaxies")
    ap.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    args = ap.parse_args()
    try:
        result = compare_outputs(read_columns(args.base, args.root), read_columns(args.other, args.root), args.boot)
    except UserError as err:
        sys.exit(f"error: {err}")
    n = next(iter(result.values()))["galaxies"]
    print(format_comparison(result, f"{n} galaxies; other - base +- bootstrap SE ({args.boot} resamples)", "other"))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Pool the samples of independently trained models: does the pool beat one model? Validation only.

    python bench/pool_models.py BASE OUT OUT [OUT ...] [--root DATA] [--boot 1000] [--seed 0] [--out FILE.json]

BASE and every OUT are folders generate.py wrote on the validation split for the same galaxies
(``python generate.py ... sampling.split=val sampling.calibration_objects=0``), e.g. BASE from
one model and each OUT from a model trained with another ``run.seed``. The pool takes N / k
samples of each of the k OUTs per galaxy (N: BASE's samples per galaxy), drawn at random,
because the files rank the samples by the contrastive score, so the first ones would be the
best-ranked rather than a fair draw. It is judged like generate.py judges one model's samples:
each property (utils.astro.science, measured on every pooled sample) is the median over the pool,
against the reference generate.py uses (a mock's intrinsic truth, else the true spectrum's), and
the MSE of the pool's mean spectrum is in the preprocessed units of the runs. Printed: each
statistic for BASE and the pool, and pool - BASE with a bootstrap standard error over the galaxies
(bench/compare_outputs.py's statistics and resampling). Outputs of the test split are refused.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from utils.errors import UserError
from utils.eval.outputs import (
    COLUMNS,
    columns_of,
    compare_outputs,
    format_comparison,
    pool,
    pooled_columns,
    read_samples,
    read_validation_output,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", type=Path, help="generate.py output folder (validation split): one model")
    ap.add_argument("outputs", nargs="+", type=Path, help="generate.py output folders of the models to pool")
    ap.add_argument("--root", default=None, help="dataset folder (default: the data.root of each output's config)")
    ap.add_argument("--boot", type=int, default=1000, help="bootstrap resamples of the galaxies")
    ap.add_argument("--seed", type=int, default=0, help="seed of the draw of each output's share of the pool")
    ap.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    args = ap.parse_args()
    try:
        if len(args.outputs) < 2:
            raise UserError("give at least two outputs to pool")
        base_output = read_validation_output(args.base, (*COLUMNS, "samples"), args.root)
        n = int(base_output.columns["samples"].shape[1])
        base = columns_of(base_output)
        pooled = pool([read_samples(f, args.root) for f in args.outputs], n, args.seed)
        result = compare_outputs(base, pooled_columns(pooled), args.boot)
    except UserError as err:
        sys.exit(f"error: {err}")
    g = next(iter(result.values()))["galaxies"]
    print(format_comparison(result, f"{g} galaxies; a pool of {n} samples from {len(args.outputs)} outputs against "
                            f"the base's {n}; pool - base +- bootstrap SE ({args.boot} resamples)", "pool"))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Pool the samples of independently trained models: does the pool beat one model? Validation only.

    python bench/pool_models.py BASE OUT OUT [OUT ...] [--root DATA] [--boot 1000] [--seed 0] [--out FILE.json]

BASE and every OUT are folders generate.py wrote on the validation split for the same galaxies
(``python generate.py ... sampling.split=val sampling.calibration_objects=0``), e.g. BASE from
one model and each OUT from a model trained with another ``run.seed``. The pool takes N / k
samples of each of the k OUTs per galaxy (N: BASE's samples per galaxy), drawn at random,
because the files rank the samples by the contrastive score, so the first ones would be the
best-ranked rather than a fair draw. It is judged like generate.py judges one model's samples:
each property (utils.science, measured on every pooled sample) is the median over the pool,
against the reference generate.py uses (a mock's intrinsic truth, else the true spectrum's), and
the MSE of the pool's mean spectrum is in the preprocessed units of the runs. Printed: each
statistic for BASE and the pool, and pool - BASE with a bootstrap standard error over the galaxies
(bench/compare_outputs.py's statistics and resampling). Outputs of the test split are refused.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.compare_outputs import COLUMNS, columns_of, compare, report  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.evaluation import median_and_interval  # noqa: E402
from utils.export import read_validation_output  # noqa: E402
from utils.report import COMPARED, reference_values, sample_properties  # noqa: E402
from utils.science import RedshiftFitter, redshift_weights  # noqa: E402
from utils.spectra import preprocess, reprocess  # noqa: E402


def read_samples(folder: Path, root: str | None) -> dict:
    """One validation output's samples ``(G, N, L)`` in flux units, truth and inverse variances
    ``(G, L)``, wavelengths, preprocessing and the reference values of its galaxies."""
    out = read_validation_output(folder, ("objid", "samples", "true_flux", "true_ivar"), root,
                                 purpose="pooled comparisons")
    truth = np.asarray(out.columns["true_flux"], np.float64)
    reference, _ = reference_values({}, out.catalog)
    if not set(COMPARED) <= set(reference):
        raise UserError(f"{folder}: the catalog of its galaxies has no intrinsic properties (a mock's "
                        "true_<property> columns); pooled comparisons are made on the mock survey")
    return {"objid": np.asarray(out.columns["objid"]), "samples": np.asarray(out.columns["samples"], np.float64),
            "truth": truth, "ivar": np.asarray(out.columns["true_ivar"], np.float64), "wave": out.wave,
            "preprocessing": (out.config.get("data") or {}).get("preprocessing", "scale"), "reference": reference}


def pool(outputs: list[dict], n: int, seed: int = 0) -> dict:
    """``n`` samples per galaxy, ``n // k`` (the first ``n % k`` outputs one more) drawn at random
    from each of the k ``outputs``, which must hold the same galaxies in the same order."""
    first = outputs[0]
    for other in outputs[1:]:
        if not np.array_equal(other["objid"], first["objid"]):
            raise UserError("the pooled outputs hold different galaxies (or in another order); pool outputs of "
                            "the same galaxies drawn with the same sampling.max_objects and seed")
    rng = np.random.default_rng(seed)
    counts = [n // len(outputs) + (i < n % len(outputs)) for i in range(len(outputs))]
    parts = []
    for out, count in zip(outputs, counts):
        g, have = out["samples"].shape[:2]
        if count > have:
            raise UserError(f"an output has {have} samples per galaxy; the pool needs {count} of each")
        pick = np.argsort(rng.random((g, have)), axis=1)[:, :count]
        parts.append(np.take_along_axis(out["samples"], pick[:, :, None], axis=1))
    return {**first, "samples": np.concatenate(parts, axis=1)}


def columns(out: dict) -> dict[str, np.ndarray]:
    """The per-galaxy columns bench/compare_outputs.py compares, computed from the samples as
    generate.py computes them: medians of the measured properties and the MSE of the mean sample
    in preprocessed units (the truth's normalisation)."""
    fitter = RedshiftFitter(out["wave"], weights=redshift_weights(out["ivar"]))
    props = sample_properties(out["samples"], out["wave"], fitter)
    truth_pre, params = preprocess(out["truth"], out["wave"], out["preprocessing"])
    samples_pre = reprocess(out["samples"], params[:, None], out["preprocessing"]).astype(np.float64)
    cols = {"objid": out["objid"], "mse_mean": ((samples_pre.mean(1) - truth_pre) ** 2).mean(-1),
            "z_gen": median_and_interval(props["z"], 0.68)[0], "z_true": out["reference"]["z"]}
    for p in COMPARED:
        cols[f"{p}_gen"] = median_and_interval(props[p], 0.68)[0]
        cols[f"{p}_true"] = np.asarray(out["reference"][p], float)
    return cols


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
        result = compare(base, columns(pooled), args.boot)
    except UserError as err:
        sys.exit(f"error: {err}")
    g = next(iter(result.values()))["galaxies"]
    report(result, f"{g} galaxies; a pool of {n} samples from {len(args.outputs)} outputs against the base's {n}; "
           f"pool - base +- bootstrap SE ({args.boot} resamples)", "pool", args.out)


if __name__ == "__main__":
    main()

"""Paired comparison of two generate.py outputs on the same validation galaxies.

    python bench/compare_outputs.py BASE OTHER [--root DATA] [--boot 1000] [--out FILE.json]

BASE and OTHER are folders generate.py wrote on the validation split (e.g. two models, samplers
or sample counts, each ``python generate.py ... sampling.split=val sampling.calibration_objects=0``).
For the galaxies both hold (matched by object id) it prints, for OTHER and BASE and their
difference OTHER - BASE with a bootstrap standard error over galaxies (the same resamples for
both, so that what the galaxies share cancels): the Spearman correlation of the samples' point
values (``<property>_gen``) with the truth generate.py judges them against (a mock's intrinsic
truth from its catalog, else the values measured on the true spectrum, ``<property>_true``), the
redshift sigma_NMAD against the catalog redshift and the MSE of the mean of the samples. Outputs of the test split are refused:
settings are chosen on validation.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.errors import UserError  # noqa: E402
from utils.evaluation import property_stats, redshift_stats  # noqa: E402
from utils.export import ValidationOutput, read_validation_output  # noqa: E402
from utils.report import COMPARED, reference_values  # noqa: E402

#: per-galaxy columns read from each spectra.fits
COLUMNS = ("objid", "mse_mean", "z_gen", "z_true", *(f"{p}_{s}" for p in COMPARED for s in ("gen", "true")))


def read_columns(folder: Path, root: str | None = None) -> dict[str, np.ndarray]:
    """The per-galaxy columns of one validation output of generate.py, with ``<property>_true``
    and ``z_true`` replaced by the reference generate.py judged against (utils.report.reference_values)
    from the catalog of ``root`` (default: the output's data.root)."""
    return columns_of(read_validation_output(folder, COLUMNS, root))


def columns_of(out: ValidationOutput) -> dict[str, np.ndarray]:
    """:func:`read_columns` of an output already read (with at least :data:`COLUMNS`)."""
    cols = {c: out.columns[c] for c in COLUMNS}
    reference, _ = reference_values({p: cols[f"{p}_true"] for p in COMPARED}, out.catalog)
    cols.update({f"{p}_true": np.asarray(reference[p], float) for p in COMPARED})
    cols["z_true"] = np.asarray(reference.get("z", cols["z_true"]), float)
    return cols


def statistics(cols: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, float]:
    """The compared statistics of the galaxies ``rows`` of one output."""
    out = {f"{p} corr": property_stats(cols[f"{p}_gen"][rows], cols[f"{p}_true"][rows])["corr"] for p in COMPARED}
    out["z sigma_NMAD"] = redshift_stats(cols["z_gen"][rows], cols["z_true"][rows])["sigma_nmad"]
    out["MSE mean of N"] = float(np.mean(cols["mse_mean"][rows]))
    return out


def compare(base: dict[str, np.ndarray], other: dict[str, np.ndarray], boot: int, seed: int = 0) -> dict[str, dict]:
    """Each statistic of both outputs on their common galaxies, and OTHER - BASE with its
    bootstrap standard error."""
    common, ib, io = np.intersect1d(base["objid"], other["objid"], return_indices=True)
    if len(common) < 3:
        raise UserError(f"the two outputs share {len(common)} galaxies; a paired comparison needs the same galaxies")
    rng = np.random.default_rng(seed)
    value_b, value_o = statistics(base, ib), statistics(other, io)
    draws = [rng.integers(0, len(common), len(common)) for _ in range(boot)]
    diffs = {k: [] for k in value_b}
    for idx in draws:
        sb, so = statistics(base, ib[idx]), statistics(other, io[idx])
        for k in diffs:
            diffs[k].append(so[k] - sb[k])
    return {k: {"base": value_b[k], "other": value_o[k], "difference": value_o[k] - value_b[k],
                "se": float(np.nanstd(diffs[k], ddof=1)), "galaxies": int(len(common))} for k in value_b}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base", type=Path, help="generate.py output folder (validation split): the reference")
    ap.add_argument("other", type=Path, help="generate.py output folder (validation split): the variant")
    ap.add_argument("--root", default=None, help="dataset folder (default: the data.root of each output's config)")
    ap.add_argument("--boot", type=int, default=1000, help="bootstrap resamples of the galaxies")
    ap.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    args = ap.parse_args()
    try:
        result = compare(read_columns(args.base, args.root), read_columns(args.other, args.root), args.boot)
    except UserError as err:
        sys.exit(f"error: {err}")
    n = next(iter(result.values()))["galaxies"]
    report(result, f"{n} galaxies; other - base +- bootstrap SE ({args.boot} resamples)", "other", args.out)


def report(result: dict[str, dict], title: str, other: str, out: Path | None) -> None:
    """Print :func:`compare`'s result as a Markdown table under ``title``, the variant's column
    named ``other``; also write it as JSON to ``out`` when given."""
    print(f"{title}\n")
    print(f"| statistic | base | {other} | {other} - base |\n|---|---|---|---|")
    for k, r in result.items():
        print(f"| {k} | {r['base']:.5g} | {r['other']:.5g} | {r['difference']:+.5f} +- {r['se']:.5f} |")
    if out:
        out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

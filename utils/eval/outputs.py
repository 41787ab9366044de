"""generate.py's validation outputs read back, and compared: two outputs galaxy by galaxy, and
the samples of several models pooled against one model's.

Settings are chosen on validation galaxies with known spectra, so outputs of the test split or of
a catalog without spectra are refused (:class:`~utils.errors.UserError`). The bench scripts
``compare_outputs.py`` and ``pool_models.py`` are the command lines of this module.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from astropy.io import fits
from astropy.table import Table

from utils.astro.science import RedshiftFitter, redshift_weights
from utils.astro.spectra import preprocess, reprocess
from utils.data.dataset import open_survey
from utils.errors import UserError
from utils.eval.metrics import median_and_interval, property_stats, redshift_stats, reference_values, sample_properties
from utils.eval.report import COMPARED


@dataclass
class ValidationOutput:
    """One generate.py output of the validation split, read back (:func:`read_validation_output`)."""

    config: dict
    columns: dict  # name -> (G, ...) array, in the file's galaxy order
    header: fits.Header  # the SPECTRA table's
    wave: np.ndarray | None  # the WAVELENGTH extension, Angstrom (None where the file has none)
    catalog: Table  # the dataset catalog's rows of the file's galaxies, in the file's order


def read_validation_output(folder: Path, columns: tuple[str, ...], root: str | None = None,
                           purpose: str = "comparisons") -> ValidationOutput:
    """``columns`` of the SPECTRA table of the output generate.py wrote to ``folder`` and the
    catalog rows of its galaxies (matched by object id) from the dataset ``root`` (default: the
    output's ``data.root``). Outputs of the test split or of a catalog without spectra are refused
    (:class:`UserError`): settings are chosen on validation galaxies with known spectra."""
    fits_path, config_path = Path(folder) / "spectra.fits", Path(folder) / "config.yml"
    for path in (fits_path, config_path):
        if not path.is_file():
            raise UserError(f"{path}: not found; give a folder generate.py wrote (spectra.fits and config.yml)")
    config = yaml.safe_load(config_path.read_text()) or {}
    sampling = config.get("sampling") or {}
    if sampling.get("split") != "val" or sampling.get("catalog"):
        raise UserError(f"{config_path}: sampling.split is {sampling.get('split')!r}"
                        f"{' with a catalog' if sampling.get('catalog') else ''}; {purpose} are made on 'val' "
                        "outputs with known spectra, never on the test split")
    with fits.open(fits_path) as hdus:
        table, header = hdus["SPECTRA"].data, hdus["SPECTRA"].header.copy()
        missing = [c for c in columns if c not in table.columns.names]
        if missing:
            raise UserError(f"{fits_path}: no column {missing[0]!r}; {purpose} need the science evaluation "
                            "(sampling.science=true) on galaxies with known spectra")
        values = {c: np.asarray(table[c]) for c in columns}
        objid = np.asarray(table["objid"])
        wave = np.asarray(hdus["WAVELENGTH"].data, float) if "WAVELENGTH" in hdus else None
    root = root or (config.get("data") or {}).get("root")
    catalog = open_survey(root, check_values=False).catalog
    where = {o: i for i, o in enumerate(np.asarray(catalog["objid"]))}
    unknown = [o for o in objid if o not in where]
    if unknown:
        raise UserError(f"{fits_path}: {len(unknown)} galaxies (e.g. objid {unknown[0]}) are not in the catalog of "
                        f"{root}; pass the dataset generate.py read with --root")
    return ValidationOutput(config, values, header, wave, catalog[np.array([where[o] for o in objid], dtype=int)])


#: per-galaxy columns read from each spectra.fits
COLUMNS = ("objid", "mse_mean", "z_gen", "z_true", *(f"{p}_{s}" for p in COMPARED for s in ("gen", "true")))


def read_columns(folder: Path, root: str | None = None) -> dict[str, np.ndarray]:
    """The per-galaxy columns of one validation output of generate.py, with ``<property>_true``
    and ``z_true`` replaced by the reference generate.py judged against (utils.eval.report.reference_values)
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


def compare_outputs(base: dict[str, np.ndarray], other: dict[str, np.ndarray], boot: int,
                    seed: int = 0) -> dict[str, dict]:
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


def pooled_columns(out: dict) -> dict[str, np.ndarray]:
    """The per-galaxy columns :func:`compare_outputs` compares, computed from the samples as
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


def format_comparison(result: dict[str, dict], title: str, other: str) -> str:
    """:func:`compare_outputs`'s result as a Markdown table under ``title``, the variant's column
    named ``other``."""
    lines = [f"{title}\n", f"| statistic | base | {other} | {other} - base |", "|---|---|---|---|"]
    for k, r in result.items():
        lines.append(f"| {k} | {r['base']:.5g} | {r['other']:.5g} | {r['difference']:+.5f} +- {r['se']:.5f} |")
    return "\n".join(lines)

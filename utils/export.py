"""What generate.py writes: the spectra FITS file, one FITS table per galaxy, per-galaxy figures.

Flux columns are in SDSS units, 1e-17 erg/s/cm^2/A; wavelengths in Angstrom (observed frame).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from astropy.io import fits
from astropy.table import Table

from utils.calibration import PIXELS, Calibration
from utils.dataset import SpectraDataset, open_survey
from utils.errors import UserError
from utils.evaluation import METRICS
from utils.plotting import plot_ranked
from utils.science import BPT_CLASSES

FLUX_UNIT = "1e-17 erg / (s cm2 Angstrom)"


def pixel_factor_cards(calibration: Calibration) -> dict:
    """Header cards CALPIX68 / CALPIX90: the calibration's widening of the samples' central 68% /
    90% per-pixel intervals (preprocessed units), 'unbounded' where no finite factor was enough."""
    factors = {level: calibration.factor(PIXELS, level) for level in (0.68, 0.90)}
    return {f"CALPIX{round(level * 100)}": f if np.isfinite(f) else "unbounded" for level, f in factors.items()}


def write_fits(path: Path, dataset: SpectraDataset, results: dict, flux: dict, known: bool, config: dict,
               steps: int, science: dict | None = None, calibration: Calibration | None = None) -> Path:
    """One FITS file: HDU 1 a table with a row per galaxy, HDU 2 the wavelength grid (A).

    ``science`` adds the measured properties (utils.report: ``<property>_gen`` the median over the
    samples with ``_gen_lo`` / ``_gen_hi`` its 16% / 84% quantiles, widened by ``calibration``
    where one was fitted, ``_true`` of the true spectrum, ``_knn`` of the retrieval baseline,
    ``bpt_*`` class codes, ``z_photo``). A calibration's galaxy count and per-pixel factors go to
    the header (CALIBN, CALPIX68, CALPIX90: stretch the samples' central 68% / 90% interval of a
    pixel, preprocessed units, about its median by this factor)."""
    cat = dataset.survey.catalog[dataset.rows]
    table = Table({"objid": np.asarray(cat["objid"]), "ra": np.asarray(cat["ra"]), "dec": np.asarray(cat["dec"]),
                   "z": np.asarray(cat["z"])})
    table["samples"] = flux["ranked"].astype(np.float32)
    table["scores"] = results["ranked_scores"].astype(np.float32)
    table["mean"] = flux["mean"].astype(np.float32)
    table["topk_mean"] = flux["topk_mean"].astype(np.float32)
    for name in ("samples", "mean", "topk_mean"):
        table[name].unit = FLUX_UNIT
    if known:
        table["true_flux"] = flux["truth"].astype(np.float32)
        table["true_flux"].unit = FLUX_UNIT
        table["true_ivar"] = flux["ivar"].astype(np.float32)
        for key in METRICS:
            if key in results:
                table[key] = results[key].astype(np.float32)
    for name, values in (science or {}).items():
        table[name] = np.asarray(values, dtype=np.int16 if name.startswith("bpt_") and "frac" not in name
                                         else np.float32)
    if science:
        table.meta["BPTCODES"] = ", ".join(f"{i} {name}" for i, name in enumerate(BPT_CLASSES))
    s = config["sampling"]
    table.meta.update({"SAMPLER": s["sampler"], "STEPS": steps, "NSAMPLE": s["n_samples"], "TOPK": s["top_k"],
                       "PREPROC": config["data"]["preprocessing"],
                       "COMMENT": "samples are sorted by contrastive score, best first; flux in 1e-17 erg/s/cm2/A"})
    if calibration:
        table.meta["CALIBN"] = calibration.n_galaxies  # validation galaxies the intervals were fitted on
        table.meta.update(pixel_factor_cards(calibration))
    hdus = fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(table),
                         fits.ImageHDU(dataset.wave.astype(np.float64), name="WAVELENGTH")])
    hdus[1].name = "SPECTRA"
    hdus[2].header["BUNIT"] = "Angstrom"
    hdus.writeto(path)
    return path


#: primary-header values that let SDSS readers (specutils' "SDSS-III/IV spec") recognise the files
SPEC_LITE_HEADER = {"TELESCOP": ("SDSS 2.5-M", "the telescope whose spectra were imitated"),
                    "VERS2D": ("v5_generated", "not an idlspec2d reduction: generated"),
                    "BUNIT": ("1e-17 erg/cm^2/s/Ang", "flux unit")}


def write_per_galaxy(folder: Path, dataset, results: dict, flux: dict, known: bool,
                     science: dict | None = None, calibration: Calibration | None = None) -> list[Path]:
    """One file per galaxy in the SDSS spec-lite layout, ``spec-<objid>.fits``.

    HDU 1 (COADD) has spec-lite's columns in their order: flux (the mean of the N samples), loglam,
    ivar (the inverse variance of the samples at each pixel: their spread, 0 where they agree
    exactly), and_mask, or_mask, wdisp, sky (zeros), model (the mean of the top-k ranked samples).
    HDU 2 (SPECOBJ) is one row: objid, plug_ra, plug_dec, z and z_err (the median and the half
    16-84% width of the samples' fitted redshifts when measured, widened by the calibration where
    one was fitted, else the catalog's), class, the catalog redshift and the measured properties.
    HDU 3 (SAMPLES) holds every sample, best-ranked first, with its contrastive score; HDU 4
    (TRUTH), where known, the true flux and ivar. With a calibration the primary header carries
    CALPIX68 / CALPIX90, the factors that stretch the samples' per-pixel intervals (the ivar is the
    samples' own spread).
    """
    folder.mkdir()
    cat = dataset.survey.catalog[dataset.rows]
    loglam = dataset.loglam.astype(np.float32)
    paths = []
    for g in range(len(dataset)):
        objid = int(cat["objid"][g])
        samples = flux["ranked"][g]
        var = samples.astype(np.float64).var(0, ddof=1) if len(samples) > 1 else np.zeros(samples.shape[1])
        ivar = np.where(var > 0, 1.0 / np.where(var > 0, var, 1.0), 0.0)
        zeros = np.zeros(len(loglam), dtype=np.float32)
        coadd = Table({"flux": flux["mean"][g].astype(np.float32), "loglam": loglam,
                       "ivar": ivar.astype(np.float32), "and_mask": zeros.astype(np.int32),
                       "or_mask": zeros.astype(np.int32), "wdisp": zeros, "sky": zeros,
                       "model": flux["topk_mean"][g].astype(np.float32)})
        z_cat = float(cat["z"][g])
        row = {"objid": [objid], "plug_ra": [float(cat["ra"][g])], "plug_dec": [float(cat["dec"][g])],
               "class": ["GALAXY"], "z_catalog": [z_cat]}
        if science:
            row["z"] = [float(science["z_gen"][g])]
            row["z_err"] = [float(science["z_gen_hi"][g] - science["z_gen_lo"][g]) / 2]
            row.update({k: [v[g]] for k, v in science.items() if k not in ("z_gen",)})
        else:
            row.update(z=[z_cat], z_err=[np.nan])
        header = fits.Header()
        for key, (value, comment) in SPEC_LITE_HEADER.items():
            header[key] = (value, comment)
        header["PLATE"] = int(cat["plate"][g]) if "plate" in cat.colnames else 0
        header["MJD"] = int(cat["mjd"][g]) if "mjd" in cat.colnames else 0
        header["FIBERID"] = (int(cat["fiberID"][g]) if "fiberID" in cat.colnames else 1, "1 where unknown")
        header.update({"OBJID": objid, "PLUG_RA": float(cat["ra"][g]), "PLUG_DEC": float(cat["dec"][g]),
                       "GENERATD": (True, "spectrum generated from the image, not observed"),
                       "NSAMPLE": len(samples)})
        header.update(pixel_factor_cards(calibration) if calibration else {})
        hdus = [fits.PrimaryHDU(header=header), fits.table_to_hdu(coadd), fits.table_to_hdu(Table(row)),
                fits.table_to_hdu(Table({"flux": samples.astype(np.float32),
                                         "score": results["ranked_scores"][g].astype(np.float32)}))]
        names = ["COADD", "SPECOBJ", "SAMPLES"]
        if known:
            hdus.append(fits.table_to_hdu(Table({"flux": flux["truth"][g].astype(np.float32)[None],
                                                 "ivar": flux["ivar"][g].astype(np.float32)[None]})))
            names.append("TRUTH")
        for hdu, name in zip(hdus[1:], names):
            hdu.name = name
        path = folder / f"spec-{objid}.fits"
        fits.HDUList(hdus).writeto(path)
        paths.append(path)
    return paths


def draw_figures(folder: Path, dataset, results: dict, truth: np.ndarray | None, n: int, top_k: int) -> None:
    """The SPEC 4 figure for the first ``n`` galaxies."""
    raw = dataset.survey.images[dataset.kind]
    cat = dataset.survey.catalog
    for g in range(min(n, len(dataset))):
        row = dataset.rows[g]
        plot_ranked(folder / f"galaxy_{int(cat['objid'][row])}.png", dataset.wave, raw[row],
                    None if truth is None else truth[g], results["mean"][g], results["topk_mean"][g],
                    results["ranked"][g, :3], results["ranked_scores"][g, :3], top_k,
                    title=f"objid {int(cat['objid'][row])}, z = {float(cat['z'][row]):.3f}")


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

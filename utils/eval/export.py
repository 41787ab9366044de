"""What generate.py writes: the spectra FITS file, one FITS table per galaxy, per-galaxy figures.

Flux columns are in SDSS units, 1e-17 erg/s/cm^2/A; wavelengths in Angstrom (observed frame).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from utils.astro.science import BPT_CLASSES
from utils.data.dataset import SpectraDataset
from utils.eval.calibration import PIXELS, Calibration
from utils.eval.metrics import METRICS
from utils.plotting import plot_ranked

FLUX_UNIT = "1e-17 erg / (s cm2 Angstrom)"


def pixel_factor_cards(calibration: Calibration) -> dict:
    """Header cards CALPIX68 / CALPIX90: the calibration's widening of the samples' central 68% /
    90% per-pixel intervals (preprocessed units), 'unbounded' where no finite factor was enough."""
    factors = {level: calibration.factor(PIXELS, level) for level in (0.68, 0.90)}
    return {f"CALPIX{round(level * 100)}": f if np.isfinite(f) else "unbounded" for level, f in factors.items()}


def write_fits(path: Path, dataset: SpectraDataset, results: dict, flux: dict, known: bool, config: dict,
               steps: int, science: dict | None = None, calibration: Calibration | None = None,
               low: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> Path:
    """One FITS file: HDU 1 a table with a row per galaxy, HDU 2 the wavelength grid (A).

    ``science`` adds the measured properties (utils.eval.report: ``<property>_gen`` the median over the
    samples with ``_gen_lo`` / ``_gen_hi`` its 16% / 84% quantiles, widened by ``calibration``
    where one was fitted, ``_true`` of the true spectrum, ``_knn`` of the retrieval baseline,
    ``bpt_*`` class codes, ``z_photo``). A calibration's galaxy count and per-pixel factors go to
    the header (CALIBN, CALPIX68, CALPIX90: stretch the samples' central 68% / 90% interval of a
    pixel, preprocessed units, about its median by this factor). ``low``, a cascade's first stage
    (wavelengths, samples ``(G, N_low, L_low)`` in flux units, scores), adds HDUs LOWSTAGE and LOWWAVE."""
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
    if low is not None:  # a cascade's first stage
        wave, samples, scores = low
        stage = fits.table_to_hdu(Table({"objid": table["objid"], "samples": samples.astype(np.float32),
                                         "scores": scores.astype(np.float32)}))
        stage.name = "LOWSTAGE"
        stage.header["COMMENT"] = "the low-resolution samples (flux units), in drawing order; grid: LOWWAVE"
        hdus += [stage, fits.ImageHDU(wave.astype(np.float64), name="LOWWAVE")]
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
    folder.mkdir(exist_ok=True)
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


def galaxy_figures(folder: Path, dataset, results: dict, truth: np.ndarray | None, n: int, top_k: int,
                   low: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> None:
    """The SPEC 4 figure for the first ``n`` galaxies; ``low``: a cascade's first stage, its
    wavelengths ``(L_low,)``, samples ``(G, N_low, L_low)`` and scores ``(G, N_low)``."""
    raw = dataset.survey.images[dataset.kind]
    cat = dataset.survey.catalog
    for g in range(min(n, len(dataset))):
        row = dataset.rows[g]
        stage = None
        if low is not None:
            order = np.argsort(-np.nan_to_num(low[2][g], nan=-np.inf), kind="stable")
            stage = (low[0], low[1][g][order], low[2][g][order])
        z = float(cat["z"][row]) if "z" in cat.colnames else float("nan")
        plot_ranked(folder / f"galaxy_{int(cat['objid'][row])}.png", dataset.wave, raw[row],
                    None if truth is None else truth[g], results["mean"][g], results["topk_mean"][g],
                    results["ranked"][g, :3], results["ranked_scores"][g, :3], top_k,
                    title=f"objid {int(cat['objid'][row])}, z = {z:.3f}", low=stage)

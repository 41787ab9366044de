"""What generate.py writes: the spectra FITS file, one FITS table per galaxy, per-galaxy figures.

Flux columns are in SDSS units, 1e-17 erg/s/cm^2/A; wavelengths in Angstrom (observed frame).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from utils.dataset import SpectraDataset
from utils.evaluation import METRICS
from utils.plotting import plot_ranked

FLUX_UNIT = "1e-17 erg / (s cm2 Angstrom)"


def write_fits(path: Path, dataset: SpectraDataset, results: dict, flux: dict, known: bool, config: dict) -> Path:
    """One FITS file: HDU 1 a table with a row per galaxy, HDU 2 the wavelength grid (A)."""
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
    s = config["sampling"]
    table.meta.update({"SAMPLER": s["sampler"], "STEPS": s["steps"], "NSAMPLE": s["n_samples"], "TOPK": s["top_k"],
                       "PREPROC": config["data"]["preprocessing"],
                       "COMMENT": "samples are sorted by contrastive score, best first; flux in 1e-17 erg/s/cm2/A"})
    hdus = fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(table),
                         fits.ImageHDU(dataset.wave.astype(np.float64), name="WAVELENGTH")])
    hdus[1].name = "SPECTRA"
    hdus[2].header["BUNIT"] = "Angstrom"
    hdus.writeto(path)
    return path


def write_per_galaxy(folder: Path, dataset, results: dict, flux: dict, known: bool) -> None:
    """One FITS table per galaxy (wavelength, ranked samples, means, truth), in spectrum-<objid>.fits."""
    folder.mkdir()
    cat = dataset.survey.catalog[dataset.rows]
    for g in range(len(dataset)):
        cols = {"wavelength": dataset.wave, "mean": flux["mean"][g], "topk_mean": flux["topk_mean"][g]}
        if known:
            cols.update(true_flux=flux["truth"][g], true_ivar=flux["ivar"][g])
        for j in range(flux["ranked"].shape[1]):
            cols[f"sample_{j + 1:02d}"] = flux["ranked"][g, j]
        table = Table(cols)
        table["wavelength"].unit = "Angstrom"
        table.meta.update({"OBJID": int(cat["objid"][g]), "RA": float(cat["ra"][g]), "DEC": float(cat["dec"][g]),
                           "Z": float(cat["z"][g]), "SCORES": " ".join(f"{v:.4f}" for v in results["ranked_scores"][g])})
        table.write(folder / f"spectrum-{int(cat['objid'][g])}.fits")


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

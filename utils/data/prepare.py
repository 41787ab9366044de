"""Turn SDSS spec / spec-lite files and image cutouts into the dataset format (utils.data.dataset).

    python -m utils.data.prepare --catalog data/sdss/catalog.fits --spectra data/sdss/spectra \
        --images data/sdss/images --out data/sdss/dataset [--grid apj] [--ugriz DIR]

Works on downloaded files and on a local SAS mirror (``--spectra`` may hold files named
``<specObjID>.fits`` or ``spec-PPPP-MMMMM-FFFF.fits``; a catalog without specObjID but with
plate, mjd and fiberID is identified by those). The catalog is checked before any work; a
failure leaves no staging or partial folder behind. Objects are processed in chunks; a
100,000-object run never holds more than one chunk of spectra in memory. Every dropped object
is written with its reason to ``<out>.dropped.csv``.
"""
from __future__ import annotations

import argparse
import csv
import logging
import shutil
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from scipy.interpolate import CubicSpline
from scipy.ndimage import gaussian_filter1d
from tqdm import tqdm

from utils.astro.spectra import APJ_SMOOTH_SIGMA, APJ_WAVE_STEP, LOGLAM_STEP, apj_wave, neurips_loglam
from utils.data.dataset import BANDS, IMAGE_SHAPES, PARTIAL_MARKER, DatasetWriter, assign_split
from utils.data.files import SURVEY_MEASUREMENTS, cutout_path, jpeg_path, read_cutout_jpeg, spectrum_path
from utils.errors import UserError

logger = logging.getLogger(__name__)
GRIDS = ("neurips", "apj")
CHUNK = 1000
#: catalog columns preparation needs, besides an object identity (specObjID, or plate/mjd/fiberID)
NEEDED_COLUMNS = ("ra", "dec", "z", *(f"cModelMag_{b}" for b in BANDS))
PLATE_COLUMNS = ("plate", "mjd", "fiberID")


def spec_obj_id(plate: np.ndarray, mjd: np.ndarray, fiber: np.ndarray) -> np.ndarray:
    """SDSS specObjID bits from plate, MJD and fibre (plate << 50 | fiber << 38 | (mjd - 50000)
    << 24), with the run2d bits left 0: a stable identity for catalogs without specObjID."""
    plate, mjd, fiber = (np.asarray(a, dtype=np.int64) for a in (plate, mjd, fiber))
    return (plate << 50) | (fiber << 38) | ((mjd - 50000) << 24)


def check_catalog(catalog: Table, path: Path) -> Table:
    """The catalog with a ``specObjID`` column, or a :class:`UserError` naming what is missing,
    before any work is done."""
    missing = [c for c in NEEDED_COLUMNS if c not in catalog.colnames]
    has_plate = all(c in catalog.colnames for c in PLATE_COLUMNS)
    if "specObjID" not in catalog.colnames and not has_plate:
        missing.append("specObjID (or plate, mjd and fiberID)")
    if missing:
        raise UserError(f"catalog '{path}' lacks the column(s) {', '.join(missing)}; it has "
                        f"{', '.join(catalog.colnames) or 'none'}")
    if len(catalog) == 0:
        raise UserError(f"catalog '{path}' has no rows")
    if "specObjID" not in catalog.colnames:
        catalog = catalog.copy(copy_data=False)
        catalog["specObjID"] = spec_obj_id(catalog["plate"], catalog["mjd"], catalog["fiberID"])
        logger.info("catalog has no specObjID: objects identified by plate, mjd and fiberID")
    return catalog


def read_spec(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """loglam, flux, ivar from HDU 1 (COADD) of a spec or spec-lite file (SDSS and BOSS alike;
    HDU 2, whose name differs between them, is not needed)."""
    with fits.open(path, memmap=False) as hdus:
        data = hdus[1].data
        names = {n.lower(): n for n in data.columns.names}
        return (np.asarray(data[names["loglam"]], dtype=np.float64), np.asarray(data[names["flux"]], dtype=np.float64),
                np.asarray(data[names["ivar"]], dtype=np.float64))


def to_grid(loglam: np.ndarray, flux: np.ndarray, ivar: np.ndarray, grid: str = "neurips"
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | str:
    """One spectrum on the common grid: ``(flux, ivar, mask)`` or the reason it is dropped.

    Bad pixels (ivar == 0 or non-finite flux) are interpolated from their good neighbours,
    get ivar 0 and mask 1. 'neurips': loglam 3.5901 + 1e-4 k, 3598 pixels (SDSS pixels fall on
    it); 'apj': cubic spline onto 4000-8500 A in 1 A steps, Gaussian smoothing of sigma 2 A.
    """
    good = (ivar > 0) & np.isfinite(flux) & np.isfinite(ivar)
    target = neurips_loglam() if grid == "neurips" else np.log10(apj_wave())
    tol = 0.5 * LOGLAM_STEP
    if loglam.size == 0 or loglam[0] > target[0] + tol or loglam[-1] < target[-1] - tol:
        return "does not cover the wavelength window"
    window = (loglam >= target[0] - tol) & (loglam <= target[-1] + tol)
    if good[window].sum() < 2:
        return "no valid pixels in the window"
    x, f = loglam[good], flux[good]
    if grid == "neurips":
        out_flux = np.interp(target, x, f)
        index = np.clip(np.round((target - loglam[0]) / LOGLAM_STEP).astype(int), 0, len(loglam) - 1)
        matched = np.abs(loglam[index] - target) < tol
        out_ivar = np.where(matched & good[index], ivar[index], 0.0)
    else:
        wave = 10 ** target
        out_flux = gaussian_filter1d(CubicSpline(10 ** x, f)(wave), APJ_SMOOTH_SIGMA / APJ_WAVE_STEP)
        out_ivar = np.interp(wave, 10 ** loglam, np.where(good, ivar, 0.0))
    mask = (out_ivar <= 0).astype(np.uint8)
    if np.nanmax(out_flux) == np.nanmin(out_flux):
        return "constant flux"
    return out_flux.astype(np.float32), out_ivar.astype(np.float32), mask


def _find_spectrum(folder: Path, row) -> Path | None:
    by_id = spectrum_path(folder, row["specObjID"])
    if by_id.exists():
        return by_id
    name = f"spec-{int(row['plate']):04d}-{int(row['mjd']):05d}-{int(row['fiberID']):04d}.fits"
    for candidate in (folder / name, folder / f"{int(row['plate']):04d}" / name):
        if candidate.exists():
            return candidate
    return None


def prepare(catalog_path: str | Path, spectra_dir: str | Path, images_dir: str | Path | None, out: str | Path,
            grid: str = "neurips", ugriz_dir: str | Path | None = None, chunk: int = CHUNK) -> Path:
    """Build a dataset folder from a catalog, spectrum files and image cutouts (see module doc)."""
    if grid not in GRIDS:
        raise UserError(f"unknown grid '{grid}': expected one of {GRIDS}")
    catalog_path, spectra_dir, out = Path(catalog_path), Path(spectra_dir), Path(out)
    for path, what in ((catalog_path, "catalog"), (spectra_dir, "spectra folder")):
        if not path.exists():
            raise UserError(f"{what} '{path}' does not exist")
    if images_dir is None and ugriz_dir is None:
        raise UserError("give --images (gri JPEG cutouts) and/or --ugriz (5-band cutouts)")
    if out.exists():
        raise UserError(f"dataset folder '{out}' already exists; refusing to overwrite it")
    try:
        catalog = Table.read(catalog_path)
    except Exception as err:  # not a table astropy can read
        raise UserError(f"catalog '{catalog_path}' cannot be read as a table ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else 'no detail'})") from None
    catalog = check_catalog(catalog, catalog_path)
    staging = out.with_name(out.name + ".staging")
    partial = out.with_name(out.name + ".partial")
    try:
        return _prepare(catalog, spectra_dir, images_dir, out, grid, ugriz_dir, chunk, staging)
    except BaseException:  # leave nothing half-made behind: staging and the unfinished dataset are ours
        shutil.rmtree(staging, ignore_errors=True)
        if (partial / PARTIAL_MARKER).is_file():
            shutil.rmtree(partial, ignore_errors=True)
        raise


def _prepare(catalog: Table, spectra_dir: Path, images_dir, out: Path, grid: str, ugriz_dir, chunk: int,
             staging: Path) -> Path:
    n = len(catalog)
    loglam = neurips_loglam() if grid == "neurips" else np.log10(apj_wave())
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    mm = np.lib.format.open_memmap
    flux = mm(staging / "flux.npy", "w+", np.float32, (n, len(loglam)))
    ivar = mm(staging / "ivar.npy", "w+", np.float32, (n, len(loglam)))
    mask = mm(staging / "mask.npy", "w+", np.uint8, (n, len(loglam)))
    gri = mm(staging / "gri.npy", "w+", np.uint8, (n, *IMAGE_SHAPES["gri"])) if images_dir else None
    five = mm(staging / "ugriz.npy", "w+", np.float32, (n, *IMAGE_SHAPES["ugriz"])) if ugriz_dir else None
    keep = np.zeros(n, dtype=bool)
    dropped: list[tuple[int, str]] = []
    for i, row in enumerate(tqdm(catalog, desc="prepare", unit="obj")):
        objid = int(row["specObjID"])
        path = _find_spectrum(spectra_dir, row)
        if path is None:
            dropped.append((objid, "spectrum file missing"))
            continue
        try:
            result = to_grid(*read_spec(path), grid)
        except Exception as err:
            result = f"spectrum file {path.name} unreadable ({type(err).__name__})"
        if isinstance(result, str):
            dropped.append((objid, result))
            continue
        if images_dir:
            image = read_cutout_jpeg(jpeg_path(Path(images_dir), objid)) if jpeg_path(Path(images_dir), objid).exists() \
                else "gri image missing"
            if isinstance(image, str):
                dropped.append((objid, image))
                continue
            gri[i] = image
        if ugriz_dir:
            cpath = cutout_path(Path(ugriz_dir), objid)
            cut = np.load(cpath) if cpath.exists() else None
            if cut is None or cut.shape != IMAGE_SHAPES["ugriz"] or not np.all(np.isfinite(cut)):
                dropped.append((objid, "ugriz cutout missing or malformed"))
                continue
            five[i] = cut
        flux[i], ivar[i], mask[i] = result
        keep[i] = True
    rows = np.flatnonzero(keep)
    if len(rows) == 0:
        raise UserError(f"no object survived preparation; reasons in {out.with_name(out.name + '.dropped.csv')}")
    images = tuple(k for k, a in (("gri", gri), ("ugriz", five)) if a is not None)
    writer = DatasetWriter(out, len(rows), loglam, images=images, with_mask=True, source=f"sdss ({grid} grid)")
    for start in range(0, len(rows), chunk):
        sel = rows[start:start + chunk]
        arrays = {}
        if gri is not None:
            arrays["gri"] = gri[sel]
        if five is not None:
            arrays["ugriz"] = five[sel]
        writer.write(start, flux[sel], ivar[sel], arrays, mask[sel])
    kept = catalog[rows]
    objid = np.asarray(kept["specObjID"], dtype=np.int64)
    table = Table({"objid": objid, "ra": np.asarray(kept["ra"], dtype=np.float64),
                   "dec": np.asarray(kept["dec"], dtype=np.float64), "z": np.asarray(kept["z"], dtype=np.float64),
                   **{f"mag_{b}": np.asarray(kept[f"cModelMag_{b}"], dtype=np.float32) for b in BANDS},
                   "split": assign_split(objid)})
    for extra in ("plate", "mjd", "fiberID", "zErr", "petroRad_r", *SURVEY_MEASUREMENTS):
        if extra in kept.colnames:  # the survey's measurements may be NULL (masked): stored as NaN, -1 for integers
            column = np.ma.asarray(kept[extra])
            if np.issubdtype(column.dtype, np.integer):
                table[extra] = column.filled(-1)
            else:
                table[extra] = np.ma.asarray(column, dtype=np.float64).filled(np.nan)
    if "instrument" in kept.colnames:  # SDSS or BOSS: sets the fibre's diameter (utils.astro.photometry)
        table["instrument"] = [str(v.decode() if isinstance(v, bytes) else v).strip() for v in kept["instrument"]]
    del flux, ivar, mask, gri, five
    writer.finish(table, extra_meta={"grid": grid, "dropped": len(dropped)})
    shutil.rmtree(staging)
    report = out.with_name(out.name + ".dropped.csv")
    with open(report, "w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["specObjID", "reason"])
        w.writerows(dropped)
    logger.info("prepared %d of %d objects into %s; %d dropped (reasons in %s)", len(rows), n, out, len(dropped), report)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", required=True)
    parser.add_argument("--spectra", required=True)
    parser.add_argument("--images", default=None, help="folder of <specObjID>.jpg gri cutouts")
    parser.add_argument("--ugriz", default=None, help="folder of <specObjID>.npy (5, 64, 64) cutouts")
    parser.add_argument("--out", required=True)
    parser.add_argument("--grid", choices=GRIDS, default="neurips")
    args = parser.parse_args(argv)
    prepare(args.catalog, args.spectra, args.images, args.out, args.grid, args.ugriz)


if __name__ == "__main__":
    from utils.errors import cli
    cli(main)

"""Turn a catalog and its cutouts (and SDSS spec / spec-lite files) into the dataset format
(utils.data.dataset).

    python -m utils.prepare --catalog data/sdss/catalog.fits --spectra data/sdss/spectra \
        --images data/sdss/images --out data/sdss/dataset [--grid apj] [--ugriz DIR]
    python -m utils.prepare --catalog my_galaxies.csv --ugriz my_cutouts/ --out data/mine   # images only

With ``--spectra``: works on downloaded files and on a local SAS mirror (``--spectra`` may hold
files named ``<specObjID>.fits`` or ``spec-PPPP-MMMMM-FFFF.fits``; a catalog without specObjID
but with plate, mjd and fiberID is identified by those). Objects that cannot be used (no
spectrum, no window coverage, no image) are dropped, each written with its reason to
``<out>.dropped.csv``. Objects are processed in chunks; a 100,000-object run never holds more
than one chunk of spectra in memory.

Without ``--spectra``: a dataset of images only, whose spectra generate.py predicts
(``sampling.catalog``). The catalog (FITS or CSV) needs an id column (objid), ra and dec (deg);
z, model magnitudes (mag_u .. mag_z, or SDSS's cModelMag_*) and fibre magnitudes (fibermag_*,
fiberMag_*) are carried where present. The cutouts are named by id (utils.data.files): gri JPEGs
in ``--images``, 5-band ``.npy`` or FITS cutouts in nanomaggies in ``--ugriz``. Every row must
have its cutouts: a missing or malformed one stops the preparation with one line naming the
file, the row and the problem.

Either way the catalog is checked before any work, nothing existing is overwritten, and a
failure leaves no staging or partial folder behind.
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
from utils.data.dataset import (
    BANDS,
    IMAGE_SHAPES,
    PARTIAL_MARKER,
    DataError,
    DatasetWriter,
    assign_split,
    check_identities,
    read_table,
)
from utils.data.files import (
    ID_KEYWORD,
    SURVEY_MEASUREMENTS,
    cutout_path,
    id_column,
    jpeg_path,
    read_cutout_5band,
    read_cutout_jpeg,
    spectrum_path,
)
from utils.errors import UserError

logger = logging.getLogger(__name__)
GRIDS = ("neurips", "apj")
CHUNK = 1000
#: catalog columns preparation needs, besides an object identity (specObjID, or plate/mjd/fiberID)
NEEDED_COLUMNS = ("ra", "dec", "z", *(f"cModelMag_{b}" for b in BANDS))
PLATE_COLUMNS = ("plate", "mjd", "fiberID")
#: a catalog of images only: the dataset's column -> the names a user's or SDSS's catalog may give it
OPTIONAL_COLUMNS = {"z": ("z",), **{f"mag_{b}": (f"mag_{b}", f"cModelMag_{b}") for b in BANDS},
                    **{f"fibermag_{b}": (f"fibermag_{b}", f"fiberMag_{b}") for b in BANDS}}


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


def prepare(catalog_path: str | Path, spectra_dir: str | Path | None, images_dir: str | Path | None, out: str | Path,
            grid: str = "neurips", ugriz_dir: str | Path | None = None, chunk: int = CHUNK) -> Path:
    """Build a dataset folder from a catalog, its cutouts and (unless ``spectra_dir`` is None, a
    dataset of images only) its spectrum files; see the module docstring."""
    if grid not in GRIDS:
        raise UserError(f"unknown grid '{grid}': expected one of {GRIDS}")
    catalog_path, out = Path(catalog_path), Path(out)
    folders = [(catalog_path, "catalog"), *((Path(d), what) for d, what in ((spectra_dir, "spectra folder"),
               (images_dir, "images folder (--images)"), (ugriz_dir, "ugriz cutout folder (--ugriz)")) if d)]
    for path, what in folders:
        if not path.exists():
            raise UserError(f"{what} '{path}' does not exist")
    if images_dir is None and ugriz_dir is None:
        raise UserError("give --images (gri JPEG cutouts) and/or --ugriz (5-band cutouts)")
    if out.exists():
        raise UserError(f"dataset folder '{out}' already exists; refusing to overwrite it")
    catalog = read_table(catalog_path)
    staging = out.with_name(out.name + ".staging")
    partial = out.with_name(out.name + ".partial")
    try:
        if spectra_dir is None:
            return prepare_images(images_only_catalog(catalog, catalog_path), images_dir, ugriz_dir, out, chunk)
        catalog = check_catalog(catalog, catalog_path)
        return _prepare(catalog, Path(spectra_dir), images_dir, out, grid, ugriz_dir, chunk, staging)
    except BaseException:  # leave nothing half-made behind: staging and the unfinished dataset are ours
        shutil.rmtree(staging, ignore_errors=True)
        if (partial / PARTIAL_MARKER).is_file():
            shutil.rmtree(partial, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------
# a dataset of images only
# --------------------------------------------------------------------------------------------
def images_only_catalog(catalog: Table, path: Path) -> Table:
    """The dataset catalog of a catalog of images only: objid, ra, dec and the optional columns of
    :data:`OPTIONAL_COLUMNS` (NaN where the catalog has none), after checking the ids and
    coordinates (:func:`utils.data.dataset.check_identities`). The ids keep the catalog's id
    column's name in the ``IDCOL`` keyword, so that the cutouts are found by it."""
    try:
        idcol = id_column(catalog)
    except KeyError:
        raise UserError(f"catalog '{path}' has no id column (objid); it has {', '.join(catalog.colnames) or 'none'}"
                        ) from None
    missing = [c for c in ("ra", "dec") if c not in catalog.colnames]
    if missing:
        raise UserError(f"catalog '{path}' lacks the column(s) {', '.join(missing)} (degrees); it has "
                        f"{', '.join(catalog.colnames)}")
    if len(catalog) == 0:
        raise UserError(f"catalog '{path}' has no rows")
    ids = np.ma.asarray(catalog[idcol])
    ids = np.ma.filled(ids.astype(np.float64), np.nan) if np.ma.is_masked(ids) else np.asarray(ids)  # a blank id
    table = Table({"objid": ids, "ra": np.asarray(catalog["ra"]), "dec": np.asarray(catalog["dec"])})
    check_identities(table, f"catalog '{path}'")
    table["objid"] = np.asarray(table["objid"]).astype(np.int64)
    table["ra"], table["dec"] = (np.asarray(table[c], dtype=np.float64) for c in ("ra", "dec"))
    for name, sources in OPTIONAL_COLUMNS.items():
        source = next((c for c in sources if c in catalog.colnames), None)
        values = np.ma.filled(np.ma.asarray(catalog[source], dtype=np.float64), np.nan) if source else \
            np.full(len(table), np.nan)
        table[name] = values if name == "z" else values.astype(np.float32)
    table.meta[ID_KEYWORD] = "objid"
    return table


def prepare_images(table: Table, images_dir, ugriz_dir, out: Path, chunk: int = CHUNK) -> Path:
    """Write the cutouts of every row of ``table`` (:func:`images_only_catalog`) into a dataset of
    images only; a missing or malformed cutout raises :class:`DataError` naming it."""
    kinds = tuple(k for k, d in (("gri", images_dir), ("ugriz", ugriz_dir)) if d)
    writer = DatasetWriter(out, len(table), None, images=kinds, source="images only (utils.data.prepare)")
    ids = np.asarray(table["objid"])
    with tqdm(total=len(table), desc="prepare images", unit="obj") as bar:
        for start in range(0, len(table), chunk):
            rows = range(start, min(start + chunk, len(table)))
            arrays = {kind: np.stack([read_cutout(kind, folder, int(ids[i]), i)
                                      for i in rows]) for kind, folder in (("gri", images_dir), ("ugriz", ugriz_dir))
                      if folder}
            writer.write(start, None, None, arrays)
            bar.update(len(rows))
    writer.finish(table, extra_meta={"grid": None})
    logger.info("prepared %d galaxies (images only: %s) into %s", len(table), ", ".join(kinds), out)
    return out


def read_cutout(kind: str, folder, objid: int, row: int) -> np.ndarray:
    """One row's cutout of ``kind`` from ``folder``, or a :class:`DataError` naming the file,
    the row and what is wrong with it."""
    folder = Path(folder)
    path = jpeg_path(folder, objid) if kind == "gri" else cutout_path(folder, objid)
    if not path.exists():
        names = f"{objid}.jpg" if kind == "gri" else f"{objid}.npy or {objid}.fits"
        raise DataError(f"row {row} (objid {objid}): no {kind} cutout in '{folder}' (expected {names})")
    image = read_cutout_jpeg(path) if kind == "gri" else read_cutout_5band(path)
    if isinstance(image, str):
        raise DataError(f"row {row} (objid {objid}): {image} ('{path}')")
    return image


# --------------------------------------------------------------------------------------------
# a dataset with spectra
# --------------------------------------------------------------------------------------------
def _prepare(catalog: Table, spectra_dir: Path, images_dir, out: Path, grid: str, ugriz_dir, chunk: int,
             staging: Path) -> Path:
    """Stage every usable object's spectrum and images, then write the kept ones as the dataset."""
    loglam = neurips_loglam() if grid == "neurips" else np.log10(apj_wave())
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    stage = Staging(staging, len(catalog), len(loglam), images_dir is not None, ugriz_dir is not None)
    dropped: list[tuple[int, str]] = []
    for i, row in enumerate(tqdm(catalog, desc="prepare", unit="obj")):
        reason = stage.put(i, row, spectra_dir, images_dir, ugriz_dir, grid)
        if reason:
            dropped.append((int(row["specObjID"]), reason))
    rows = np.flatnonzero(stage.keep)
    if len(rows) == 0:
        raise UserError(f"no object survived preparation; reasons in {out.with_name(out.name + '.dropped.csv')}")
    writer = DatasetWriter(out, len(rows), loglam, images=stage.kinds, with_mask=True, source=f"sdss ({grid} grid)")
    for start in range(0, len(rows), chunk):
        sel = rows[start:start + chunk]
        writer.write(start, stage.flux[sel], stage.ivar[sel], {k: a[sel] for k, a in stage.images.items()},
                     stage.mask[sel])
    del stage
    writer.finish(spectra_catalog(catalog[rows]), extra_meta={"grid": grid, "dropped": len(dropped)})
    shutil.rmtree(staging)
    report = out.with_name(out.name + ".dropped.csv")
    with open(report, "w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["specObjID", "reason"])
        w.writerows(dropped)
    logger.info("prepared %d of %d objects into %s; %d dropped (reasons in %s)", len(rows), len(catalog), out,
                len(dropped), report)
    return out


class Staging:
    """Memory-mapped staging arrays for every catalog row; :meth:`put` fills one row or says why
    it is dropped."""

    def __init__(self, folder: Path, n: int, n_pixels: int, gri: bool, ugriz: bool) -> None:
        mm = np.lib.format.open_memmap
        self.flux = mm(folder / "flux.npy", "w+", np.float32, (n, n_pixels))
        self.ivar = mm(folder / "ivar.npy", "w+", np.float32, (n, n_pixels))
        self.mask = mm(folder / "mask.npy", "w+", np.uint8, (n, n_pixels))
        self.images = {}
        if gri:
            self.images["gri"] = mm(folder / "gri.npy", "w+", np.uint8, (n, *IMAGE_SHAPES["gri"]))
        if ugriz:
            self.images["ugriz"] = mm(folder / "ugriz.npy", "w+", np.float32, (n, *IMAGE_SHAPES["ugriz"]))
        self.kinds = tuple(self.images)
        self.keep = np.zeros(n, dtype=bool)

    def put(self, i: int, row, spectra_dir: Path, images_dir, ugriz_dir, grid: str) -> str | None:
        """Stage row ``i``; None when kept, else the reason it is dropped."""
        objid = int(row["specObjID"])
        path = _find_spectrum(spectra_dir, row)
        if path is None:
            return "spectrum file missing"
        try:
            result = to_grid(*read_spec(path), grid)
        except Exception as err:
            result = f"spectrum file {path.name} unreadable ({type(err).__name__})"
        if isinstance(result, str):
            return result
        if images_dir:
            jpeg = jpeg_path(Path(images_dir), objid)
            image = read_cutout_jpeg(jpeg) if jpeg.exists() else "gri image missing"
            if isinstance(image, str):
                return image
            self.images["gri"][i] = image
        if ugriz_dir:
            cut = read_cutout_5band(cutout_path(Path(ugriz_dir), objid))
            if isinstance(cut, str):
                return f"ugriz cutout missing or malformed: {cut}"
            self.images["ugriz"][i] = cut
        self.flux[i], self.ivar[i], self.mask[i] = result
        self.keep[i] = True
        return None


def spectra_catalog(kept: Table) -> Table:
    """The dataset catalog of the kept objects of a spectroscopic catalog: ids, positions,
    redshifts, model magnitudes, the split, and the survey's own measurements where present
    (NULL as NaN, -1 for integers)."""
    objid = np.asarray(kept["specObjID"], dtype=np.int64)
    table = Table({"objid": objid, "ra": np.asarray(kept["ra"], dtype=np.float64),
                   "dec": np.asarray(kept["dec"], dtype=np.float64), "z": np.asarray(kept["z"], dtype=np.float64),
                   **{f"mag_{b}": np.asarray(kept[f"cModelMag_{b}"], dtype=np.float32) for b in BANDS},
                   "split": assign_split(objid)})
    for extra in ("plate", "mjd", "fiberID", "zErr", "petroRad_r", *SURVEY_MEASUREMENTS):
        if extra in kept.colnames:
            column = np.ma.asarray(kept[extra])
            if np.issubdtype(column.dtype, np.integer):
                table[extra] = column.filled(-1)
            else:
                table[extra] = np.ma.asarray(column, dtype=np.float64).filled(np.nan)
    for band in BANDS:  # SDSS's 3" fibre magnitudes, where the catalog has them
        if f"fiberMag_{band}" in kept.colnames:
            table[f"fibermag_{band}"] = np.ma.filled(np.ma.asarray(kept[f"fiberMag_{band}"], dtype=np.float32), np.nan)
    if "instrument" in kept.colnames:  # SDSS or BOSS: sets the fibre's diameter (utils.astro.photometry)
        table["instrument"] = [str(v.decode() if isinstance(v, bytes) else v).strip() for v in kept["instrument"]]
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", required=True, help="FITS or CSV table of the galaxies")
    parser.add_argument("--spectra", default=None, help="folder of spectrum files (none: a dataset of images only)")
    parser.add_argument("--images", default=None, help="folder of <id>.jpg gri cutouts (64 x 64)")
    parser.add_argument("--ugriz", default=None, help="folder of <id>.npy or <id>.fits (5, 64, 64) cutouts, "
                                                      "nanomaggies")
    parser.add_argument("--out", required=True)
    parser.add_argument("--grid", choices=GRIDS, default="neurips")
    args = parser.parse_args(argv)
    prepare(args.catalog, args.spectra, args.images, args.out, args.grid, args.ugriz)


if __name__ == "__main__":
    from utils.errors import cli
    cli(main)

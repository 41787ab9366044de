"""Where downloaded and user-supplied files live, how a cutout is read and checked, and which
survey measurements a catalog carries: shared by the downloader (utils.data.sdss) and the
preparation (utils.data.prepare), which import this module and not each other's.

Cutouts are named by the object's id: ``<id>.jpg`` (gri colour JPEG, 64 x 64), ``<id>.npy`` (a
``(5, 64, 64)`` float array of ugriz nanomaggies, as utils.data.sdss cuts them) or ``<id>.fits``
(the same as a FITS cube, or as five 64 x 64 image HDUs in the order u, g, r, i, z; in
nanomaggies, as SDSS frames are). Spectroscopic catalogs name their files by specObjID,
photometric ones by objID (:func:`object_ids`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from utils.data.dataset import IMAGE_SHAPES

#: catalog meta keyword that names the id column its files are named by
ID_KEYWORD = "IDCOL"
#: BUNIT values that say nanomaggies (SDSS frames write 'nanomaggy')
NANOMAGGIES = {"nanomaggy", "nanomaggies", "nmgy"}


def spectrum_path(folder: Path, specobjid: int) -> Path:
    return Path(folder) / f"{int(specobjid)}.fits"


def jpeg_path(folder: Path, objid: int) -> Path:
    return Path(folder) / f"{int(objid)}.jpg"


def cutout_path(folder: Path, objid: int) -> Path:
    """The 5-band cutout of ``objid`` in ``folder``: ``<id>.npy``, else ``<id>.fits`` where that
    exists (the .npy name when neither does)."""
    npy = Path(folder) / f"{int(objid)}.npy"
    fits_file = Path(folder) / f"{int(objid)}.fits"
    return fits_file if not npy.exists() and fits_file.exists() else npy


def id_column(catalog) -> str:
    """The column whose values name an object's files: the catalog's ``IDCOL`` keyword, else
    specObjID (a spectroscopic catalog), else objID / objid (any case)."""
    named = catalog.meta.get(ID_KEYWORD)
    if named and named in catalog.colnames:
        return named
    if "specObjID" in catalog.colnames:
        return "specObjID"
    for name in catalog.colnames:
        if name.lower() == "objid":
            return name
    raise KeyError("no id column (objid, objID or specObjID)")


def object_ids(catalog) -> np.ndarray:
    """``(N,)`` int64 ids that name each catalog row's files (:func:`id_column`)."""
    return np.asarray(catalog[id_column(catalog)], dtype=np.int64)


def read_cutout_jpeg(path: Path) -> np.ndarray | str:
    """The ``(64, 64, 3)`` uint8 image of a cutout JPEG, or the reason it is unusable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in ("RGB", "YCbCr"):
                return f"image {Path(path).name} has colour mode {im.mode}, expected 3-band RGB (gri)"
            arr = np.asarray(im.convert("RGB"))
    except Exception as err:  # any decoding failure is a reason, not a crash
        return f"image {Path(path).name} is not a decodable JPEG ({type(err).__name__})"
    if arr.shape != IMAGE_SHAPES["gri"]:
        return f"image {Path(path).name} has shape {arr.shape}, expected {IMAGE_SHAPES['gri']}"
    return arr


def read_cutout_5band(path: Path) -> np.ndarray | str:
    """The ``(5, 64, 64)`` float32 ugriz nanomaggies of a ``.npy`` or ``.fits`` cutout, or the
    reason it is unusable (missing, unreadable, another shape or band count, not numbers, a
    FITS BUNIT other than nanomaggies, non-finite pixels)."""
    path = Path(path)
    if not path.is_file():
        return f"cutout {path.name} is missing"
    try:
        if path.suffix == ".npy":
            cube = np.load(path, allow_pickle=False)
        else:
            cube = _fits_cube(path)
            if isinstance(cube, str):
                return cube
    except Exception as err:  # a truncated or foreign file
        return f"cutout {path.name} cannot be read ({type(err).__name__})"
    cube = np.asarray(cube)
    if cube.dtype.kind not in "fiu":
        return f"cutout {path.name} holds {cube.dtype} values, expected numbers (nanomaggies)"
    if cube.shape != IMAGE_SHAPES["ugriz"]:
        bands = cube.shape[0] if cube.ndim == 3 else None
        what = f"{bands} bands" if bands not in (None, 5) and cube.shape[1:] == IMAGE_SHAPES["ugriz"][1:] else \
            f"shape {cube.shape}"
        return f"cutout {path.name} has {what}, expected {IMAGE_SHAPES['ugriz']} (u, g, r, i, z x 64 x 64 pixels)"
    if not np.all(np.isfinite(cube)):
        return f"cutout {path.name} has non-finite pixels"
    return cube.astype(np.float32)


def _fits_cube(path: Path) -> np.ndarray | str:
    """A FITS cutout's ``(5, 64, 64)`` data: the first image HDU's cube, or five 2-D image HDUs."""
    from astropy.io import fits

    with fits.open(path, memmap=False) as hdus:
        images = [h for h in hdus if getattr(h, "is_image", False) and h.data is not None]
        if not images:
            return f"cutout {path.name} has no image HDU"
        for h in images:
            unit = str(h.header.get("BUNIT", "nanomaggy")).strip().lower()
            if unit not in NANOMAGGIES:
                return f"cutout {path.name} is in BUNIT '{h.header['BUNIT']}', expected nanomaggies"
        if images[0].data.ndim == 3:
            return np.asarray(images[0].data)
        if all(h.data.ndim == 2 for h in images):
            return np.stack([np.asarray(h.data) for h in images])
        return np.asarray(images[0].data)


#: the survey's own measurements (MPA-JHU DR8 value-added tables, joined on specObjID; NULL for
#: spectra they do not cover, e.g. BOSS): line fluxes and equivalent widths (negative for
#: emission), Dn4000 and the BPT class; with SpecObj's velocity dispersion they travel into the
#: dataset's catalog (utils.data.prepare) for generate.py's comparison (utils.eval.report)
MPA_JHU_COLUMNS = {
    "galSpecLine": tuple(f"{line}_{what}" for line in ("h_alpha", "h_beta", "oiii_5007", "nii_6584")
                         for what in ("flux", "flux_err", "eqw", "eqw_err")),
    "galSpecIndx": ("d4000_n", "d4000_n_err"),
    "galSpecExtra": ("bptclass",),
}
SURVEY_MEASUREMENTS = ("velDisp", "velDispErr", *(c for cols in MPA_JHU_COLUMNS.values() for c in cols))

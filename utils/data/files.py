"""Where downloaded SDSS files live, how a cutout JPEG is checked and which survey measurements a
catalog carries: shared by the downloader
(utils.data.sdss) and the preparation (utils.data.prepare), which import this module and not each other's."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from utils.data.dataset import IMAGE_SHAPES


def spectrum_path(folder: Path, specobjid: int) -> Path:
    return Path(folder) / f"{int(specobjid)}.fits"


def jpeg_path(folder: Path, specobjid: int) -> Path:
    return Path(folder) / f"{int(specobjid)}.jpg"


def cutout_path(folder: Path, specobjid: int) -> Path:
    return Path(folder) / f"{int(specobjid)}.npy"


def read_cutout_jpeg(path: Path) -> np.ndarray | str:
    """The ``(64, 64, 3)`` uint8 image of a cutout JPEG, or the reason it is unusable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except Exception as err:  # any decoding failure is a reason, not a crash
        return f"image {Path(path).name} is not a decodable JPEG ({type(err).__name__})"
    if arr.shape != IMAGE_SHAPES["gri"]:
        return f"image {Path(path).name} has shape {arr.shape}, expected {IMAGE_SHAPES['gri']}"
    return arr


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

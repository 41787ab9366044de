"""The on-disk dataset format shared by every data source, and the torch Dataset over it.

A dataset is a folder::

    catalog.fits      FITS table, one row per object: objid (int64), ra, dec (deg), z,
                      mag_u .. mag_z (AB), split ('train' | 'val' | 'test')
    loglam.npy        (L,) float64      log10(observed wavelength / A) of every pixel
    flux.npy          (N, L) float32    flux density, 1e-17 erg/s/cm^2/A
    ivar.npy          (N, L) float32    inverse variance of flux; 0 marks a bad pixel
    mask.npy          (N, L) uint8      optional; non-zero where a pixel was interpolated
    images_gri.npy    (N, 64, 64, 3) uint8      gri colour images (NeurIPS 2022 setting)
    images_ugriz.npy  (N, 5, 64, 64) float32    ugriz images in nanomaggies (ApJ 2024 setting)
    meta.json         format version, source, per-channel image statistics of the train split,
                      "spectra": false for a dataset of images only

Row i of every array is row i of the catalog. Arrays are ``.npy`` files opened memory-mapped,
never one file per object. At least one of the image arrays must be present.

A dataset of images only (galaxies whose spectra are to be predicted; ``"spectra": false`` in
meta.json) has no loglam, flux, ivar or mask files, and its catalog needs only objid, ra and dec
(z and the magnitudes are optional, NaN where unknown; there is no split). Opening one where
spectra are needed (training, evaluation) is refused with :class:`DataError`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from astropy.table import Table

from utils.astro.photometry import BANDS
from utils.astro.spectra import LowResolution, SpectralGrid
from utils.errors import UserError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
IMAGE_SIZE = 64
#: Training-time image transform of SPEC 1: resize to 71, crop 64.
RESIZE_TO = 71
CATALOG_COLUMNS = ("objid", "ra", "dec", "z", *(f"mag_{b}" for b in BANDS), "split")
#: the columns a catalog of images only must have
IMAGES_ONLY_COLUMNS = ("objid", "ra", "dec")
SPLITS = ("train", "val", "test")
#: what a network of the cascade models (SPEC 5): the full spectrum alone ('single', the NeurIPS
#: model), its low-resolution version ('low'), or the full spectrum given that version ('super')
STAGES = ("single", "low", "super")


@dataclass(frozen=True)
class Stage:
    """A network's stage and how its low-resolution spectra are made (utils.astro.spectra.LowResolution)."""

    name: str = "single"
    factor: int = 8
    reduction: str = "decimate"

    def __post_init__(self) -> None:
        if self.name not in STAGES:
            raise ValueError(f"unknown stage '{self.name}': expected one of {STAGES}")

    def low(self, n_pixels: int) -> LowResolution | None:
        """The low resolution of a full grid of ``n_pixels``, None for a single-stage network."""
        return None if self.name == "single" else LowResolution(n_pixels, self.factor, self.reduction)
IMAGE_FILES = {"gri": "images_gri.npy", "ugriz": "images_ugriz.npy"}
IMAGE_SHAPES = {"gri": (IMAGE_SIZE, IMAGE_SIZE, 3), "ugriz": (5, IMAGE_SIZE, IMAGE_SIZE)}
IMAGE_DTYPES = {"gri": np.uint8, "ugriz": np.float32}


class DataError(UserError):
    """A missing, truncated or inconsistent dataset file."""


# --------------------------------------------------------------------------------------------
# split
# --------------------------------------------------------------------------------------------
def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of unsigned 64-bit integers: a fast, well-mixed hash."""
    x = np.asarray(x).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def assign_split(objid: np.ndarray, val_fraction: float = 0.1, test_fraction: float = 0.1) -> np.ndarray:
    """Deterministic split from a hash of each object id: adding objects never moves old ones.

    Returns a ``(N,)`` array of 'train' / 'val' / 'test'.
    """
    u = (splitmix64(objid) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    out = np.full(len(u), "train", dtype="<U5")
    out[u < val_fraction + test_fraction] = "test"
    out[u < val_fraction] = "val"
    return out


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
#: a file that marks ``<root>.partial`` as an unfinished write by :class:`DatasetWriter`
PARTIAL_MARKER = ".dataset-writer"


class DatasetWriter:
    """Write a dataset in chunks without holding it in memory.

    Everything goes to ``<root>.partial`` and is renamed to ``root`` by :meth:`finish`, so an
    interrupted write never leaves a folder that looks complete. An existing ``root`` is never
    overwritten.

    Parameters
    ----------
    root : destination folder.
    n_objects : number of rows N.
    loglam : ``(L,)`` pixel grid; None for a dataset of images only (no spectrum arrays).
    images : which image arrays will be written ('gri', 'ugriz').
    with_mask : whether a mask array is written.
    source : free text stored in meta.json.
    """

    def __init__(self, root: str | Path, n_objects: int, loglam: np.ndarray | None, images: Sequence[str] = ("gri",),
                 with_mask: bool = False, source: str = "unknown") -> None:
        self.root = Path(root)
        if self.root.exists():
            raise DataError(f"dataset folder '{self.root}' already exists; refusing to overwrite it")
        if not images:
            raise ValueError("a dataset needs at least one image array")
        self.tmp = self.root.with_name(self.root.name + ".partial")
        if self.tmp.exists():  # an interrupted write of ours is redone; anything else is the user's
            if not (self.tmp.is_dir() and (self.tmp / PARTIAL_MARKER).is_file()):
                raise DataError(f"'{self.tmp}' exists and was not left by an interrupted dataset write (no "
                                f"{PARTIAL_MARKER}): move or delete it yourself")
            logger.info("removing the unfinished dataset write '%s'", self.tmp)
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        (self.tmp / PARTIAL_MARKER).write_text(f"unfinished dataset write for {self.root.name}\n")
        self.n = int(n_objects)
        self.source = source
        mm = np.lib.format.open_memmap
        self.flux = self.ivar = self.mask = None
        if loglam is not None:
            loglam = np.asarray(loglam, dtype=np.float64)
            np.save(self.tmp / "loglam.npy", loglam)
            self.flux = mm(self.tmp / "flux.npy", "w+", np.float32, (self.n, len(loglam)))
            self.ivar = mm(self.tmp / "ivar.npy", "w+", np.float32, (self.n, len(loglam)))
            self.mask = mm(self.tmp / "mask.npy", "w+", np.uint8, (self.n, len(loglam))) if with_mask else None
        self.images = {k: mm(self.tmp / IMAGE_FILES[k], "w+", IMAGE_DTYPES[k], (self.n, *IMAGE_SHAPES[k]))
                       for k in images}

    def write(self, start: int, flux: np.ndarray | None, ivar: np.ndarray | None, images: dict[str, np.ndarray],
              mask: np.ndarray | None = None) -> None:
        """Write rows ``start ..`` (as many as the images have; flux and ivar None for a dataset
        of images only)."""
        stop = start + len(next(iter(images.values())))
        if self.flux is not None:
            self.flux[start:stop] = flux
            self.ivar[start:stop] = ivar
        if self.mask is not None and mask is not None:
            self.mask[start:stop] = mask
        for key, arr in images.items():
            self.images[key][start:stop] = arr

    def finish(self, catalog: Table, extra_meta: dict | None = None) -> Path:
        """Write the catalog and meta.json, then move the folder into place."""
        if len(catalog) != self.n:
            raise ValueError(f"catalog has {len(catalog)} rows, dataset has {self.n}")
        catalog.write(self.tmp / "catalog.fits")
        spectra = self.flux is not None
        train = (np.asarray(catalog["split"]) == "train") if "split" in catalog.colnames else np.ones(self.n, bool)
        meta = {"format_version": FORMAT_VERSION, "source": self.source, "n_objects": self.n, "spectra": spectra,
                "n_pixels": int(self.flux.shape[1]) if spectra else 0, "image_stats": {}, **(extra_meta or {})}
        for key, arr in self.images.items():
            meta["image_stats"][key] = _channel_stats(arr, train, key)
        for arr in (self.flux, self.ivar, self.mask, *self.images.values()):
            if arr is not None:
                arr.flush()
        with open(self.tmp / "meta.json", "w") as handle:
            json.dump(meta, handle, indent=2)
        (self.tmp / PARTIAL_MARKER).unlink()
        os.replace(self.tmp, self.root)
        return self.root


def _channel_stats(images: np.ndarray, rows: np.ndarray, kind: str, chunk: int = 2048) -> dict:
    """Per-channel mean and standard deviation over ``rows`` of an image array, in chunks."""
    idx = np.flatnonzero(rows) if rows.any() else np.arange(len(images))
    axes = (0, 1, 2) if kind == "gri" else (0, 2, 3)
    s = s2 = 0.0
    count = 0
    for i in range(0, len(idx), chunk):
        block = _image_to_float(images[idx[i:i + chunk]], kind)
        s = s + block.sum(axis=axes)
        s2 = s2 + (block ** 2).sum(axis=axes)
        count += block.size // len(s)
    mean = s / count
    std = np.sqrt(np.maximum(s2 / count - mean ** 2, 1e-12))
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def _image_to_float(images: np.ndarray, kind: str) -> np.ndarray:
    return images.astype(np.float64) / 255.0 if kind == "gri" else images.astype(np.float64)


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
@dataclass
class Survey:
    """A dataset folder, opened memory-mapped and checked (loglam, flux and ivar are None for a
    dataset of images only)."""

    root: Path
    catalog: Table
    loglam: np.ndarray | None
    flux: np.ndarray | None
    ivar: np.ndarray | None
    images: dict[str, np.ndarray]
    meta: dict
    mask: np.ndarray | None = None
    _index: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.catalog)

    @property
    def has_spectra(self) -> bool:
        """False for a dataset of images only (meta.json ``"spectra": false``)."""
        return bool(self.meta.get("spectra", True))

    def remap(self) -> None:
        """Map every array anew from its file: the pages read so far leave this process's resident
        memory (the system keeps them cached), which a pass over a large survey would otherwise
        grow without bound."""
        for key in self.images:
            self.images[key] = np.load(self.root / IMAGE_FILES[key], mmap_mode="r")
        for name in ("flux", "ivar", "mask"):
            if getattr(self, name) is not None:
                setattr(self, name, np.load(self.root / f"{name}.npy", mmap_mode="r"))

    @property
    def wave(self) -> np.ndarray:
        """``(L,)`` observed wavelength in A."""
        return 10.0 ** self.loglam

    def rows(self, split: str | None) -> np.ndarray:
        """Row indices of one split (all rows for ``None``)."""
        if split is None:
            return np.arange(len(self))
        if split not in SPLITS:
            raise ValueError(f"unknown split '{split}': expected one of {SPLITS}")
        return np.flatnonzero(np.asarray(self.catalog["split"]) == split)


def _load_array(path: Path, expected_rows: int | None, shape: tuple | None = None, dtype=None) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"dataset file '{path}' is missing")
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"dataset file '{path}' is truncated or not a .npy array ({err})") from None
    if expected_rows is not None and arr.shape[0] != expected_rows:
        raise DataError(f"dataset file '{path}' has {arr.shape[0]} rows but catalog.fits has {expected_rows}")
    if shape is not None and tuple(arr.shape[1:]) != tuple(shape):
        raise DataError(f"dataset file '{path}' has rows of shape {tuple(arr.shape[1:])}, expected {tuple(shape)}")
    if dtype is not None and arr.dtype != np.dtype(dtype):
        raise DataError(f"dataset file '{path}' has dtype {arr.dtype}, expected {np.dtype(dtype)}")
    return arr


def check_finite(path: Path, arr: np.ndarray, chunk: int = 4096) -> None:
    """Raise :class:`DataError` naming ``path`` and the first row of ``arr`` with a NaN or infinity."""
    for start in range(0, len(arr), chunk):
        block = np.asarray(arr[start:start + chunk])
        bad = ~np.isfinite(block)
        if bad.any():
            row = start + int(np.flatnonzero(bad.reshape(len(block), -1).any(1))[0])
            raise DataError(f"dataset file '{path}' has non-finite values (first in row {row})")


def read_table(path: Path, what: str = "catalog") -> Table:
    """A FITS or CSV table, or a :class:`DataError` in one line naming ``path`` (astropy's own
    error for a file that is not a table lists every format it tried)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} '{path}' does not exist")
    suffix = "".join(path.suffixes[-2:]).lower()
    try:  # FITS NaNs stay NaN (not masked): every consumer reads them as missing values
        if path.suffix.lower() in (".csv", ".txt"):
            table = Table.read(path, format="ascii.csv")
        elif suffix.endswith((".fits", ".fit", ".fits.gz", ".fz")):
            table = Table.read(path, format="fits", mask_invalid=False)
        else:
            table = Table.read(path)
    except Exception as err:  # astropy raises several types for a file that is not a table
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{what} '{path}' cannot be read as a table (FITS or CSV): {detail[:200]}") from None
    table.convert_bytestring_to_unicode()
    return table


def check_identities(catalog: Table, where: str) -> None:
    """Raise :class:`DataError` naming ``where`` and the first offending row when the catalog's
    objid are not whole numbers or repeat, or its ra / dec are not finite coordinates."""
    objid = np.asarray(catalog["objid"])
    if objid.dtype.kind == "f":
        bad = ~np.isfinite(objid) | (objid != np.round(objid))
        if bad.any():
            raise DataError(f"{where}: objid of row {int(np.flatnonzero(bad)[0])} is {objid[bad][0]!r}, expected a "
                            f"whole number")
    elif objid.dtype.kind not in "iu":
        raise DataError(f"{where}: column objid holds {objid.dtype} values, expected integers")
    values, first, counts = np.unique(objid, return_index=True, return_counts=True)
    if (counts > 1).any():
        row = int(np.sort(first[counts > 1])[0])
        raise DataError(f"{where}: objid {objid[row]} appears {int(counts[first == row][0])} times (first in row "
                        f"{row}); every galaxy needs its own id")
    for column, low, high in (("ra", 0.0, 360.0), ("dec", -90.0, 90.0)):
        values = np.ma.filled(np.ma.asarray(catalog[column], dtype=np.float64), np.nan)
        bad = ~np.isfinite(values) | (values < low) | (values > high)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(f"{where}: {column} of row {row} (objid {objid[row]}) is {values[row]!r}, expected a "
                            f"finite value in [{low:g}, {high:g}] degrees")


def open_survey(root: str | Path, check_values: bool = True, need_spectra: bool = True) -> Survey:
    """Open a dataset folder and check that every file agrees with the catalog.

    Raises :class:`DataError` naming the file and the problem for missing, truncated or
    mismatched files, and (with ``check_values``) for NaN or infinite flux, ivar or images. A
    dataset of images only is refused unless ``need_spectra`` is False.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder '{root}' does not exist")
    cat_path, meta_path = root / "catalog.fits", root / "meta.json"
    if not cat_path.is_file():
        raise DataError(f"dataset file '{cat_path}' is missing")
    if not meta_path.is_file():
        raise DataError(f"dataset file '{meta_path}' is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"dataset file '{meta_path}' is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise DataError(f"dataset file '{meta_path}' must hold a JSON object")
    spectra = bool(meta.get("spectra", True))
    if need_spectra and not spectra:
        raise DataError(f"dataset '{root}' holds images only (meta.json: \"spectra\": false): predict spectra "
                        f"for it with generate.py sampling.catalog={root}; training and evaluation need spectra")
    catalog = read_table(cat_path, "dataset file")
    missing = [c for c in (CATALOG_COLUMNS if spectra else IMAGES_ONLY_COLUMNS) if c not in catalog.colnames]
    if missing:
        raise DataError(f"dataset file '{cat_path}' lacks column(s) {', '.join(missing)}")
    if spectra:
        splits = sorted(set(np.asarray(catalog["split"]).astype(str).tolist()) - set(SPLITS))
        if splits:
            raise DataError(f"dataset file '{cat_path}': unknown split value(s) {', '.join(map(repr, splits))}; "
                            f"expected one of {', '.join(SPLITS)}")
    else:
        check_identities(catalog, f"dataset file '{cat_path}'")
    n = len(catalog)
    loglam = flux = ivar = mask = None
    if spectra:
        loglam = np.asarray(_load_array(root / "loglam.npy", None))
        if loglam.ndim != 1 or not np.all(np.diff(loglam) > 0):
            raise DataError(f"dataset file '{root / 'loglam.npy'}' must be a 1-D increasing grid")
        flux = _load_array(root / "flux.npy", n, (len(loglam),))
        ivar = _load_array(root / "ivar.npy", n, (len(loglam),))
        mask = _load_array(root / "mask.npy", n, (len(loglam),)) if (root / "mask.npy").exists() else None
    images = {}
    for key, name in IMAGE_FILES.items():
        if (root / name).exists():
            images[key] = _load_array(root / name, n, IMAGE_SHAPES[key], IMAGE_DTYPES[key])
    if not images:
        raise DataError(f"dataset folder '{root}' has no image array ({' or '.join(IMAGE_FILES.values())})")
    if check_values:
        if spectra:
            check_finite(root / "flux.npy", flux)
            check_finite(root / "ivar.npy", ivar)
        if "ugriz" in images:
            check_finite(root / IMAGE_FILES["ugriz"], images["ugriz"])
    return Survey(root, catalog, loglam, flux, ivar, images, meta, mask)


# --------------------------------------------------------------------------------------------
# image transforms (torch, no torchvision)
# --------------------------------------------------------------------------------------------
def image_tensor(image: np.ndarray, kind: str) -> torch.Tensor:
    """One stored image to a ``(C, 64, 64)`` float tensor: gri in [0, 1], ugriz in nanomaggies."""
    if kind == "gri":
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0
    return torch.from_numpy(np.array(image, dtype=np.float32))


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of ``(C, H, W)`` to ``(C, size, size)``."""
    return F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False)[0]


def crop(image: torch.Tensor, top: int, left: int, size: int) -> torch.Tensor:
    return image[:, top:top + size, left:left + size]


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    top = (image.shape[1] - size) // 2
    left = (image.shape[2] - size) // 2
    return crop(image, top, left, size)


def random_crop_flip(image: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random ``size`` crop, then random horizontal and vertical flips (each with p = 0.5)."""
    top = int(torch.randint(0, image.shape[1] - size + 1, (1,), generator=generator))
    left = int(torch.randint(0, image.shape[2] - size + 1, (1,), generator=generator))
    image = crop(image, top, left, size)
    flips = torch.rand(2, generator=generator) < 0.5
    if flips[0]:
        image = image.flip(-1)
    if flips[1]:
        image = image.flip(-2)
    return image


class ImageTransform:
    """SPEC 1 transform: resize to 71, random (train) or centre (eval) crop to 64, flips in
    training, then per-channel standardisation with the train split's statistics."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], train: bool) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]
        self.train = train

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = resize(image, RESIZE_TO)
        image = random_crop_flip(image, IMAGE_SIZE) if self.train else center_crop(image, IMAGE_SIZE)
        return (image - self.mean) / self.std


# --------------------------------------------------------------------------------------------
# torch Dataset
# --------------------------------------------------------------------------------------------
class SpectraDataset(torch.utils.data.Dataset):
    """Image-spectrum pairs of one split, preprocessed for the networks.

    Each item is a dict: ``image`` ``(C, 64, 64)`` float32, ``spectrum`` ``(1, L')`` float32
    (preprocessed), ``params`` ``(2,)`` float64 (to invert the preprocessing with
    :func:`utils.astro.spectra.deprocess`), ``index`` (row in the survey) and ``z`` (the catalog's
    redshift, float64; NaN where a catalog has none).

    Parameters
    ----------
    survey : an opened :class:`Survey`.
    split : 'train', 'val', 'test' or None (all rows).
    image : 'gri' or 'ugriz'.
    preprocessing : 'scale' or 'log' (see :func:`utils.astro.spectra.preprocess`).
    downsample : combine blocks of this many pixels (inverse-variance weighted); 1 keeps the grid.
    train : random crops and flips when True, centre crop otherwise.
    rows : optional explicit row indices (overrides ``split``).
    loglam : the stored grid the spectra live on, for a survey of images only (the grid of the
        models' training data); default the survey's own.
    image_stats : per-channel ``{"mean", "std"}`` that standardise the images; default the
        survey's own (a survey of images only is standardised like the training images).
    stage : what the network models (:class:`Stage`): for 'low', ``spectrum`` is the
        low-resolution version of the preprocessed spectrum and ``n_pixels`` / ``wave`` are its;
        for 'super' the items also carry ``low`` ``(1, L_low)``, the truth's low-resolution version.

    A survey of images only has no spectra: its items' ``spectrum`` and ``params`` are zeros.
    """

    def __init__(self, survey: Survey, split: str | None, image: str = "gri", preprocessing: str = "scale",
                 downsample: int = 1, train: bool = False, rows: np.ndarray | None = None,
                 loglam: np.ndarray | None = None, image_stats: dict | None = None, stage: Stage = Stage()) -> None:
        if image not in survey.images:
            raise DataError(f"dataset folder '{survey.root}' has no {IMAGE_FILES[image]} "
                            f"(config data.image={image!r}; present: {', '.join(survey.images)})")
        self.survey = survey
        self.rows = np.asarray(rows) if rows is not None else survey.rows(split)
        self.kind = image
        loglam = survey.loglam if loglam is None else loglam
        if loglam is None:
            raise ValueError(f"dataset '{survey.root}' holds images only: give the grid of the spectra (loglam)")
        self.grid = SpectralGrid(loglam, downsample, preprocessing)
        self.stage = stage
        #: the low resolution of the cascade's stages (None for 'single')
        self.low = stage.low(self.grid.n_pixels)
        self.spectra = survey.has_spectra
        stats = image_stats or survey.meta.get("image_stats", {}).get(image)
        if stats is None:
            raise DataError(f"dataset file '{survey.root / 'meta.json'}' lacks image_stats for '{image}'")
        self.image_stats = stats
        self.transform = ImageTransform(stats["mean"], stats["std"], train)
        z = survey.catalog["z"] if "z" in survey.catalog.colnames else np.full(len(survey), np.nan)
        self.z = np.ma.filled(np.ma.asarray(z, dtype=np.float64), np.nan)[self.rows]

    def like(self, rows: np.ndarray, train: bool = False) -> "SpectraDataset":
        """The same grid, bands, preprocessing and image standardisation on other ``rows``."""
        return SpectraDataset(self.survey, None, self.kind, self.preprocessing, self.downsample, train=train,
                              rows=rows, loglam=self.grid.stored_loglam, image_stats=self.image_stats,
                              stage=self.stage)

    def at_stage(self, stage: Stage) -> "SpectraDataset":
        """The same galaxies, grid, bands and preprocessing for a network of another ``stage``."""
        return SpectraDataset(self.survey, None, self.kind, self.preprocessing, self.downsample,
                              train=self.transform.train, rows=self.rows, loglam=self.grid.stored_loglam,
                              image_stats=self.image_stats, stage=stage)

    @property
    def preprocessing(self) -> str:
        return self.grid.preprocessing

    @property
    def downsample(self) -> int:
        return self.grid.downsample

    @property
    def loglam(self) -> np.ndarray:
        """``(L',)`` log10 wavelength of the pixels the network models (the low-resolution ones
        for the low stage)."""
        return self.grid.loglam if self.stage.name != "low" else self.low.coordinate(self.grid.loglam)

    @property
    def wave(self) -> np.ndarray:
        """``(L',)`` wavelength in A of the pixels the network models."""
        return 10.0 ** self.loglam

    @property
    def n_pixels(self) -> int:
        """Pixels of the spectra the network models."""
        return self.grid.n_pixels if self.stage.name != "low" else self.low.n_low

    @property
    def n_channels(self) -> int:
        return 3 if self.kind == "gri" else 5

    def __len__(self) -> int:
        return len(self.rows)

    def flux(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Flux and ivar of item ``i`` on the (possibly rebinned) grid, flux units."""
        row = self.rows[i]
        return self.grid.rebin(np.asarray(self.survey.flux[row]), np.asarray(self.survey.ivar[row]))

    def all_flux(self) -> tuple[np.ndarray, np.ndarray]:
        """Flux and ivar of every item, in order, each ``(N, L')`` (:meth:`flux` stacked)."""
        if not len(self):
            return np.zeros((0, self.n_pixels), np.float32), np.zeros((0, self.n_pixels), np.float32)
        flux, ivar = zip(*(self.flux(i) for i in range(len(self))))
        return np.stack(flux), np.stack(ivar)

    def image(self, i: int) -> torch.Tensor:
        """The network input image ``(C, 64, 64)`` of item ``i``."""
        return self.transform(self._raw_image(i))

    def _raw_image(self, i: int) -> torch.Tensor:
        return image_tensor(self.survey.images[self.kind][int(self.rows[i])], self.kind)

    def spectrum(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The network input spectrum ``(L',)`` of item ``i`` and the ``(2,)`` parameters that invert
        its preprocessing (without reading its image)."""
        x, params, low = self._spectra(i)
        return (low, params) if self.stage.name == "low" else (x, params)

    def _spectra(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Item ``i``'s preprocessed spectrum, its parameters and, for a cascade stage, its
        low-resolution version (utils.astro.spectra.LowResolution.from_flux)."""
        flux, ivar = self.flux(i)
        if not np.all(np.isfinite(flux)):
            raise DataError(f"dataset file '{self.survey.root / 'flux.npy'}' row {self.rows[i]} has non-finite flux")
        x, params = self.grid.preprocess(flux)
        low = None if self.low is None else self.low.from_flux(flux, ivar, params, self.grid.preprocessing)
        return x, params, low

    def __getitem__(self, i: int) -> dict:
        row = int(self.rows[i])
        item = {"image": self.image(i), "index": row, "z": self.z[i]}
        if not self.spectra:
            return item | {"spectrum": torch.zeros(1, self.n_pixels), "params": torch.zeros(2, dtype=torch.float64)}
        x, params, low = self._spectra(i)
        item |= {"spectrum": torch.from_numpy(low if self.stage.name == "low" else x)[None],
                 "params": torch.from_numpy(params)}
        if self.stage.name == "super":
            item["low"] = torch.from_numpy(np.ascontiguousarray(low))[None]
        return item

    def deprocess(self, x: np.ndarray, params: np.ndarray) -> np.ndarray:
        """Preprocessed spectra ``(..., L')`` back to flux units."""
        return self.grid.deprocess(x, params)

    def iter_batches(self, batch_size: int) -> Iterator[dict]:
        """Deterministic batches in row order (for evaluation without a DataLoader)."""
        for start in range(0, len(self), batch_size):
            items = [self[i] for i in range(start, min(start + batch_size, len(self)))]
            yield torch.utils.data.default_collate(items)

"""Aperture photometry of ugriz image cutouts: the total light and the light inside the
spectroscopic fibre, as asinh magnitudes (Lupton, Gunn & Szalay 1999, as SDSS uses).

What a galaxy's spectrum shows is the light inside the fibre at its centre, not the whole
galaxy; a disc galaxy's star-forming outskirts and its old bulge have different colours. These
colours are what ``bench/ceilings.py`` regresses the spectral properties on, and what a
catalogue prediction uses to put spectra on a flux scale when the catalog has no fibre magnitudes.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

BANDS = ("u", "g", "r", "i", "z")
PIXEL_SCALE = 0.396  # arcsec per pixel (SDSS imaging)
#: SDSS spectrograph fibre diameters, arcsec (the legacy survey's 3", BOSS's 2")
FIBRE_DIAMETER = {"sdss": 3.0, "boss": 2.0}
#: asinh magnitude softening per band (maggies; Lupton, Gunn & Szalay 1999, as SDSS uses)
ASINH_B = {"u": 1.4e-10, "g": 0.9e-10, "r": 1.2e-10, "i": 1.8e-10, "z": 7.4e-10}
#: per aperture: u-g, g-r, r-i, i-z and r
FEATURES_PER_APERTURE = len(BANDS)
#: features of :func:`photometry_features`: the total's, then the fibre circle's
N_FEATURES = 2 * FEATURES_PER_APERTURE


def aperture_weights(offset: torch.Tensor, diameter: float, size: int, sub: int = 4) -> torch.Tensor:
    """``(B, size, size)`` share of each pixel inside a circle of ``diameter`` arcsec centred on
    ``offset`` ``(B, 2)`` pixels from the stamp centre (``sub`` x ``sub`` points per pixel)."""
    axis = (torch.arange(size * sub, dtype=torch.float32) + 0.5) / sub - size / 2
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    radius = diameter / 2 / PIXEL_SCALE
    inside = ((xx[None] - offset[:, 0, None, None]) ** 2 + (yy[None] - offset[:, 1, None, None]) ** 2) <= radius ** 2
    return F.avg_pool2d(inside[:, None].float(), sub)[:, 0]


def asinh_colours(maggies: np.ndarray) -> np.ndarray:
    """``(N, 5)`` ugriz fluxes in maggies -> ``(N, 5)`` asinh colours u-g, g-r, r-i, i-z and the
    r magnitude (finite for zero and negative fluxes)."""
    b = np.array([ASINH_B[band] for band in BANDS])
    mags = -2.5 / np.log(10) * (np.arcsinh(maggies / (2 * b)) + np.log(b))
    return np.concatenate([mags[:, :-1] - mags[:, 1:], mags[:, 2:3]], 1)


def fibre_diameters(catalog, meta: dict) -> np.ndarray:
    """``(N,)`` fibre diameter in arcsec of each catalog row: from its ``instrument`` column (SDSS
    or BOSS, as utils.data.sdss downloads it) where there is one, else the dataset's ``fibre_arcsec``
    (the mock writes it), else the legacy survey's 3"."""
    default = float(meta.get("fibre_arcsec", FIBRE_DIAMETER["sdss"]))
    if "instrument" not in catalog.colnames:
        return np.full(len(catalog), default)
    names = [str(v.decode() if isinstance(v, bytes) else v).strip().lower() for v in catalog["instrument"]]
    return np.array([FIBRE_DIAMETER.get(name, default) for name in names])


def photometry_features(images: np.ndarray, fibre_arcsec: float | np.ndarray | None) -> np.ndarray:
    """Photometry of centred ugriz cutouts ``(N, 5, H, W)`` in nanomaggies per pixel.

    Returns ``(N, 5)`` asinh colours and r of the summed fluxes, and with ``fibre_arcsec`` (one
    diameter, or one per image) also those of the light inside a circle of that diameter at the
    stamp centre: ``(N, 10)``, float32.
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 4 or images.shape[1] != len(BANDS):
        raise ValueError(f"photometry needs ugriz images (N, {len(BANDS)}, H, W), got shape {images.shape}")
    pixels = images.reshape(*images.shape[:2], -1)  # (N, 5, H W)
    parts = [asinh_colours(pixels.sum(-1) * 1e-9)]  # nanomaggies -> maggies
    if fibre_arcsec is not None:
        diameters = np.broadcast_to(np.asarray(fibre_arcsec, dtype=float), (len(images),))
        fibre = np.empty(pixels.shape[:2])
        for diameter in np.unique(diameters):  # one circle per fibre size, not one per image
            rows = diameters == diameter
            fibre[rows] = pixels[rows] @ _fibre_weights(float(diameter), images.shape[-1])
        parts.append(asinh_colours(fibre * 1e-9))
    return np.concatenate(parts, 1).astype(np.float32)


@lru_cache(maxsize=None)
def _fibre_weights(diameter: float, size: int) -> np.ndarray:
    """The fibre circle's ``(size * size,)`` pixel weights, computed once per diameter and stamp size."""
    return aperture_weights(torch.zeros(1, 2), diameter, size)[0].numpy().astype(np.float64).ravel()

"""The spectral instrument and spectrum preprocessing (pure numpy).

This module is the one place that defines the wavelength grids and the normalisation constants.

Units: flux densities are in SDSS units, 1e-17 erg/s/cm^2/A; ``ivar`` is their inverse variance;
wavelengths are vacuum Angstrom in the observed frame; ``loglam`` is log10(wavelength / A).
"""
from __future__ import annotations

import numpy as np

#: SDSS spectrograph pixels are uniform in log10(lambda) with this step.
LOGLAM_STEP = 1e-4
#: NeurIPS 2022 window: loglam 3.5901 .. 3.9499 (about 3891-8910 A), 3598 pixels.
NEURIPS_LOGLAM_MIN = 3.5901
NEURIPS_NPIX = 3598
#: ApJ 2024 window: 4000-8500 A on a linear 1 A grid.
APJ_WAVE_MIN = 4000.0
APJ_WAVE_MAX = 8500.0
APJ_WAVE_STEP = 1.0
#: ApJ 2024 smoothing (Gaussian sigma, A) applied when resampling onto the 1 A grid.
APJ_SMOOTH_SIGMA = 2.0
#: ApJ 2024 'log' preprocessing divides by the mean flux in this window (A).
LOG_NORM_WINDOW = (6900.0, 6950.0)
#: In 'log' preprocessing, flux / norm is clipped from below at this value before the log.
LOG_FLOOR = 1e-3
#: Spectrum preprocessings understood by :func:`preprocess`.
PREPROCESSINGS = ("scale", "log")


def neurips_loglam() -> np.ndarray:
    """The NeurIPS 2022 grid, ``(3598,)`` float64 log10(A)."""
    return NEURIPS_LOGLAM_MIN + LOGLAM_STEP * np.arange(NEURIPS_NPIX)


def apj_wave() -> np.ndarray:
    """The ApJ 2024 grid, ``(4501,)`` float64 A."""
    return np.arange(APJ_WAVE_MIN, APJ_WAVE_MAX + APJ_WAVE_STEP / 2, APJ_WAVE_STEP)


def block_grid(loglam: np.ndarray, factor: int) -> np.ndarray:
    """``(L // factor,)`` centres of blocks of ``factor`` pixels (the mean of each block's loglam);
    a remainder at the red end is dropped."""
    n = len(loglam) // factor
    return np.asarray(loglam)[: n * factor].reshape(n, factor).mean(-1)


def rebin(flux: np.ndarray, ivar: np.ndarray, loglam: np.ndarray, factor: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Combine blocks of ``factor`` adjacent pixels (inverse-variance weighted mean).

    Parameters
    ----------
    flux, ivar : ``(..., L)`` arrays; pixels with ``ivar == 0`` get no weight.
    loglam : ``(L,)`` grid.
    factor : pixels per block; a remainder of ``L % factor`` pixels at the red end is dropped.

    Returns
    -------
    flux, ivar : ``(..., L // factor)``; loglam : ``(L // factor,)`` (mean of each block).
    A block with no valid pixel gets the plain mean and ``ivar`` 0.
    """
    if factor == 1:
        return flux, ivar, loglam
    n = flux.shape[-1] // factor
    mean, wsum = block_mean(flux[..., : n * factor], ivar[..., : n * factor], np.arange(n) * factor)
    return mean.astype(flux.dtype), wsum.astype(ivar.dtype), block_grid(loglam, factor)


def block_mean(flux: np.ndarray, weight: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted means ``(..., B)`` float64 of the blocks of ``flux`` ``(..., L)`` that begin at
    ``starts`` (each runs to the next start, the last to the end), and their summed weights; a
    block without weight gets its plain mean."""
    flux, weight = np.asarray(flux, dtype=np.float64), np.asarray(weight, dtype=np.float64)
    lengths = np.diff(np.append(starts, flux.shape[-1]))
    wsum = np.add.reduceat(weight, starts, axis=-1)
    weighted = np.add.reduceat(flux * weight, starts, axis=-1) / np.where(wsum > 0, wsum, 1.0)
    return np.where(wsum > 0, weighted, np.add.reduceat(flux, starts, axis=-1) / lengths), wsum


def log_norm(flux: np.ndarray, wave: np.ndarray) -> np.ndarray:
    """Mean flux in :data:`LOG_NORM_WINDOW`, ``(...,)``; needs the window inside ``wave``."""
    sel = (wave >= LOG_NORM_WINDOW[0]) & (wave <= LOG_NORM_WINDOW[1])
    if not sel.any():
        raise ValueError(f"the 'log' preprocessing needs {LOG_NORM_WINDOW[0]:.0f}-{LOG_NORM_WINDOW[1]:.0f} A "
                         f"inside the grid ({wave.min():.0f}-{wave.max():.0f} A)")
    return flux[..., sel].mean(-1)


def preprocess(flux: np.ndarray, wave: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Normalise spectra for the networks.

    Parameters
    ----------
    flux : ``(..., L)`` flux density, 1e-17 erg/s/cm^2/A.
    wave : ``(L,)`` wavelength in A.
    kind : ``'scale'``: per-spectrum min-max to [0, 1], then to [-1, 1] (NeurIPS 2022);
        ``'log'``: divide by the mean flux in 6900-6950 A, then natural log (ApJ 2024); values
        below :data:`LOG_FLOOR` times the norm are clipped first.

    Returns
    -------
    x : ``(..., L)`` float32 normalised spectra.
    params : ``(..., 2)`` float64, what :func:`deprocess` needs: (min, max) for 'scale',
        (norm, 0) for 'log'.
    """
    flux = np.asarray(flux, dtype=np.float64)
    if kind == "scale":
        params = np.stack([flux.min(-1), flux.max(-1)], -1)
    elif kind == "log":
        norm = log_norm(flux, wave)
        norm = np.where(norm > 0, norm, np.abs(flux).mean(-1) + 1e-30)
        params = np.stack([norm, np.zeros_like(norm)], -1)
    else:
        raise ValueError(f"unknown preprocessing '{kind}': expected one of {PREPROCESSINGS}")
    return reprocess(flux, params, kind), params


def reprocess(flux: np.ndarray, params: np.ndarray, kind: str) -> np.ndarray:
    """``(..., L)`` spectra in 1e-17 erg/s/cm^2/A normalised with given ``params`` ``(..., 2)``
    (:func:`preprocess`'s, broadcasting like :func:`deprocess`'s): for example samples in the
    units of their galaxy's true spectrum. Inverts :func:`deprocess`; float32."""
    flux = np.asarray(flux, dtype=np.float64)
    params = np.asarray(params, dtype=np.float64)
    if kind == "scale":
        lo, hi = params[..., 0:1], params[..., 1:2]
        return (2.0 * (flux - lo) / np.where(hi > lo, hi - lo, 1.0) - 1.0).astype(np.float32)
    if kind == "log":
        return np.log(np.maximum(flux / params[..., 0:1], LOG_FLOOR)).astype(np.float32)
    raise ValueError(f"unknown preprocessing '{kind}': expected one of {PREPROCESSINGS}")


def deprocess(x: np.ndarray, params: np.ndarray, kind: str) -> np.ndarray:
    """Invert :func:`preprocess`: ``(..., L)`` normalised spectra back to 1e-17 erg/s/cm^2/A.

    ``params`` is ``(..., 2)`` as returned by :func:`preprocess` and broadcasts against ``x``'s
    leading dimensions (for example one galaxy's params for all of its samples).
    """
    x = np.asarray(x, dtype=np.float64)
    params = np.asarray(params, dtype=np.float64)
    if kind == "scale":
        lo, hi = params[..., 0:1], params[..., 1:2]
        return ((x + 1.0) / 2.0 * (hi - lo) + lo).astype(np.float32)
    if kind == "log":
        return (np.exp(x) * params[..., 0:1]).astype(np.float32)
    raise ValueError(f"unknown preprocessing '{kind}': expected one of {PREPROCESSINGS}")


class SpectralGrid:
    """The spectra the networks see: a stored ``loglam`` grid combined in blocks of ``downsample``
    pixels and normalised by ``preprocessing``, with the exact inversion. One object owns all of
    it (the instrument of pmelchior/spender, in spirit); datasets, evaluation and exports ask it
    instead of recomputing ``10 ** loglam``.

    Parameters
    ----------
    stored_loglam : ``(L,)`` log10(A) of the stored pixels.
    downsample : pixels per block (inverse-variance weighted, see :func:`rebin`); 1 keeps the grid.
    preprocessing : one of :data:`PREPROCESSINGS`.
    """

    def __init__(self, stored_loglam: np.ndarray, downsample: int = 1, preprocessing: str = "scale") -> None:
        if int(downsample) < 1:
            raise ValueError(f"downsample must be >= 1, got {downsample}")
        if preprocessing not in PREPROCESSINGS:
            raise ValueError(f"unknown preprocessing '{preprocessing}': expected one of {PREPROCESSINGS}")
        self.stored_loglam = np.asarray(stored_loglam, dtype=np.float64)
        self.downsample, self.preprocessing = int(downsample), preprocessing
        if len(self.stored_loglam) < self.downsample:
            raise ValueError(f"downsample {downsample} leaves no pixel of a {len(self.stored_loglam)}-pixel grid")
        #: ``(L',)`` log10(A) of the pixels after downsampling (the mean of each block)
        self.loglam = block_grid(self.stored_loglam, self.downsample)
        #: ``(L',)`` observed-frame vacuum wavelength in A
        self.wave = 10.0 ** self.loglam

    @property
    def n_pixels(self) -> int:
        return len(self.loglam)

    def rebin(self, flux: np.ndarray, ivar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stored ``(..., L)`` flux and ivar onto this grid, ``(..., L')`` each."""
        flux, ivar, _ = rebin(flux, ivar, self.stored_loglam, self.downsample)
        return flux, ivar

    def preprocess(self, flux: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Flux ``(..., L')`` on this grid -> network input ``(..., L')`` and params ``(..., 2)``."""
        return preprocess(flux, self.wave, self.preprocessing)

    def deprocess(self, x: np.ndarray, params: np.ndarray) -> np.ndarray:
        """Network-space spectra ``(..., L')`` back to flux, 1e-17 erg/s/cm^2/A."""
        return deprocess(x, params, self.preprocessing)


#: how a low-resolution spectrum is made from a full one: every ``factor``-th pixel (the ApJ 2024
#: research code's decimation) or the inverse-variance weighted mean flux of each block of
#: ``factor`` pixels (as the datasets bin spectra), normalised like the full spectrum
LOW_REDUCTIONS = ("decimate", "mean")


class LowResolution:
    """The low-resolution version of spectra on a uniform grid of ``n_pixels`` (the cascade's low
    stage, SPEC 5), and its linear interpolation back onto the full grid (the super stage's
    conditioning).

    ``decimate`` keeps pixels 0, f, 2f, ...; ``mean`` averages blocks of f pixels (a last, shorter
    block over what is left) of the flux, weighted by its inverse variance, before the
    preprocessing (:meth:`from_flux`: the mean of log-preprocessed noisy pixels is a biased,
    noisy target in which the lines drown). Either way there are ceil(L / f) low pixels, each
    placed at the mean index of the full pixels it stands for, so that the interpolation lines up
    with the pixels' true wavelengths (the research code's half-pixel-centred interpolation shifted them).

    Parameters
    ----------
    n_pixels : L, pixels of the full spectra.
    factor : f >= 2.
    reduction : one of :data:`LOW_REDUCTIONS`.
    """

    def __init__(self, n_pixels: int, factor: int, reduction: str = "decimate") -> None:
        if reduction not in LOW_REDUCTIONS:
            raise ValueError(f"unknown reduction '{reduction}': expected one of {LOW_REDUCTIONS}")
        if int(factor) < 2:
            raise ValueError(f"a low-resolution factor must be >= 2, got {factor}")
        self.n_pixels, self.factor, self.reduction = int(n_pixels), int(factor), reduction
        self.n_low = -(-self.n_pixels // self.factor)
        starts = np.arange(self.n_low) * self.factor
        stops = np.minimum(starts + self.factor, self.n_pixels)
        #: ``(L_low,)`` fractional full-grid index of each low pixel
        self.positions = starts.astype(np.float64) if reduction == "decimate" else (starts + stops - 1) / 2.0
        self._starts = starts

    def from_flux(self, flux: np.ndarray, ivar: np.ndarray, params: np.ndarray, kind: str) -> np.ndarray:
        """The low-resolution version ``(..., L_low)`` float32 of spectra given in flux units
        ``(..., L)`` with their ``ivar``, preprocessed (``kind``) with the full spectra's ``params``
        ``(..., 2)``: for ``mean`` each block's inverse-variance weighted mean flux (its plain mean
        where no pixel has weight), for ``decimate`` the kept pixels."""
        flux = np.asarray(flux, dtype=np.float64)
        if flux.shape[-1] != self.n_pixels:
            raise ValueError(f"spectra have {flux.shape[-1]} pixels, this low resolution expects {self.n_pixels}")
        if self.reduction == "decimate":
            low = flux[..., :: self.factor]
        else:
            low = block_mean(flux, np.maximum(np.asarray(ivar, dtype=np.float64), 0.0), self._starts)[0]
        return reprocess(low, params, kind)

    def coordinate(self, values: np.ndarray) -> np.ndarray:
        """A coordinate of the full pixels ``(L,)`` (e.g. loglam, uniform) at the low pixels ``(L_low,)``."""
        return np.interp(self.positions, np.arange(self.n_pixels), np.asarray(values, dtype=np.float64))

    def upsample_matrix(self) -> np.ndarray:
        """``(L, L_low)`` float32 weights of the linear interpolation of low-resolution spectra onto the
        full pixels (constant beyond the first and last low pixel): ``full = low @ W.T``."""
        index = np.arange(self.n_pixels, dtype=np.float64)
        right = np.clip(np.searchsorted(self.positions, index, side="right"), 1, max(self.n_low - 1, 1))
        left = right - 1
        span = np.where(self.positions[right] > self.positions[left], self.positions[right] - self.positions[left], 1.0)
        frac = np.clip((index - self.positions[left]) / span, 0.0, 1.0) if self.n_low > 1 else np.zeros_like(index)
        weights = np.zeros((self.n_pixels, self.n_low))
        rows = np.arange(self.n_pixels)
        np.add.at(weights, (rows, left), 1.0 - frac)
        np.add.at(weights, (rows, np.minimum(right, self.n_low - 1)), frac)
        return weights.astype(np.float32)

    def upsample(self, low: np.ndarray) -> np.ndarray:
        """Low-resolution spectra ``(..., L_low)`` linearly interpolated onto the full pixels ``(..., L)``."""
        return np.asarray(low, dtype=np.float32) @ self.upsample_matrix().T

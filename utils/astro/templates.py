"""kcorrect's galaxy spectral templates (Blanton & Roweis 2007: five non-negative NMF components,
rest frame, erg/s/cm^2/A) placed on observed pixel grids.

One home for the templates: the mock survey builds its spectra from them (utils.data.mock) and the
redshift fit of utils.astro.science uses them as its basis.
"""
from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

#: the default kcorrect v4 template set, relative to kcorrect's package folder
TEMPLATE_FILE = ("data", "templates", "kcorrect-default-v4.fits")
#: 1e17: erg/s/cm^2/A to SDSS flux units.
FLUX_UNIT = 1e17


@lru_cache(maxsize=1)
def nmf_templates() -> tuple[np.ndarray, np.ndarray]:
    """Rest-frame wavelengths ``(W,)`` in Angstrom and template fluxes ``(K, W)``."""
    import kcorrect
    import kcorrect.template

    templates = kcorrect.template.Template(filename=os.path.join(kcorrect.KCORRECT_DIR, *TEMPLATE_FILE))
    return (np.asarray(templates.restframe_wave, dtype=np.float64),
            np.asarray(templates.restframe_flux, dtype=np.float64))


def pixel_edges(loglam: np.ndarray) -> np.ndarray:
    """Wavelength edges ``(L + 1,)`` in Angstrom of pixels centred on ``loglam`` (halfway in loglam)."""
    half = 0.5 * np.diff(loglam)
    return 10.0 ** np.concatenate([[loglam[0] - half[0]], loglam[:-1] + half, [loglam[-1] + half[-1]]])


class TemplateSpectra:
    """The templates redshifted onto an observed grid, rebinned flux-conservingly: each pixel holds
    the mean flux density of the redshifted SED over the pixel's extent."""

    def __init__(self, flux: np.ndarray | None = None) -> None:
        """``flux`` ``(K, W)`` replaces the templates' fluxes on their wavelengths (e.g. without
        emission lines, or broadened); default kcorrect's."""
        self.wave, self.flux = nmf_templates()  # (W,), (K, W)
        if flux is not None:
            self.flux = np.atleast_2d(np.asarray(flux, dtype=np.float64))
        mid = 0.5 * (self.flux[:, 1:] + self.flux[:, :-1]) * np.diff(self.wave)
        self.cumulative = np.concatenate([np.zeros((len(self.flux), 1)), np.cumsum(mid, 1)], 1)  # (K, W)

    @property
    def n_templates(self) -> int:
        return len(self.flux)

    @property
    def old_template(self) -> int:
        """Index of the template with the strongest 4000 A break (the old stellar population)."""
        fnu = self.flux * self.wave ** 2
        red = fnu[:, (self.wave > 4000) & (self.wave < 4100)].mean(1)
        blue = fnu[:, (self.wave > 3850) & (self.wave < 3950)].mean(1)
        return int(np.argmax(red / blue))

    def basis(self, z: np.ndarray, loglam: np.ndarray) -> np.ndarray:
        """Every template at every redshift, ``(Z, K, L)``, in 1e-17 erg/s/cm^2/A per unit coefficient."""
        edges = pixel_edges(np.asarray(loglam, dtype=np.float64))
        out = np.empty((len(z), self.n_templates, len(edges) - 1))
        for i, zi in enumerate(np.atleast_1d(z)):
            rest = edges / (1.0 + zi)
            integral = np.stack([np.interp(rest, self.wave, c) for c in self.cumulative])  # (K, L+1)
            out[i] = np.diff(integral, axis=1) / np.diff(rest) / (1.0 + zi)
        return out * FLUX_UNIT

    def observed(self, z: np.ndarray, coeffs: np.ndarray, loglam: np.ndarray) -> np.ndarray:
        """Noiseless spectra ``(N, L)`` of template mixtures ``coeffs`` ``(N, K)`` at redshifts ``z``
        ``(N,)`` on the pixel grid ``loglam`` ``(L,)``, in 1e-17 erg/s/cm^2/A."""
        return np.stack([c @ self.basis(np.array([zi]), loglam)[0] for zi, c in zip(z, coeffs)])

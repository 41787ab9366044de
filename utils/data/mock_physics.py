"""The physics that makes a mock spectrum more than a function of the photometry.

Each relation names its source; simplifications are listed in docs/mock-survey.md.

- **Components.** kcorrect's fit of the galaxy's ugriz fluxes is split into a bulge, the
  template with the strongest 4000 A break (an old population), and a disc, the other four (the
  star-forming mixture); together they still reproduce the catalog photometry.
- **Emission lines are drawn, not inherited.** The templates' own emission lines are cut out
  (:func:`line_free`). H-alpha from star formation starts from what the templates would have
  given the disc and scatters by :data:`HALPHA_SCATTER_DEX` that no colour predicts. Metallicity
  follows the mass-metallicity relation of Tremonti et al. (2004) with stellar mass from the
  rest-frame r luminosity and g - r (Bell et al. 2003); [N II]/H-alpha follows from it through
  the N2 calibration of Pettini & Pagel (2004) and [O III]/H-beta from [N II]/H-alpha along the
  star-forming sequence, :data:`SF_SEQUENCE_OFFSET` dex below the Kauffmann et al. (2003) line
  with 0.1 dex scatter, so metal-rich star formers have weak [O III]. Dust: gas E(B-V) rising with
  mass, Cardelli, Clayton & Mathis (1989) extinction with R_V = 3.1, on an intrinsic Balmer decrement of 2.86 (case B,
  Osterbrock & Ferland 2006). [O II] 3726+3729 (ratio 1.3) and [S II] 6717+6731 (ratio 1.4,
  the low-density limit); [O III] 4959 and [N II] 6548 at 1/2.98 and 1/3.05 of their partners
  (utils.astro.science.TIED).
- **AGN.** The probability rises with bulge mass (up to :data:`AGN_MAX_FRACTION` above
  10^10.5 solar masses; Kauffmann et al. 2003 find AGN in about a third to a half of massive
  emission-line galaxies); a third are Seyferts, the rest LINERs (Kewley et al. 2006 classes),
  with line ratios above the Kewley et al. (2001) line; their lines come from the nucleus, so
  the fibre sees all of them; line widths 250 km/s (narrow-line region) against 50 km/s for
  star formation, both with 70 km/s of instrumental broadening.
- **Stellar velocity dispersion** of bulges from the Faber-Jackson relation L ~ sigma^4,
  sigma = 160 km/s at M_r = -21 with 0.06 dex scatter (Bernardi et al. 2003), applied to the
  bulge template by Gaussian broadening beyond the templates' own resolution
  (:data:`TEMPLATE_SIGMA_KMS`); below it the dispersion has no effect.
- **Fibre aperture.** Light inside a 3" (SDSS) or 2" (BOSS) diameter circle of the PSF-convolved
  bulge and disc profiles that the image shows (utils.data.mock).
"""
from __future__ import annotations

import numpy as np

from utils.astro.science import BALMER_DECREMENT, C_KMS, LINES, TIED, ccm_k, kauffmann03, kewley01

#: every emission line the mock draws, vacuum Angstrom
MOCK_LINES = {**LINES, "oiii_4959": TIED["oiii_4959"][1], "nii_6548": TIED["nii_6548"][1],
              "oii_3726": 3727.09, "oii_3729": 3729.88, "sii_6717": 6718.29, "sii_6731": 6732.67}
#: lines cut out of kcorrect's templates before new ones are drawn (vacuum Angstrom): the above
#: plus the higher Balmer lines, [Ne III], He I, [O I] and [S III]
TEMPLATE_LINES = (*MOCK_LINES.values(), 3869.86, 4102.89, 4341.69, 5877.25, 6302.05, 6365.54, 9071.1, 9533.2)
CUT_HALF_WIDTH_KMS = 900.0
HALPHA_SCATTER_DEX = 0.35
AGN_DECREMENT = 3.1  # narrow-line regions (Osterbrock & Ferland 2006)
INSTRUMENT_SIGMA_KMS = 70.0  # SDSS, R ~ 1800
SF_SIGMA_KMS, AGN_SIGMA_KMS = 50.0, 250.0
AGN_MAX_FRACTION = 0.35
SEYFERT_SHARE = 1 / 3
#: Faber-Jackson: log10 sigma = FJ_ZERO - 0.1 (M_r + 21) (L ~ sigma^4), scatter FJ_SCATTER dex
FJ_ZERO, FJ_SCATTER = np.log10(160.0), 0.06
#: about the velocity resolution of kcorrect's templates near 4000-6500 A (their pixels are
#: ~190 km/s wide): broadening below this changes nothing visible
TEMPLATE_SIGMA_KMS = 150.0
SIGMA_BINS = np.array([150.0, 175.0, 200.0, 230.0, 260.0, 300.0, 350.0])
#: star formers lie this far (dex in [O III]/H-beta) below the Kauffmann et al. (2003) line
SF_SEQUENCE_OFFSET = 0.2
SUN_MR = 4.65  # absolute AB magnitude of the Sun in r (Willmer 2018)
#: the lines drawn directly (the tied ones follow their partners): (source total, share of it)
DRAWN_LINES = {"halpha": ("halpha", 1.0), "hbeta": ("hbeta", 1.0), "nii_6584": ("nii_6584", 1.0),
               "oiii_5007": ("oiii_5007", 1.0), "oii_3726": ("oii", 1 / 2.3), "oii_3729": ("oii", 1.3 / 2.3),
               "sii_6717": ("sii", 1.4 / 2.4), "sii_6731": ("sii", 1 / 2.4)}


def line_free(wave: np.ndarray, flux: np.ndarray) -> np.ndarray:
    """Templates ``(K, W)`` with the emission lines of :data:`TEMPLATE_LINES` cut out: the pixels
    within +-:data:`CUT_HALF_WIDTH_KMS` of any line are joined into runs (H-alpha's window
    overlaps both [N II] lines') and each run is interpolated linearly between the line-free
    pixels on either side of it."""
    out = np.array(flux, dtype=np.float64, copy=True)
    cut = np.zeros(len(wave), dtype=bool)
    for line in TEMPLATE_LINES:
        cut |= np.abs(wave - line) < line * CUT_HALF_WIDTH_KMS / C_KMS
    edges = np.flatnonzero(np.diff(np.concatenate([[0], cut.astype(np.int8), [0]])))
    for first, stop in zip(edges[::2], edges[1::2]):  # the run is pixels first .. stop - 1
        lo, hi = max(first - 1, 0), min(stop, len(wave) - 1)
        t = (wave[lo:hi + 1] - wave[lo]) / (wave[hi] - wave[lo])
        out[:, lo:hi + 1] = out[:, lo:lo + 1] + t * (out[:, hi:hi + 1] - out[:, lo:lo + 1])
    return out


def template_halpha(wave: np.ndarray, flux: np.ndarray, free: np.ndarray) -> np.ndarray:
    """H-alpha (with the [N II] doublet's window) flux per unit coefficient of each template
    ``(K,)``: what the fit would have put into the lines, in template units times Angstrom."""
    half = MOCK_LINES["halpha"] * CUT_HALF_WIDTH_KMS / C_KMS
    inside = np.abs(wave - MOCK_LINES["halpha"]) < half
    excess = (flux - free)[:, inside]
    return np.clip(np.trapezoid(excess, wave[inside], axis=1), 0, None)


def broadened(wave: np.ndarray, flux: np.ndarray, sigma_kms: float) -> np.ndarray:
    """``flux`` ``(W,)`` convolved with a Gaussian of ``sqrt(sigma^2 - TEMPLATE_SIGMA_KMS^2)`` in
    velocity (on a log-wavelength resampling of the template)."""
    extra = np.sqrt(max(sigma_kms ** 2 - TEMPLATE_SIGMA_KMS ** 2, 0.0))
    if extra <= 0:
        return np.array(flux, dtype=np.float64)
    step = 10.0  # km/s per resampled pixel
    loglam = np.arange(np.log(wave[0]), np.log(wave[-1]), step / C_KMS)
    resampled = np.interp(loglam, np.log(wave), flux)
    half = int(np.ceil(4 * extra / step))
    kernel = np.exp(-0.5 * (np.arange(-half, half + 1) * step / extra) ** 2)
    smooth = np.convolve(resampled, kernel / kernel.sum(), mode="same")
    return np.interp(np.log(wave), loglam, smooth)


def stellar_mass(absmag_r: np.ndarray, gr_rest: np.ndarray) -> np.ndarray:
    """log10 stellar mass (solar masses) from the rest-frame r absolute magnitude and g - r
    colour: log M/L_r = -0.306 + 1.097 (g - r) (Bell et al. 2003, diet Salpeter IMF)."""
    return -0.4 * (absmag_r - SUN_MR) + (-0.306 + 1.097 * gr_rest)


def metallicity(log_mass: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """12 + log(O/H) from the mass-metallicity relation of Tremonti et al. (2004) (valid
    8.5 < log M < 11.5, clipped there), with 0.1 dex scatter."""
    m = np.clip(log_mass, 8.5, 11.5)
    return -1.492 + 1.847 * m - 0.08026 * m ** 2 + 0.1 * rng.standard_normal(len(m))


def draw_lines(halpha_disc: np.ndarray, log_mass: np.ndarray, log_bulge_mass: np.ndarray,
               continuum_halpha: np.ndarray, disc_fibre: np.ndarray, rng: np.random.Generator,
               halpha_scatter_dex: float = HALPHA_SCATTER_DEX) -> dict:
    """Emission lines of N galaxies as seen through the fibre.

    Parameters
    ----------
    halpha_disc : ``(N,)`` H-alpha flux the templates would have given the whole disc (observed,
        attenuated; 1e-17 erg/s/cm^2).
    log_mass, log_bulge_mass : ``(N,)`` log10 stellar masses of the galaxy and its bulge.
    continuum_halpha : ``(N,)`` fibre continuum flux density at observed H-alpha (1e-17 erg/s/cm^2/A),
        which sets the AGN lines' strength through their equivalent width.
    disc_fibre : ``(N,)`` share of the disc's light inside the fibre.
    halpha_scatter_dex : scatter of the star-forming H-alpha about what the disc predicts; 0 gives
        the lines a galaxy would have without it (the same random draws are made either way, so
        everything else about the galaxies stays the same: bench/ceilings.py's scatter-free ceiling).

    Returns a dict: ``flux`` {line: (N,)} fibre fluxes of :data:`MOCK_LINES`, ``sigma_kms`` (N,)
    the lines' width, ``agn`` (N,) 0 none / 1 Seyfert / 2 LINER, ``ebv`` (N,), ``oh`` (N,) and
    ``oh_n2`` (N,), the metallicity the drawn [N II]/H-alpha gives through N2 (saturated where
    ``oh`` is above N2's reach).
    """
    n = len(halpha_disc)
    oh = metallicity(log_mass, rng)
    ebv = np.clip(0.25 + 0.12 * (np.clip(log_mass, 8.5, 11.5) - 10.0) + 0.1 * rng.standard_normal(n), 0.0, 0.9)
    attenuation = lambda line: 10 ** (-0.4 * ebv * (ccm_k(MOCK_LINES[line]) - ccm_k(MOCK_LINES["halpha"])))  # noqa: E731

    # star formation, from the disc, scattered in strength; ratios from metallicity
    ha_sf = halpha_disc * 10 ** (halpha_scatter_dex * rng.standard_normal(n)) * disc_fibre
    n2 = np.clip((oh - 8.90) / 0.57, -2.0, -0.25) + 0.05 * rng.standard_normal(n)  # Pettini & Pagel 2004, N2
    o3 = kauffmann03(n2) - SF_SEQUENCE_OFFSET + 0.1 * rng.standard_normal(n)  # along the star-forming sequence
    o2_hb = np.clip(0.45 - 0.8 * (oh - 8.5), -0.5, 0.7) + 0.1 * rng.standard_normal(n)
    s2_ha = -0.45 + 0.1 * rng.standard_normal(n)
    hb_sf = ha_sf / BALMER_DECREMENT  # intrinsic ratio; attenuation below, relative to H-alpha
    sf = {"halpha": ha_sf, "hbeta": hb_sf, "nii_6584": ha_sf * 10 ** n2, "oiii_5007": hb_sf * 10 ** o3,
          "oii": hb_sf * 10 ** o2_hb, "sii": ha_sf * 10 ** s2_ha}

    # AGN: more likely in massive bulges; Seyferts and LINERs above Kewley et al. (2001)
    p_agn = AGN_MAX_FRACTION / (1 + np.exp(-(log_bulge_mass - 10.5) / 0.2))
    agn = np.where(rng.random(n) < p_agn, np.where(rng.random(n) < SEYFERT_SHARE, 1, 2), 0)
    seyfert = agn == 1
    x = np.where(seyfert, -0.05 + 0.15 * rng.standard_normal(n), 0.15 + 0.12 * rng.standard_normal(n))
    x = np.clip(x, -0.6, 0.6)
    y = np.where(seyfert, 0.75 + 0.2 * rng.standard_normal(n), 0.05 + 0.15 * rng.standard_normal(n))
    floor = np.where(x < 0.47, kewley01(np.minimum(x, 0.46)) + 0.05, -np.inf)
    y = np.maximum(y, floor + 0.05 * np.abs(rng.standard_normal(n)))
    ew_agn = 10 ** (np.where(seyfert, np.log10(8.0), np.log10(2.0)) + 0.3 * rng.standard_normal(n))
    ha_agn = np.where(agn > 0, ew_agn * continuum_halpha, 0.0)  # EW ~ flux / continuum (observed-frame units)
    hb_agn = ha_agn / AGN_DECREMENT
    active = {"halpha": ha_agn, "hbeta": hb_agn, "nii_6584": ha_agn * 10 ** x, "oiii_5007": hb_agn * 10 ** y,
              "oii": hb_agn * 10 ** np.where(seyfert, 0.5, 0.8), "sii": ha_agn * 10 ** np.where(seyfert, -0.2, 0.0)}

    # every drawn line from its source total (star formation + AGN), its share of that total (the
    # doublets: [O II] 3729/3726 = 1.3, [S II] 6717/6731 = 1.4) and its attenuation relative to H-alpha
    flux = {line: (sf[source] + active[source]) * share * attenuation(line)
            for line, (source, share) in DRAWN_LINES.items()}
    for tied, (main, _, ratio) in TIED.items():
        flux[tied] = flux[main] * ratio
    # one width per galaxy, shared by its lines: star formation's and the AGN's mixed by their H-alpha
    sf_sigma = np.hypot(np.clip(SF_SIGMA_KMS + 10 * rng.standard_normal(n), 20, None), INSTRUMENT_SIGMA_KMS)
    agn_sigma = np.hypot(np.clip(AGN_SIGMA_KMS + 50 * rng.standard_normal(n), 100, None), INSTRUMENT_SIGMA_KMS)
    agn_share = np.divide(active["halpha"], flux["halpha"], out=np.zeros(n), where=flux["halpha"] > 0)
    sigma = np.sqrt(agn_share * agn_sigma ** 2 + (1 - agn_share) * sf_sigma ** 2)
    return {"flux": flux, "sigma_kms": sigma, "agn": agn, "ebv": ebv, "oh": oh, "oh_n2": 8.90 + 0.57 * n2}


class FibreSpectra:
    """Noise-free fibre spectra of bulge + disc + drawn emission lines on an observed grid.

    Built once per mock: the line-free templates, the old (bulge) template broadened to each of
    :data:`SIGMA_BINS`, and each template's H-alpha per unit coefficient.
    """

    def __init__(self, loglam: np.ndarray) -> None:
        from utils.astro.templates import TemplateSpectra, pixel_edges

        original = TemplateSpectra()
        self.old = original.old_template
        wave = original.wave
        free = line_free(wave, original.flux)
        self.halpha_per_coeff = template_halpha(wave, original.flux, free)
        disc = free.copy()
        disc[self.old] = 0.0
        self.disc = TemplateSpectra(disc)
        self.bulges = [TemplateSpectra(broadened(wave, free[self.old], s)[None]) for s in SIGMA_BINS]
        self.loglam = np.asarray(loglam, dtype=np.float64)
        self.wave = 10 ** self.loglam
        self.edges = pixel_edges(self.loglam)

    def components(self, z: np.ndarray, coeffs: np.ndarray, sigma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Line-free bulge and disc spectra ``(N, L)`` (whole galaxy, 1e-17 erg/s/cm^2/A)."""
        disc = self.disc.observed(z, coeffs, self.loglam)
        bulge = np.empty_like(disc)
        which = np.abs(np.log(np.maximum(sigma, 1.0))[:, None] - np.log(SIGMA_BINS)[None]).argmin(1)
        for b in np.unique(which):
            pick = which == b
            bulge[pick] = self.bulges[b].observed(z[pick], coeffs[pick][:, self.old:self.old + 1], self.loglam)
        return bulge, disc

    def render_lines(self, z: np.ndarray, flux: dict, sigma: np.ndarray) -> np.ndarray:
        """The lines ``(N, L)`` with widths ``sigma`` ``(N,)`` km/s as pixel-integrated Gaussians
        (flux density, 1e-17 erg/s/cm^2/A)."""
        from utils.astro.science import line_profile

        out = np.zeros((len(z), len(self.wave)))
        rows = np.arange(len(z))[:, None]
        for name, rest in MOCK_LINES.items():
            centre = rest * (1 + z)
            width = 6 * centre * sigma / C_KMS  # +-6 sigma
            lo = np.clip(np.searchsorted(self.wave, centre - width) - 1, 0, len(self.wave) - 1)
            n = int(np.max(np.searchsorted(self.wave, centre + width) + 1 - lo))
            idx = np.clip(lo[:, None] + np.arange(max(n, 1))[None], 0, len(self.wave) - 1)
            profile = line_profile(self.edges[idx], self.edges[idx + 1], centre[:, None], sigma[:, None])
            valid = (centre > self.edges[0]) & (centre < self.edges[-1])
            np.add.at(out, (np.broadcast_to(rows, idx.shape), idx), profile * (flux[name] * valid)[:, None])
        return out

    def line_errors(self, z: np.ndarray, sigma: np.ndarray, var: np.ndarray) -> dict:
        """The error each of the four BPT lines' fluxes would have from pixel variances ``var``
        ``(N, L)`` with its profile known (optimal weighting: 1 / sqrt(sum P^2 / var))."""
        from utils.astro.science import line_profile

        out = {}
        for name in LINES:
            centre = (MOCK_LINES[name] * (1 + z))[:, None]
            profile = line_profile(self.edges[None, :-1], self.edges[None, 1:], centre, sigma[:, None])
            with np.errstate(divide="ignore"):
                out[name] = 1.0 / np.sqrt((profile ** 2 / var).sum(1))
        return out

    def continuum_at(self, continuum: np.ndarray, z: np.ndarray, rest: float) -> np.ndarray:
        """Continuum flux density ``(N,)`` at the observed position of rest wavelength ``rest``."""
        pos = rest * (1 + z)
        j = np.clip(np.searchsorted(self.wave, pos), 1, len(self.wave) - 1)
        t = (pos - self.wave[j - 1]) / (self.wave[j] - self.wave[j - 1])
        rows = np.arange(len(z))
        return continuum[rows, j - 1] * (1 - t) + continuum[rows, j] * t

"""Physical properties measured from spectra, vectorised over many spectra.

Every function takes spectra ``(M, L)`` on one observed wavelength grid ``wave`` ``(L,)`` in
Angstrom (vacuum, as SDSS), in 1e-17 erg/s/cm^2/A, and measures all M at once, so that the N
samples of thousands of galaxies, their true spectra and the baselines' spectra go through the
same code:

- redshift: minimum chi^2 of a non-negative fit of kcorrect's five NMF galaxy templates
  (utils.astro.templates) over a redshift grid, refined by a parabola through the minimum;
- Dn4000 (Balogh et al. 1999): mean F_nu in 4000-4100 A over 3850-3950 A, rest frame;
- fluxes and rest-frame equivalent widths of H-beta, [O III] 5007, H-alpha and [N II] 6584: a
  linear least-squares fit of a linear continuum plus pixel-integrated Gaussian lines at the
  measured redshift ([O III] 4959 and [N II] 6548 tied to their partners), with the line width
  fitted where the pixels resolve it;
- the BPT class (Baldwin, Phillips & Terlevich 1981 diagram, [N II]/H-alpha against
  [O III]/H-beta): star-forming below Kauffmann et al. (2003), AGN above Kewley et al. (2001),
  composite between, unclassified when a line's signal-to-noise is below :data:`BPT_MIN_SNR`;
- the emission lines' velocity dispersion (instrumental broadening included), the width fitted
  to the complex of the line with the highest signal-to-noise, where the pixels resolve it;
- the gas's E(B-V) from the Balmer decrement H-alpha / H-beta against case B's 2.86 with the
  Cardelli, Clayton & Mathis (1989) extinction curve;
- the gas-phase metallicity 12 + log(O/H) = 8.90 + 0.57 N2, N2 = log([N II] 6584 / H-alpha)
  (Pettini & Pagel 2004), for star-forming galaxies (it saturates above N2 = -0.3);
- the Balmer lines' fluxes with the stars' absorption under them fitted as a broad Gaussian where
  the pixels resolve the lines.

Each is NaN where the lines it needs have a signal-to-noise below :data:`BPT_MIN_SNR`.

Equivalent widths are positive for emission (the MPA-JHU catalogue's are negative).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
from scipy.special import ndtr

from utils.astro.templates import TemplateSpectra, pixel_edges

C_KMS = 299792.458
#: the emission lines measured, vacuum rest wavelengths in Angstrom
LINES = {"hbeta": 4862.68, "oiii_5007": 5008.24, "halpha": 6564.61, "nii_6584": 6585.27}
#: lines tied to a measured one: (measured line, rest wavelength, flux ratio to it); the atomic
#: ratios 1/2.98 (Storey & Zeippen 2000) and 1/3.05 (Acker et al. 1989)
TIED = {"oiii_4959": ("oiii_5007", 4960.30, 1 / 2.98), "nii_6548": ("nii_6584", 6549.86, 1 / 3.05)}
#: fit windows (rest frame, Angstrom) and the lines fitted together in each
COMPLEXES = (((4780.0, 5080.0), ("hbeta", "oiii_5007")), ((6450.0, 6680.0), ("halpha", "nii_6584")))
#: Gaussian line widths (intrinsic and instrumental together), km/s, tried for each complex; the
#: width is then refined by a parabola in log sigma through the best one and its neighbours
LINE_SIGMAS_KMS = tuple(40.0 * 1.4 ** np.arange(8))  # 40 to 422 km/s
#: pixels wider than this (km/s) do not resolve the lines: their width is not fitted
UNRESOLVED_PIXEL_KMS = 600.0
#: the Balmer lines, whose emission sits in the stars' absorption: where the pixels resolve the
#: lines, the fit adds a Gaussian absorption of :data:`BALMER_ABSORPTION_KMS` at each (the wings
#: of A stars' Balmer lines, ~25 A); without it H-beta's flux on the mock reads 12% low
BALMER_LINES = ("hbeta", "halpha")
BALMER_ABSORPTION_KMS = 1500.0
#: Dn4000 windows (Balogh et al. 1999), rest frame, Angstrom
DN4000_BLUE, DN4000_RED = (3850.0, 3950.0), (4000.0, 4100.0)
BPT_CLASSES = ("unclassified", "star-forming", "composite", "AGN")
BPT_MIN_SNR = 3.0
#: the redshift fit's default range and largest number of pixels (longer spectra are block-averaged)
Z_RANGE = (0.0, 0.6)
FIT_PIXELS = 600
#: the signal-to-noise both Balmer lines need for E(B-V): at 3, H-beta's error alone (0.14 dex in
#: the decrement, 0.33 in E(B-V)) exceeds the spread of dust among galaxies
EBV_MIN_SNR = 5.0
#: case-B Balmer decrement H-alpha / H-beta at 10^4 K (Osterbrock & Ferland 2006)
BALMER_DECREMENT = 2.86
#: the lowest N2 = log([N II] 6584 / H-alpha) that Pettini & Pagel (2004) calibrated
N2_MIN = -2.5
#: properties derived from the line fit: the lines' width, the gas's dust and metallicity
DERIVED = ("sigma_lines", "ebv_gas", "oh_n2")
PROPERTIES = ("z", "dn4000", *(f"ew_{name}" for name in LINES), *(f"flux_{name}" for name in LINES), *DERIVED)


def ccm_k(wave: np.ndarray | float, r_v: float = 3.1) -> np.ndarray:
    """k(lambda) = A_lambda / E(B-V) of Cardelli, Clayton & Mathis (1989), optical/NIR (0.3-3.3 um^-1);
    ``wave`` in Angstrom."""
    x = 1e4 / np.asarray(wave, dtype=np.float64)
    y = x - 1.82
    a = 1 + 0.17699 * y - 0.50447 * y ** 2 - 0.02427 * y ** 3 + 0.72085 * y ** 4 + 0.01979 * y ** 5 \
        - 0.77530 * y ** 6 + 0.32999 * y ** 7
    b = 1.41338 * y + 2.28305 * y ** 2 + 1.07233 * y ** 3 - 5.38434 * y ** 4 - 0.62251 * y ** 5 \
        + 5.30260 * y ** 6 - 2.09002 * y ** 7
    ir = x < 1.1
    a = np.where(ir, 0.574 * x ** 1.61, a)
    b = np.where(ir, -0.527 * x ** 1.61, b)
    return r_v * a + b


def _detected(flux: dict, err: dict, names: tuple[str, ...], min_snr: float) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.all([np.nan_to_num(flux[n] / err[n]) >= min_snr for n in names], axis=0)


def balmer_ebv(flux: dict, err: dict, min_snr: float = EBV_MIN_SNR) -> np.ndarray:
    """The gas's E(B-V) ``(M,)`` from H-alpha / H-beta (``flux`` and ``err`` dicts of line
    fluxes keyed as :data:`LINES`): 2.5 / (k(H-beta) - k(H-alpha)) log10(ratio / 2.86) with
    :func:`ccm_k`; NaN where either line's signal-to-noise is below ``min_snr``. A ratio below
    case B gives a negative value, as measured."""
    ok = _detected(flux, err, ("halpha", "hbeta"), min_snr)
    scale = 2.5 / (ccm_k(LINES["hbeta"]) - ccm_k(LINES["halpha"]))
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.asarray(flux["halpha"], float) / np.asarray(flux["hbeta"], float)
        return np.where(ok, scale * np.log10(ratio / BALMER_DECREMENT), np.nan)


def n2_metallicity(flux: dict, err: dict, bpt: np.ndarray, min_snr: float = BPT_MIN_SNR) -> np.ndarray:
    """12 + log(O/H) ``(M,)`` = 8.90 + 0.57 N2 (Pettini & Pagel 2004) where H-alpha and [N II]
    6584 reach ``min_snr``, N2 is above :data:`N2_MIN` and the BPT diagram (``bpt`` codes of
    :data:`BPT_CLASSES`) does not place the galaxy among composites or AGN, whose lines do not
    trace HII regions: star formers and galaxies whose H-beta or [O III] is too faint to classify
    (metal-rich star formers have weak [O III]); NaN otherwise. N2 saturates near solar
    metallicity: Pettini & Pagel calibrated it below N2 = -0.3 (8.73); above, the value is the
    calibration extended, and it underestimates metal-rich galaxies."""
    ok = _detected(flux, err, ("halpha", "nii_6584"), min_snr)
    with np.errstate(invalid="ignore", divide="ignore"):
        n2 = np.log10(np.asarray(flux["nii_6584"], float) / np.asarray(flux["halpha"], float))
    ok &= np.isin(np.asarray(bpt), [BPT_CLASSES.index("star-forming"), BPT_CLASSES.index("unclassified")])
    ok &= n2 > N2_MIN
    return np.where(ok, 8.90 + 0.57 * n2, np.nan)


def line_width(widths: dict, flux: dict, err: dict, min_snr: float = BPT_MIN_SNR) -> np.ndarray:
    """The lines' velocity dispersion ``(M,)`` km/s: the width fitted to the complex of the line
    with the highest signal-to-noise (``widths`` by line name, from the line fit), NaN where no
    line reaches ``min_snr`` or the pixels do not resolve the width."""
    names = list(LINES)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = np.stack([np.nan_to_num(np.asarray(flux[n], float) / np.asarray(err[n], float), nan=-np.inf)
                        for n in names], 1)
    best = snr.argmax(1)
    width = np.stack([widths[n] for n in names], 1)[np.arange(len(best)), best]
    return np.where(snr.max(1) >= min_snr, width, np.nan)


def line_profile(lo: np.ndarray, hi: np.ndarray, centre: np.ndarray, sigma_kms: np.ndarray | float) -> np.ndarray:
    """Mean flux density over pixels [lo, hi) (Angstrom) of a unit-flux Gaussian line at
    ``centre`` (Angstrom) with velocity dispersion ``sigma_kms``: the share of the line in the
    pixel over the pixel's width. Broadcasts."""
    sigma = centre * np.asarray(sigma_kms) / C_KMS
    return (ndtr((hi - centre) / sigma) - ndtr((lo - centre) / sigma)) / (hi - lo)


def kauffmann03(log_nii_ha: np.ndarray) -> np.ndarray:
    """Upper edge of the star-forming sequence in log([O III]/H-beta) (Kauffmann et al. 2003)."""
    with np.errstate(divide="ignore"):
        return 0.61 / (log_nii_ha - 0.05) + 1.3


def kewley01(log_nii_ha: np.ndarray) -> np.ndarray:
    """Maximum-starburst line in log([O III]/H-beta) (Kewley et al. 2001)."""
    with np.errstate(divide="ignore"):
        return 0.61 / (log_nii_ha - 0.47) + 1.19


#: the demarcation lines of the BPT diagram: (label, function, largest log [N II]/H-alpha, line style)
BPT_DEMARCATIONS = (("Kauffmann et al. 2003", kauffmann03, 0.05, "-"), ("Kewley et al. 2001", kewley01, 0.47, "--"))


def bpt_ratios(flux, prefix: str = "") -> tuple[np.ndarray, np.ndarray]:
    """log [N II] 6584 / H-alpha and log [O III] 5007 / H-beta from the fluxes ``flux[prefix + line]``
    (a dict or a table; e.g. prefix 'flux_' for :meth:`SpectrumProperties.table`, 'true_flux_' for
    a mock catalog)."""
    get = lambda name: np.asarray(flux[prefix + name], dtype=np.float64)  # noqa: E731
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.log10(get("nii_6584") / get("halpha")), np.log10(get("oiii_5007") / get("hbeta"))


def bpt_class(flux: dict, err: dict, min_snr: float = BPT_MIN_SNR) -> np.ndarray:
    """BPT class codes ``(M,)`` (indices into :data:`BPT_CLASSES`) from line fluxes and errors."""
    names = ("hbeta", "oiii_5007", "halpha", "nii_6584")
    snr_ok = np.ones(len(flux["halpha"]), dtype=bool)
    for name in names:
        with np.errstate(invalid="ignore", divide="ignore"):
            snr_ok &= np.asarray(flux[name] / err[name] >= min_snr)
    x, y = bpt_ratios(flux)
    star_forming = (x < 0.05) & (y < kauffmann03(x))
    agn = (x >= 0.47) | (y > kewley01(x))
    code = np.where(star_forming, 1, np.where(agn, 3, 2))
    return np.where(snr_ok & np.isfinite(x) & np.isfinite(y), code, 0)


def _check_grid(flux: np.ndarray, wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flux = np.atleast_2d(np.asarray(flux, dtype=np.float64))
    wave = np.asarray(wave, dtype=np.float64)
    if flux.shape[-1] != len(wave):
        raise ValueError(f"spectra have {flux.shape[-1]} pixels, the wavelength grid {len(wave)}")
    if np.any(np.diff(wave) <= 0):
        raise ValueError("the wavelength grid must increase")
    return np.nan_to_num(flux, nan=0.0, posinf=0.0, neginf=0.0), wave


def _parabola_shift(values: np.ndarray, i: np.ndarray, limit: float) -> np.ndarray:
    """Offset, in grid steps and within +-``limit``, of the minimum of the parabola through
    ``values[m, i - 1 : i + 2]`` for each row m of ``values`` (a uniform grid along axis 1);
    0 where the three points do not curve upwards."""
    rows = np.arange(len(values))
    left, mid, right = values[rows, i - 1], values[rows, i], values[rows, i + 1]
    curvature = left - 2 * mid + right
    with np.errstate(invalid="ignore", divide="ignore"):
        shift = np.where(curvature > 0, 0.5 * (left - right) / curvature, 0.0)
    return np.clip(np.nan_to_num(shift), -limit, limit)


class RedshiftFitter:
    """Template-fitting redshifts on one wavelength grid.

    The basis (every template at every trial redshift) and, for each of the 31 subsets of the five
    templates, the inverse of its Gram matrix are computed once. The non-negative least-squares
    fit at each trial redshift is then exact and vectorised: the NNLS solution is the
    unconstrained least-squares solution on its own support, so it is the best of the subset
    solutions whose coefficients are all non-negative.

    Parameters
    ----------
    wave : ``(L,)`` observed wavelengths, Angstrom.
    z_range : trial redshifts, uniformly spaced in log10(1 + z) by one fit pixel.
    weights : ``(L,)`` pixel weights shared by all spectra (e.g. a typical inverse variance, which
        down-weights sky lines); default uniform.
    fit_pixels : spectra longer than this are block-averaged to at most this many pixels first.
    """

    def __init__(self, wave: np.ndarray, z_range: tuple[float, float] = Z_RANGE, weights: np.ndarray | None = None,
                 fit_pixels: int = FIT_PIXELS) -> None:
        wave = np.asarray(wave, dtype=np.float64)
        self.block = max(1, -(-len(wave) // fit_pixels))
        n = len(wave) // self.block
        self.loglam = np.log10(wave[: n * self.block]).reshape(n, self.block).mean(1)
        w = np.ones(len(wave)) if weights is None else np.clip(np.nan_to_num(np.asarray(weights, float)), 0, None)
        self.weights = w[: n * self.block].reshape(n, self.block).mean(1)
        step = float(np.median(np.diff(self.loglam)))
        lo, hi = np.log10(1 + z_range[0]), np.log10(1 + z_range[1])
        self.log1pz = np.arange(lo, hi + step / 2, step)
        self.z = 10 ** self.log1pz - 1
        basis = TemplateSpectra().basis(self.z, self.loglam)  # (Z, K, Lf)
        self.scale = float(np.abs(basis).max())
        self.basis = (basis / self.scale).astype(np.float32)
        gram = np.einsum("zkl,zjl->zkj", self.basis * self.weights, self.basis, dtype=np.float64)
        k = basis.shape[1]
        self.subsets = [list(s) for size in range(1, k + 1) for s in combinations(range(k), size)]
        self.inverse = [np.linalg.pinv(gram[:, s][:, :, s]) for s in self.subsets]  # each (Z, |S|, |S|)

    def _fit_grid(self, flux: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = len(flux)
        f = flux[:, : len(self.loglam) * self.block].reshape(m, len(self.loglam), self.block).mean(-1)
        wf = (f * self.weights).astype(np.float32)
        b = np.einsum("zkl,ml->zkm", self.basis, wf, dtype=np.float32).astype(np.float64)  # (Z, K, M)
        best = np.zeros((len(self.z), m))
        for subset, inverse in zip(self.subsets, self.inverse):
            bs = b[:, subset]  # (Z, |S|, M)
            coeffs = inverse @ bs
            reduction = np.einsum("zsm,zsm->zm", bs, coeffs)
            feasible = np.all(coeffs >= 0, axis=1)
            np.maximum(best, np.where(feasible, reduction, 0.0), out=best)
        chi2 = np.einsum("ml,ml->m", f * self.weights, f)[None] - best  # (Z, M)
        return chi2, f

    def fit(self, flux: np.ndarray, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
        """Best redshifts ``(M,)`` and their chi^2 per degree of freedom ``(M,)`` (with uniform
        weights, in squared flux units). Non-finite pixels count as zero flux; a spectrum without
        one finite pixel gets NaN for both."""
        flux = np.atleast_2d(np.asarray(flux))
        z, chi = np.empty(len(flux)), np.empty(len(flux))
        dof = max(1, len(self.loglam) - 5)
        step = self.log1pz[1] - self.log1pz[0] if len(self.z) > 1 else 0.0
        for start in range(0, len(flux), chunk):
            chi2, _ = self._fit_grid(np.nan_to_num(np.asarray(flux[start:start + chunk], dtype=np.float64)))
            i = np.argmin(chi2, axis=0)
            chi[start:start + chunk] = chi2[i, np.arange(chi2.shape[1])] / dof
            inside = (i > 0) & (i < len(self.z) - 1)  # a minimum at the grid's edge is not refined
            shift = (np.where(inside, _parabola_shift(chi2.T, np.clip(i, 1, len(self.z) - 2), 0.5), 0.0)
                     if len(self.z) >= 3 else np.zeros(len(i)))
            z[start:start + chunk] = 10 ** (self.log1pz[i] + shift * step) - 1
        empty = ~np.isfinite(flux).any(axis=1)
        z[empty], chi[empty] = np.nan, np.nan
        return z, chi


def redshift_weights(ivar: np.ndarray) -> np.ndarray:
    """The redshift fit's pixel weights for a set of measured spectra ``(G, L)``: each pixel's
    median inverse variance over the galaxies, so that sky lines and pixels masked in most spectra
    weigh little and no single galaxy's noise sets them (``RedshiftFitter(weights=...)``). Where no
    pixel has a positive median (no usable inverse variances at all), every pixel weighs the same."""
    ivar = np.asarray(ivar, dtype=np.float64)
    if ivar.ndim != 2 or not len(ivar):
        raise ValueError(f"ivar must be (galaxies, pixels) with at least one galaxy, got shape {ivar.shape}")
    weights = np.median(np.nan_to_num(ivar, nan=0.0, posinf=0.0, neginf=0.0), axis=0)
    return weights if np.any(weights > 0) else np.ones_like(weights)


def dn4000(flux: np.ndarray, wave: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Dn4000 ``(M,)``: the ratio of the mean F_nu in the rest-frame 4000-4100 A and 3850-3950 A
    windows (Balogh et al. 1999), from pixel-exact integrals of the piecewise-constant spectrum;
    NaN where a window leaves the grid."""
    flux, wave = _check_grid(flux, wave)
    return _dn4000(flux, wave, z)


def _dn4000(flux: np.ndarray, wave: np.ndarray, z: np.ndarray) -> np.ndarray:
    z = np.broadcast_to(np.asarray(z, dtype=np.float64), (len(flux),))
    all_edges = pixel_edges(np.log10(wave))
    # only the pixels the windows can reach at these redshifts
    first = max(int(np.searchsorted(all_edges, DN4000_BLUE[0] * (1 + np.nanmin(z)))) - 2, 0)
    last = min(int(np.searchsorted(all_edges, DN4000_RED[1] * (1 + np.nanmax(z)))) + 2, len(wave))
    if not np.all(np.isfinite(z)) or last <= first:
        first, last = 0, len(wave)
    edges, wave = all_edges[first:last + 1], wave[first:last]
    fnu_dlam = flux[:, first:last] * wave ** 2 * np.diff(edges)  # integral of F_nu (up to a constant) per pixel
    cumulative = np.concatenate([np.zeros((len(flux), 1)), np.cumsum(fnu_dlam, 1)], 1)  # (M, L+1)

    def integral(lam_rest: float) -> np.ndarray:
        lam = lam_rest * (1 + z)
        j = np.clip(np.searchsorted(edges, lam) - 1, 0, len(wave) - 1)
        frac = np.clip((lam - edges[j]) / (edges[j + 1] - edges[j]), 0, 1)
        value = cumulative[np.arange(len(flux)), j] + frac * fnu_dlam[np.arange(len(flux)), j]
        return np.where((lam >= all_edges[0]) & (lam <= all_edges[-1]), value, np.nan)

    with np.errstate(invalid="ignore", divide="ignore"):
        red = integral(DN4000_RED[1]) - integral(DN4000_RED[0])
        blue = integral(DN4000_BLUE[1]) - integral(DN4000_BLUE[0])
        return red / blue  # equal widths: the ratio of the integrals is the ratio of the means


def fit_lines(flux: np.ndarray, wave: np.ndarray, z: np.ndarray, sigmas: tuple[float, ...] = LINE_SIGMAS_KMS
              ) -> tuple[dict, dict, dict]:
    """Line fluxes, their errors and rest-frame equivalent widths, each a dict of ``(M,)`` arrays
    keyed by the names in :data:`LINES`.

    Each complex of :data:`COMPLEXES` is fitted within its rest-frame window by least squares:
    a linear continuum plus one pixel-integrated Gaussian per line (tied lines share their
    partner's amplitude at the fixed ratio), for each trial width in ``sigmas`` (the lines of a
    complex share it), keeping the best fit. Errors come from the fit's residual scatter, the same
    for every spectrum whether measured or generated. Fluxes in 1e-17 erg/s/cm^2; EWs in Angstrom,
    positive for emission; NaN where the window leaves the grid or the continuum is not positive.
    """
    flux, wave = _check_grid(flux, wave)
    return _fit_lines(flux, wave, z, sigmas)[:3]


def _fit_lines(flux: np.ndarray, wave: np.ndarray, z: np.ndarray, sigmas: tuple[float, ...] = LINE_SIGMAS_KMS
               ) -> tuple[dict, dict, dict, dict]:
    """:func:`fit_lines`, and the fitted width (km/s) by line name, NaN where the pixels do not
    resolve it."""
    edges = pixel_edges(np.log10(wave))
    z = np.broadcast_to(np.asarray(z, dtype=np.float64), (len(flux),))
    rows = np.arange(len(flux))[:, None]
    fluxes, errors, ews, widths = {}, {}, {}, {}
    resolved = C_KMS * np.median(np.diff(np.log(wave))) <= UNRESOLVED_PIXEL_KMS
    for (lo, hi), names in COMPLEXES:
        start = np.searchsorted(wave, lo * (1 + z))
        stop = np.searchsorted(wave, hi * (1 + z))
        n = int(max(1, (stop - start).max()))
        idx = start[:, None] + np.arange(n)[None]
        inside = (idx < stop[:, None]) & (idx < len(wave))
        idx = np.clip(idx, 0, len(wave) - 1)
        y = np.where(inside, flux[rows, idx], 0.0)
        lam = wave[idx]
        centre = 0.5 * (lo + hi) * (1 + z)[:, None]
        continuum_columns = [inside * 1.0, inside * (lam - centre) / (hi - lo) / (1 + z)[:, None]]
        if resolved:  # the stars' Balmer absorption under the emission, broad against it
            continuum_columns += [inside * line_profile(edges[idx], edges[idx + 1], LINES[name] * (1 + z)[:, None],
                                                        BALMER_ABSORPTION_KMS)
                                  for name in names if name in BALMER_LINES]

        def fit(sigma_kms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            columns = list(continuum_columns)
            for name in names:
                profile = np.zeros_like(lam)
                for rest, ratio in [(LINES[name], 1.0)] + [(w, r) for _, (main, w, r) in TIED.items() if main == name]:
                    profile += ratio * line_profile(edges[idx], edges[idx + 1], rest * (1 + z)[:, None],
                                                    sigma_kms[:, None])
                columns.append(profile * inside)
            design = np.stack(columns, -1)  # (M, n, P)
            normal = np.einsum("mnp,mnq->mpq", design, design)
            # a tiny ridge keeps blended lines (16-pixel blocks) solvable; batched LU, not SVD
            ridge = np.maximum(1e-9 * np.trace(normal, axis1=1, axis2=2) / normal.shape[-1], 1e-30)[:, None, None]
            inverse = np.linalg.inv(normal + ridge * np.eye(normal.shape[-1]))
            coeffs = np.einsum("mpq,mq->mp", inverse, np.einsum("mnp,mn->mp", design, y))
            return ((y - np.einsum("mnp,mp->mn", design, coeffs)) ** 2).sum(1), coeffs, inverse

        # the lines' width, fitted: a grid in log sigma, a parabola through the best and its neighbours;
        # lines much narrower than a pixel are boxes whatever their width: one mid-range width then
        grid = np.log(np.asarray(sigmas, dtype=np.float64))
        if not resolved:
            grid = np.log([np.sqrt(sigmas[0] * sigmas[-1])])
        rss = np.stack([fit(np.full(len(z), np.exp(g)))[0] for g in grid], 1)  # (M, S)
        if len(grid) >= 3:
            i = np.clip(rss.argmin(1), 1, len(grid) - 2)
            log_sigma = grid[i] + _parabola_shift(rss, i, 1.0) * (grid[1] - grid[0])
        else:
            log_sigma = grid[rss.argmin(1)]
        rss, coeffs, inverse = fit(np.exp(log_sigma))
        n_params = len(continuum_columns) + len(names)
        var = rss / np.maximum(inside.sum(1) - n_params, 1)
        ok = (start > 0) & (stop < len(wave)) & (inside.sum(1) > n_params)
        for k, name in enumerate(names):
            line = coeffs[:, len(continuum_columns) + k]
            continuum = coeffs[:, 0] + coeffs[:, 1] * (LINES[name] - 0.5 * (lo + hi)) / (hi - lo)
            fluxes[name] = np.where(ok, line, np.nan)
            j = len(continuum_columns) + k
            errors[name] = np.where(ok, np.sqrt(np.maximum(var * inverse[:, j, j], 0)), np.nan)
            with np.errstate(invalid="ignore", divide="ignore"):
                ews[name] = np.where(ok & (continuum > 0), line / continuum / (1 + z), np.nan)
            widths[name] = np.where(ok & resolved, np.exp(log_sigma), np.nan)
    return fluxes, errors, ews, widths


@dataclass
class SpectrumProperties:
    """What :func:`measure` returns; every array has one entry per spectrum."""

    z: np.ndarray
    chi2: np.ndarray
    dn4000: np.ndarray
    flux: dict
    flux_err: dict
    ew: dict
    bpt: np.ndarray
    sigma_lines: np.ndarray
    ebv_gas: np.ndarray
    oh_n2: np.ndarray

    def table(self) -> dict[str, np.ndarray]:
        """Flat columns named as in :data:`PROPERTIES`, plus ``bpt``."""
        out = {"z": self.z, "dn4000": self.dn4000}
        out.update({f"ew_{k}": v for k, v in self.ew.items()})
        out.update({f"flux_{k}": v for k, v in self.flux.items()})
        out.update({name: getattr(self, name) for name in DERIVED})
        out["bpt"] = self.bpt
        return out


def measure(flux: np.ndarray, wave: np.ndarray, z: np.ndarray | None = None, fitter: RedshiftFitter | None = None,
            chunk: int = 4096) -> SpectrumProperties:
    """Every property of spectra ``(M, L)``; ``z`` ``(M,)`` skips the redshift fit (measure at a
    known redshift); ``fitter`` reuses a :class:`RedshiftFitter` built for this grid."""
    flux, wave = _check_grid(flux, wave)
    if z is None:
        fitter = fitter or RedshiftFitter(wave)
        z, chi2 = fitter.fit(flux)
    else:
        z, chi2 = np.broadcast_to(np.asarray(z, float), (len(flux),)).copy(), np.full(len(flux), np.nan)
    parts = []
    for start in range(0, len(flux), chunk):
        sl = slice(start, start + chunk)
        parts.append((_dn4000(flux[sl], wave, z[sl]), *_fit_lines(flux[sl], wave, z[sl])))
    join = lambda i: {k: np.concatenate([p[i][k] for p in parts]) for k in LINES}  # noqa: E731
    fluxes, errors = join(1), join(2)
    bpt = bpt_class(fluxes, errors)
    return SpectrumProperties(z=z, chi2=chi2, dn4000=np.concatenate([p[0] for p in parts]), flux=fluxes,
                              flux_err=errors, ew=join(3), bpt=bpt, sigma_lines=line_width(join(4), fluxes, errors),
                              ebv_gas=balmer_ebv(fluxes, errors), oh_n2=n2_metallicity(fluxes, errors, bpt))

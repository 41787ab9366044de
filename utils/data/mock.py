"""An SDSS-like mock survey built from real SDSS galaxies: the embedded default data.

Objects are the 10,000 SDSS galaxies shipped with kcorrect (``data/test/gst_tests_small.fits``),
cut to 0.02 < z < 0.3. For each one, kcorrect's NMF templates are fitted to its ugriz model
fluxes at its redshift; the fit is split into a bulge (the old-star template) and a disc (the
others). Images are a de Vaucouleurs bulge plus an exponential disc whose band-by-band flux split
follows that decomposition, sized by a size-luminosity relation, convolved with a 1.4" PSF, with
sky and photon noise. The spectrum is what a 3" (or 2") fibre sees of the same two profiles,
plus emission lines and AGN drawn per galaxy (utils.data.mock_physics), rebinned onto the SDSS grid
with SDSS-like noise; the catalog carries fibre magnitudes and every true property.

Run ``python -m utils.mock --help``. Simplifications are listed in docs/mock-survey.md.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from astropy.cosmology import Planck18
from astropy.table import Table
from astropy.visualization import make_lupton_rgb
from PIL import Image
from tqdm import tqdm

from utils.astro.photometry import FIBRE_DIAMETER, PIXEL_SCALE, aperture_weights
from utils.astro.science import LINES, bpt_class, dn4000
from utils.astro.spectra import apj_wave, neurips_loglam
from utils.astro.templates import FLUX_UNIT, TemplateSpectra
from utils.data.dataset import BANDS, IMAGE_SIZE, DatasetWriter, assign_split, open_survey
from utils.data.mock_physics import (
    FJ_SCATTER,
    FJ_ZERO,
    HALPHA_SCATTER_DEX,
    MOCK_LINES,
    FibreSpectra,
    draw_lines,
    stellar_mass,
)
from utils.data.prepare import GRIDS, to_grid
from utils.errors import UserError

logger = logging.getLogger(__name__)

Z_RANGE = (0.02, 0.3)
KCORRECT_CATALOG = ("data", "test", "gst_tests_small.fits")
PSF_FWHM = 1.4  # arcsec
OVERSAMPLE = 3  # sub-pixels per pixel side when rendering profiles
#: Sky surface brightness (AB mag / arcsec^2) at a dark SDSS site, per band.
SKY_MU = np.array([22.1, 21.8, 20.9, 20.2, 18.9])
#: Photo-electrons per nanomaggy in one 53.9 s SDSS exposure (approximate DR7 calibrations).
ELECTRONS_PER_NMGY = np.array([160.0, 825.0, 940.0, 714.0, 157.0])
#: Spectroscopic noise model: a galaxy of r = 17.77 (main-sample limit) has a median S/N per
#: pixel of about 10 in the r band (sky continuum and lines from SKY_LINES below).
SPEC_ELECTRONS = 6.0
SKY_LINES = ((5577.3, 200.0), (5889.9, 40.0), (6300.3, 60.0), (6363.8, 20.0), (7246.0, 30.0), (7341.0, 40.0),
             (7794.1, 45.0), (7913.7, 45.0), (8344.6, 70.0), (8399.2, 60.0), (8430.2, 50.0), (8827.1, 90.0),
             (8885.8, 75.0))
#: Size-luminosity relations: log10(R_e / kpc) = a + b (M_r + 21) + scatter.
DISC_SIZE = (0.60, -0.10, 0.15)
BULGE_SIZE = (0.30, -0.22, 0.15)
#: Lupton colour composite (i, r, g) -> (R, G, B): band weights, stretch and Q, in nanomaggies.
RGB_WEIGHTS = (1.0, 1.15, 1.6)
RGB_STRETCH = 0.4
RGB_Q = 8.0
JPEG_QUALITY = 75
CHUNK = 500
OBJID_OFFSET = 1_000_000_000


# --------------------------------------------------------------------------------------------
# catalog and template fits
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def kcorrect_sdss():
    """A kcorrect SDSS fitter on 0 <= z <= 0.5 (built once; takes a few seconds)."""
    import kcorrect.kcorrect
    return kcorrect.kcorrect.KcorrectSDSS(redshift_range=[0.0, 0.5], nredshift=1000)


def load_real_catalog() -> Table:
    """The real galaxies: RA, DEC, Z and dereddened AB maggies / ivar, cut to :data:`Z_RANGE`."""
    import kcorrect
    path = os.path.join(kcorrect.KCORRECT_DIR, *KCORRECT_CATALOG)
    raw = Table.read(path)
    z = np.asarray(raw["Z"], dtype=np.float64)
    flux = np.asarray(raw["MODELFLUX"], dtype=np.float64)
    ivar = np.asarray(raw["MODELFLUX_IVAR"], dtype=np.float64)
    keep = (z > Z_RANGE[0]) & (z < Z_RANGE[1]) & np.all(flux > 0, 1) & np.all(ivar > 0, 1)
    dered = 10.0 ** (0.4 * np.asarray(raw["EXTINCTION"], dtype=np.float64))
    maggies = flux[keep] * 1e-9 * dered[keep]
    ivar = ivar[keep] * 1e18 / dered[keep] ** 2
    kc = kcorrect_sdss()
    maggies, ivar = kc.to_ab(maggies=maggies, ivar=ivar)
    # a 2 % error floor keeps the template fit from chasing sub-percent calibration offsets
    ivar = 1.0 / (1.0 / ivar + (0.02 * maggies) ** 2)
    return Table({"ra": np.asarray(raw["RA"], dtype=np.float64)[keep],
                  "dec": np.asarray(raw["DEC"], dtype=np.float64)[keep],
                  "z": z[keep], "maggies": maggies, "maggies_ivar": ivar})


@dataclass
class MockGalaxies:
    """The physical description of N mock galaxies (all arrays have N rows)."""

    objid: np.ndarray  # (N,) int64
    ra: np.ndarray  # (N,) deg
    dec: np.ndarray  # (N,) deg
    z: np.ndarray  # (N,)
    coeffs: np.ndarray  # (N, 5) kcorrect template coefficients
    maggies: np.ndarray  # (N, 5) catalog AB maggies, ugriz
    source_row: np.ndarray  # (N,) row of the real galaxy it comes from

    def __len__(self) -> int:
        return len(self.z)

    @property
    def mags(self) -> np.ndarray:
        return -2.5 * np.log10(self.maggies)

    def __getitem__(self, index) -> "MockGalaxies":
        """The galaxies at ``index`` (a slice gives views, an index array copies)."""
        return MockGalaxies(*(getattr(self, f)[index] for f in self.__dataclass_fields__))

    def __add__(self, other: "MockGalaxies") -> "MockGalaxies":
        """The galaxies of both, these first."""
        return MockGalaxies(*(np.concatenate([getattr(self, f), getattr(other, f)]) for f in self.__dataclass_fields__))


@lru_cache(maxsize=1)
def _real_galaxies() -> tuple[MockGalaxies, int]:
    """The real galaxies with a usable template fit, and how many real galaxies were read (computed
    once per process: the catalog read and the fits take a few seconds)."""
    real = load_real_catalog()
    z = np.asarray(real["z"])
    coeffs = kcorrect_sdss().fit_coeffs(redshift=z, maggies=np.asarray(real["maggies"]),
                                        ivar=np.asarray(real["maggies_ivar"]))
    good = coeffs.sum(1) > 0
    base = MockGalaxies(objid=OBJID_OFFSET + np.flatnonzero(good).astype(np.int64), ra=np.asarray(real["ra"])[good],
                        dec=np.asarray(real["dec"])[good], z=z[good], coeffs=coeffs[good].astype(np.float64),
                        maggies=np.asarray(real["maggies"])[good], source_row=np.flatnonzero(good))
    return base, len(real)


def sample_galaxies(n_objects: int | None, seed: int) -> MockGalaxies:
    """The real galaxies with their template fits; more than there are are resampled.

    Resampled objects are perturbed copies of a random real galaxy (:func:`resample_galaxies`).
    """
    cached, n_real = _real_galaxies()
    base = cached[np.arange(len(cached))]  # a copy: callers may edit it
    n_base = len(base)
    if n_objects is None or n_objects == n_base:
        return base
    rng = np.random.default_rng([seed, 1])
    if n_objects < n_base:
        pick = np.sort(rng.choice(n_base, size=n_objects, replace=False))
        return base[pick]
    extra = n_objects - n_base
    ids = OBJID_OFFSET + 10 * n_real + np.arange(extra, dtype=np.int64)
    return base + resample_galaxies(base, rng.integers(0, n_base, size=extra), ids, rng)


def resample_galaxies(gal: MockGalaxies, src: np.ndarray, objid: np.ndarray, rng: np.random.Generator) -> MockGalaxies:
    """New galaxies resampled from ``gal[src]``: the redshift perturbed by 0.01 (1 + z) (kept
    inside :data:`Z_RANGE`), every template coefficient scaled by a log-normal factor of 10 %
    scatter, a position offset of up to 0.5 deg; catalog magnitudes from the perturbed template
    fit; object ids ``objid``."""
    extra = len(src)
    z_new = np.clip(gal.z[src] + 0.01 * (1 + gal.z[src]) * rng.standard_normal(extra), Z_RANGE[0] + 1e-3,
                    Z_RANGE[1] - 1e-3)
    c_new = gal.coeffs[src] * np.exp(0.1 * rng.standard_normal((extra, gal.coeffs.shape[1])))
    m_new = np.einsum("nbk,nk->nb", kcorrect_sdss().Amatrix(z_new), c_new)
    ra_new = (gal.ra[src] + rng.uniform(-0.5, 0.5, extra)) % 360.0
    dec_new = np.clip(gal.dec[src] + rng.uniform(-0.5, 0.5, extra), -90, 90)
    return MockGalaxies(np.asarray(objid, dtype=np.int64), ra_new, dec_new, z_new, c_new, m_new, gal.source_row[src])


# --------------------------------------------------------------------------------------------
# spectra
# --------------------------------------------------------------------------------------------
def sky_spectrum(wave: np.ndarray) -> np.ndarray:
    """Sky flux per pixel ``(L,)`` in 1e-17 erg/s/cm^2/A: a red-rising continuum plus lines."""
    sky = 4.0 + 8.0 * ((wave - 3800.0) / 5000.0).clip(0) ** 2
    sigma = 1.6  # A, about the SDSS line-spread function
    for centre, peak in SKY_LINES:
        sky = sky + peak * np.exp(-0.5 * ((wave - centre) / sigma) ** 2)
    return sky


def throughput(wave: np.ndarray) -> np.ndarray:
    """Relative spectrograph throughput: peaks near 6500 A, falls to the blue and red ends."""
    return 0.25 + 0.75 * np.exp(-0.5 * ((wave - 6500.0) / 1900.0) ** 2)


def add_spectral_noise(flux: np.ndarray, wave: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Noisy flux and ivar ``(N, L)``: photon noise of galaxy plus sky, scaled by throughput."""
    gain = SPEC_ELECTRONS * throughput(wave)
    var = (np.maximum(flux, 0.0) + sky_spectrum(wave)) / gain + 0.01
    noisy = flux + np.sqrt(var) * rng.standard_normal(flux.shape)
    return noisy.astype(np.float32), (1.0 / var).astype(np.float32)


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------
def _sersic_b(n: float) -> float:
    """b_n of a Sersic profile (Ciotti & Bertin 1999 expansion)."""
    return 2 * n - 1 / 3 + 4 / (405 * n) + 46 / (25515 * n ** 2)


def sersic_stamps(r_e: torch.Tensor, q: torch.Tensor, pa: torch.Tensor, offset: torch.Tensor, n: float,
                  size: int = IMAGE_SIZE, batch: int = 32) -> torch.Tensor:
    """Unit-flux Sersic profiles ``(B, size, size)`` convolved with the PSF.

    Parameters
    ----------
    r_e : ``(B,)`` half-light semi-major axis in pixels.
    q : ``(B,)`` axis ratio; pa : ``(B,)`` position angle in radians.
    offset : ``(B, 2)`` centre offset from the stamp centre in pixels.
    n : Sersic index (4 for a de Vaucouleurs bulge, 1 for an exponential disc).
    batch : profiles rendered at a time on the oversampled grid (small blocks stay in the CPU's
        cache: four to seven times faster than 500 at once, docs/performance.md; the result is
        the same).
    """
    fine = size * OVERSAMPLE
    axis = (torch.arange(fine, dtype=torch.float32) + 0.5) / OVERSAMPLE - size / 2
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    b_n = _sersic_b(n)
    parts = []
    for start in range(0, len(r_e), batch):
        sl = slice(start, start + batch)
        x = xx[None] - offset[sl, 0, None, None]
        y = yy[None] - offset[sl, 1, None, None]
        c, s = torch.cos(pa[sl])[:, None, None], torch.sin(pa[sl])[:, None, None]
        major = x * c + y * s
        minor = (-x * s + y * c) / q[sl, None, None]
        r = torch.sqrt(major ** 2 + minor ** 2 + 1e-6) / r_e[sl, None, None]
        profile = torch.exp(-b_n * ((r if n == 1 else r ** (1.0 / n)) - 1.0))
        parts.append(F.avg_pool2d(profile[:, None], OVERSAMPLE))
    profile = torch.cat(parts) if parts else torch.zeros(0, 1, size, size)
    profile = profile / profile.sum((2, 3), keepdim=True)
    return psf_convolve(profile)[:, 0]


@lru_cache(maxsize=1)
def _psf_kernel() -> torch.Tensor:
    sigma = PSF_FWHM / 2.3548 / PIXEL_SCALE
    half = int(np.ceil(4 * sigma))
    x = torch.arange(-half, half + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def psf_convolve(images: torch.Tensor) -> torch.Tensor:
    """Convolve ``(B, 1, H, W)`` with the Gaussian PSF (separable, zero padding)."""
    k = _psf_kernel()
    pad = len(k) // 2
    images = F.conv2d(images, k.view(1, 1, 1, -1), padding=(0, pad))
    return F.conv2d(images, k.view(1, 1, -1, 1), padding=(pad, 0))


def angular_sizes(z: np.ndarray, mag_r: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Disc and bulge half-light radii in pixels from size-luminosity relations and D_A(z)."""
    absmag = mag_r - Planck18.distmod(z).value
    kpc_per_pixel = (Planck18.angular_diameter_distance(z).to("kpc").value * np.deg2rad(PIXEL_SCALE / 3600.0))
    sizes = []
    for a, b, scatter in (DISC_SIZE, BULGE_SIZE):
        log_r = a + b * (absmag + 21.0) + scatter * rng.standard_normal(len(z))
        sizes.append(np.clip(10.0 ** log_r / kpc_per_pixel, 0.3, 25.0))
    return sizes[0], sizes[1]


@dataclass
class RenderedImages:
    """ugriz images and what the spectrum needs to know about the same light profiles."""

    images: np.ndarray  # (N, 5, 64, 64) float32 nanomaggies per pixel, sky-subtracted, noisy
    r_disc: np.ndarray  # (N,) half-light semi-major axes, arcsec
    r_bulge: np.ndarray
    fibre_disc: np.ndarray  # (N,) share of the (PSF-convolved) disc light inside the fibre
    fibre_bulge: np.ndarray


def render_images(gal: MockGalaxies, bulge_fraction: np.ndarray, rng: np.random.Generator,
                  fibre_diameter: float = 3.0) -> RenderedImages:
    """Bulge + disc images of the galaxies and the fibre's share of each component's light."""
    n = len(gal)
    flux = gal.maggies * 1e9  # (N, 5) nanomaggies
    r_disc, r_bulge = angular_sizes(gal.z, gal.mags[:, 2], rng)
    q_disc = rng.uniform(0.25, 1.0, n)
    q_bulge = np.clip(q_disc + 0.3, 0.6, 1.0)
    pa = rng.uniform(0, np.pi, n)
    offset = rng.uniform(-0.5, 0.5, (n, 2))
    t = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    disc = sersic_stamps(t(r_disc), t(q_disc), t(pa), t(offset), 1.0)
    bulge = sersic_stamps(t(r_bulge), t(q_bulge), t(pa), t(offset), 4.0)
    aperture = aperture_weights(t(offset), fibre_diameter, IMAGE_SIZE)
    fibre_disc, fibre_bulge = ((profile * aperture).sum((1, 2)).numpy().astype(np.float64) for profile in (disc, bulge))
    disc, bulge = disc.numpy(), bulge.numpy()
    bt = bulge_fraction[:, :, None, None]
    model = flux[:, :, None, None] * (bt * bulge[:, None] + (1 - bt) * disc[:, None])  # (N, 5, H, W)
    sky = 10.0 ** (-0.4 * (SKY_MU - 22.5)) * PIXEL_SCALE ** 2  # nanomaggies per pixel
    var = (sky[None, :, None, None] + np.maximum(model, 0)) / ELECTRONS_PER_NMGY[None, :, None, None]
    images = (model + np.sqrt(var) * rng.standard_normal(model.shape)).astype(np.float32)
    return RenderedImages(images, r_disc * PIXEL_SCALE, r_bulge * PIXEL_SCALE, fibre_disc, fibre_bulge)


def colour_image(ugriz: np.ndarray) -> np.ndarray:
    """gri colour composite ``(64, 64, 3)`` uint8 of one ``(5, 64, 64)`` image, after a JPEG
    round trip like the SkyServer cutouts."""
    w = RGB_WEIGHTS
    rgb = make_lupton_rgb(ugriz[3] * w[0], ugriz[2] * w[1], ugriz[1] * w[2], minimum=0.0, stretch=RGB_STRETCH,
                          Q=RGB_Q)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def neurips_fibre_spectra() -> FibreSpectra:
    """The fibre-spectrum model on the NeurIPS grid (built once per process: a few seconds)."""
    return FibreSpectra(neurips_loglam())


def bulge_fractions(gal: MockGalaxies, old_template: int) -> np.ndarray:
    """``(N, 5)`` share of each band's flux from the old-star template (the bulge)."""
    amatrix = kcorrect_sdss().Amatrix(gal.z)  # (N, 5 bands, K templates)
    per_template = amatrix * gal.coeffs[:, None, :]
    old = per_template[:, :, old_template]
    return np.clip(old / per_template.sum(-1), 0.0, 1.0)


def galaxy_physics(gal: MockGalaxies, bulge_fraction: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Stellar masses (Bell et al. 2003, from kcorrect's rest-frame absolute magnitudes), bulge
    masses and bulge velocity dispersions (Faber-Jackson) of all galaxies."""
    absmag = kcorrect_sdss().absmag(maggies=gal.maggies, ivar=np.ones_like(gal.maggies), redshift=gal.z,
                                    coeffs=gal.coeffs)
    bt_r = np.clip(bulge_fraction[:, 2], 1e-3, 1.0)
    log_mass = stellar_mass(absmag[:, 2], absmag[:, 1] - absmag[:, 2])
    mr_bulge = absmag[:, 2] - 2.5 * np.log10(bt_r)
    rng = np.random.default_rng([seed, 3])
    log_sigma = FJ_ZERO - 0.1 * (mr_bulge + 21.0) + FJ_SCATTER * rng.standard_normal(len(gal))
    return {"log_mass": log_mass, "log_bulge_mass": log_mass + np.log10(bt_r), "veldisp": 10 ** log_sigma}


#: the true properties written to catalog.fits (besides z); docs/mock-survey.md describes each
TRUE_COLUMNS = ("true_dn4000", *(f"true_flux_{k}" for k in LINES), *(f"true_ew_{k}" for k in LINES), "true_bpt",
                "true_sigma_lines", "true_ebv_gas", "true_oh_n2", "agn", "veldisp", "log_mass", "oh_gas",
                "r_disc_arcsec", "r_bulge_arcsec",
                "fibre_frac_disc", "fibre_frac_bulge", "fibre_frac_r")


def generate_mock(root: str | Path, n_objects: int | None = None, seed: int = 0, ugriz: bool = False,
                  val_fraction: float = 0.1, test_fraction: float = 0.1, progress: bool = True,
                  fibre: str = "sdss", halpha_scatter_dex: float = HALPHA_SCATTER_DEX, grid: str = "neurips") -> Path:
    """Generate the mock survey into ``root`` in the dataset format (see utils.data.dataset).

    Parameters
    ----------
    root : destination folder (must not exist).
    n_objects : number of galaxies; None keeps every real galaxy once (about 9,800).
    seed : everything random (noise, sizes, shapes, lines, resampling) derives from it.
    ugriz : also store the 5-band float images (N x 80 kB on disk).
    fibre : 'sdss' (3" diameter) or 'boss' (2").
    halpha_scatter_dex : the star-forming H-alpha's scatter about its disc's prediction
        (utils.data.mock_physics.draw_lines); only a ceiling measurement changes it.
    grid : 'neurips' (SDSS pixels, 3,598) or 'apj' (4000-8500 A in 1 A steps, SPEC 5): the
        spectra are made on the SDSS pixels and, for 'apj', resampled as utils.data.prepare
        resamples SDSS spectra (cubic spline, 2 A Gaussian smoothing).
    """
    if fibre not in FIBRE_DIAMETER:
        raise ValueError(f"unknown fibre '{fibre}': expected one of {tuple(FIBRE_DIAMETER)}")
    if grid not in GRIDS:
        raise ValueError(f"unknown grid '{grid}': expected one of {GRIDS}")
    gal = sample_galaxies(n_objects, seed)
    split = assign_split(gal.objid, val_fraction, test_fraction)
    n = len(gal)
    physics = neurips_fibre_spectra()
    stored = neurips_loglam() if grid == "neurips" else np.log10(apj_wave())
    writer = DatasetWriter(root, n, stored, images=("gri", "ugriz") if ugriz else ("gri",), source="mock",
                           with_mask=grid != "neurips")
    bt_all = bulge_fractions(gal, physics.old)
    props = galaxy_physics(gal, bt_all, seed)
    true = {name: np.zeros(n) for name in TRUE_COLUMNS}
    fibre_bands = np.zeros((n, len(BANDS)))
    with tqdm(total=n, desc="mock survey", unit="gal", disable=not progress) as bar:
        for start in range(0, n, CHUNK):
            sl = slice(start, min(start + CHUNK, n))
            rng = np.random.default_rng([seed, 2, start // CHUNK])
            chunk = render_chunk(gal[sl], bt_all[sl], props["veldisp"][sl], props["log_mass"][sl],
                                 props["log_bulge_mass"][sl], physics, rng, FIBRE_DIAMETER[fibre], halpha_scatter_dex)
            for name, values in chunk.true.items():
                true[name][sl] = values
            fibre_bands[sl] = chunk.fibre_bands
            flux, ivar, mask = chunk.flux, chunk.ivar, None
            if grid != "neurips":
                flux, ivar, mask = resample(physics.loglam, flux, ivar, grid)
            writer.write(start, flux, ivar, chunk.images if ugriz else {"gri": chunk.images["gri"]}, mask)
            bar.update(sl.stop - start)
    true["veldisp"], true["log_mass"], true["fibre_frac_r"] = props["veldisp"], props["log_mass"], fibre_bands[:, 2]
    catalog = mock_catalog(gal, split, bt_all, fibre_bands, true)
    catalog.meta["SEED"] = seed
    catalog.meta["FIBRE"] = FIBRE_DIAMETER[fibre]
    return writer.finish(catalog, extra_meta={"seed": seed, "n_requested": n_objects, "grid": grid,
                                               "fibre_arcsec": FIBRE_DIAMETER[fibre],
                                               "generator": "utils.data.mock (kcorrect templates, fibre spectra, "
                                                            "drawn emission lines)"})


@dataclass
class MockChunk:
    """What :func:`render_chunk` makes for a block of galaxies."""

    flux: np.ndarray  # (B, L) noisy fibre spectra, 1e-17 erg/s/cm^2/A
    ivar: np.ndarray  # (B, L)
    images: dict  # 'gri' (B, 64, 64, 3) uint8 and 'ugriz' (B, 5, 64, 64) float32 nanomaggies
    fibre_bands: np.ndarray  # (B, 5) share of each band's light inside the fibre
    true: dict  # the chunk's true properties, TRUE_COLUMNS names (those known per chunk)


def render_chunk(part: MockGalaxies, bt: np.ndarray, veldisp: np.ndarray, log_mass: np.ndarray,
                 log_bulge_mass: np.ndarray, physics: FibreSpectra, rng: np.random.Generator, fibre_arcsec: float,
                 halpha_scatter_dex: float) -> MockChunk:
    """Images, fibre spectra with drawn lines and noise, and the true properties of a block of
    galaxies: their bulge fractions ``bt`` ``(B, 5)``, bulge velocity dispersions and masses."""
    wave = physics.wave
    rendered = render_images(part, bt, rng, fibre_arcsec)
    bulge, disc = physics.components(part.z, part.coeffs, veldisp)
    continuum = rendered.fibre_bulge[:, None] * bulge + rendered.fibre_disc[:, None] * disc
    disc_coeffs = part.coeffs.copy()
    disc_coeffs[:, physics.old] = 0.0
    line_continuum = {name: physics.continuum_at(continuum, part.z, MOCK_LINES[name]) for name in LINES}
    lines = draw_lines(disc_coeffs @ physics.halpha_per_coeff * FLUX_UNIT, log_mass, log_bulge_mass,
                       line_continuum["halpha"], rendered.fibre_disc, rng, halpha_scatter_dex)
    clean = continuum + physics.render_lines(part.z, lines["flux"], lines["sigma_kms"])
    flux, ivar = add_spectral_noise(clean, wave, rng)
    errors = physics.line_errors(part.z, lines["sigma_kms"], 1.0 / ivar.astype(np.float64))
    true = {"true_dn4000": dn4000(clean, wave, part.z),
            "true_bpt": bpt_class(lines["flux"], errors),  # unclassified where the noise hides a line
            "agn": lines["agn"], "true_ebv_gas": lines["ebv"], "oh_gas": lines["oh"],
            "true_oh_n2": lines["oh_n2"],
            "true_sigma_lines": lines["sigma_kms"],
            "r_disc_arcsec": rendered.r_disc, "r_bulge_arcsec": rendered.r_bulge,
            "fibre_frac_disc": rendered.fibre_disc, "fibre_frac_bulge": rendered.fibre_bulge}
    for name in LINES:
        true[f"true_flux_{name}"] = lines["flux"][name]
        true[f"true_ew_{name}"] = lines["flux"][name] / np.maximum(line_continuum[name], 1e-6) / (1 + part.z)
    fibre_bands = bt * rendered.fibre_bulge[:, None] + (1 - bt) * rendered.fibre_disc[:, None]
    images = {"gri": np.stack([colour_image(im) for im in rendered.images]), "ugriz": rendered.images}
    return MockChunk(flux, ivar, images, fibre_bands, true)


def mock_catalog(gal: MockGalaxies, split: np.ndarray, bt: np.ndarray, fibre_bands: np.ndarray, true: dict) -> Table:
    """The mock's catalog.fits: ids, positions, redshifts, total and fibre magnitudes, the split,
    the r-band bulge fraction and every true property."""
    mags = gal.mags
    catalog = Table({"objid": gal.objid, "ra": gal.ra, "dec": gal.dec, "z": gal.z,
                     **{f"mag_{b}": mags[:, i].astype(np.float32) for i, b in enumerate(BANDS)},
                     **{f"fibermag_{b}": (mags[:, i] - 2.5 * np.log10(fibre_bands[:, i])).astype(np.float32)
                        for i, b in enumerate(BANDS)},
                     "split": split, "bulge_frac_r": bt[:, 2].astype(np.float32)})
    for name in TRUE_COLUMNS:
        catalog[name] = true[name].astype(np.int16 if name in ("true_bpt", "agn") else np.float32)
    return catalog


def resample(loglam: np.ndarray, flux: np.ndarray, ivar: np.ndarray, grid: str
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spectra ``(N, L)`` on the SDSS pixels ``loglam`` onto another grid of utils.data.prepare."""
    out = [to_grid(loglam, f.astype(np.float64), v.astype(np.float64), grid) for f, v in zip(flux, ivar)]
    bad = [i for i, o in enumerate(out) if isinstance(o, str)]
    if bad:
        raise ValueError(f"mock spectrum {bad[0]} cannot be put on the {grid} grid: {out[bad[0]]}")
    return tuple(np.stack(parts) for parts in zip(*out))


def ensure_mock(root: str | Path, n_objects: int | None, seed: int, ugriz: bool = False, grid: str = "neurips"
                ) -> Path:
    """Generate the mock survey at ``root`` unless a dataset is already there; a mock that is
    there must be on the requested ``grid`` (another dataset, e.g. real SDSS, is used as it is)."""
    root = Path(root)
    if (root / "catalog.fits").exists():
        try:
            meta = json.loads((root / "meta.json").read_text())
            have, source = meta.get("grid") or "neurips", meta.get("source")
        except (OSError, ValueError, AttributeError):
            return root  # a missing or broken meta.json: opening the dataset reports it
        if source == "mock" and have != grid:
            raise UserError(f"the mock survey at '{root}' is on the {have} grid, the configuration asks for {grid} "
                            f"(data.mock_grid): point data.root at another folder")
        return root
    logger.info("mock survey not found at %s: generating %s galaxies (seed %d, %s grid)", root,
                n_objects if n_objects else "all real", seed, grid)
    return generate_mock(root, n_objects, seed, ugriz=ugriz, grid=grid)


def mock_figures(root: str | Path, out_dir: str | Path, n_show: int = 6, seed: int = 1) -> list[Path]:
    """The mock's figures (docs/mock-survey.md): a galaxy grid, a colour-redshift diagram against the real catalog
    and, for a catalog with true properties, :func:`physics_figure`."""
    import matplotlib.pyplot as plt  # after utils.plotting, which selects the Agg backend

    from utils.plotting import WAVE_LABEL, save, show_image

    survey = open_survey(root, check_values=False)
    wave = survey.wave
    rng = np.random.default_rng(seed)
    z = np.asarray(survey.catalog["z"])
    # one galaxy from each redshift slice, so the grid shows the range
    edges = np.quantile(z, np.linspace(0, 1, n_show + 1))
    rows = [int(rng.choice(np.flatnonzero((z >= lo) & (z <= hi)))) for lo, hi in zip(edges[:-1], edges[1:])]
    fig, axes = plt.subplots(n_show, 2, figsize=(11, 1.9 * n_show), gridspec_kw={"width_ratios": [1, 5]})
    for ax_img, ax_spec, row in zip(axes[:, 0], axes[:, 1], rows):
        show_image(ax_img, survey.images["gri"][row])
        ax_spec.plot(wave, survey.flux[row], lw=0.5, color="0.3")
        ax_spec.set_xlim(wave[0], wave[-1])
        lo, hi = np.percentile(survey.flux[row], [0.5, 99.8])
        ax_spec.set_ylim(lo - 0.1 * (hi - lo), hi + 0.2 * (hi - lo))
        cat = survey.catalog[row]
        ax_spec.text(0.01, 0.85, f"z = {cat['z']:.3f}   r = {cat['mag_r']:.2f}   B/T(r) = {cat['bulge_frac_r']:.2f}"
                     if "bulge_frac_r" in survey.catalog.colnames else f"z = {cat['z']:.3f}",
                     transform=ax_spec.transAxes, fontsize=8)
        ax_spec.set_ylabel(r"$f_\lambda$", fontsize=8)
    axes[-1, 1].set_xlabel(WAVE_LABEL)
    fig.suptitle("Mock SDSS galaxies: gri image (64 x 64, 0.396\"/px) and spectrum (1e-17 erg/s/cm2/A)")
    paths = [save(fig, Path(out_dir) / "mock_galaxies.png")]

    # colour-redshift: real catalog photometry vs colours synthesised from the mock galaxies' total light
    # (the template fit that anchors them; the fibre spectra hold only part of it)
    import astropy.units as u
    import speclite.filters

    real = load_real_catalog()
    real_mag = -2.5 * np.log10(np.asarray(real["maggies"]))
    gal = sample_galaxies(survey.meta.get("n_requested", len(survey)), int(survey.meta.get("seed", 0)))
    pick = rng.choice(len(gal), size=min(1500, len(gal)), replace=False)
    grid = np.arange(3.52, 4.02, 1e-4)
    spec = TemplateSpectra().observed(gal.z[pick], gal.coeffs[pick], grid)
    filters = speclite.filters.load_filters("sdss2010-g", "sdss2010-r", "sdss2010-i")
    m = filters.get_ab_magnitudes(spec * 1e-17 * u.erg / u.s / u.cm ** 2 / u.AA, 10 ** grid * u.AA)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, (a, b), (ia, ib) in zip(axes, (("g", "r"), ("r", "i")), ((1, 2), (2, 3))):
        ax.scatter(real["z"], real_mag[:, ia] - real_mag[:, ib], s=2, alpha=0.3, color="tab:blue",
                   label=f"real SDSS (kcorrect sample, N={len(real)})")
        ax.scatter(gal.z[pick], m[f"sdss2010-{a}"] - m[f"sdss2010-{b}"], s=2, alpha=0.4, color="tab:red",
                   label=f"mock total light (template fit), synthetic photometry (N={len(pick)})")
        ax.set_xlabel("redshift")
        ax.set_ylabel(f"{a} - {b} [AB mag]")
        ax.set_ylim(*((0, 1.6) if a == "g" else (0, 0.8)))
    axes[0].legend(loc="lower right", fontsize=8, markerscale=4)
    fig.suptitle("Colour-redshift: mock survey against the real SDSS galaxies it is built from")
    paths.append(save(fig, Path(out_dir) / "mock_color_redshift.png"))
    if "true_bpt" in survey.catalog.colnames:
        paths.append(physics_figure(survey.catalog, Path(out_dir) / "mock_physics.png"))
    return paths


def physics_figure(cat: Table, path: Path) -> Path:
    """The mock's realism check: BPT diagram and classes of the true lines, H-alpha equivalent
    widths, Dn4000 and the fibre's share of the r-band light against size."""
    import matplotlib.pyplot as plt  # after utils.plotting, which selects the Agg backend

    from utils.astro.science import BPT_CLASSES, BPT_DEMARCATIONS, bpt_ratios
    from utils.plotting import plot_bpt, save

    col = lambda name: np.asarray(cat[name], dtype=np.float64)  # noqa: E731
    bpt = np.asarray(cat["true_bpt"])
    fig, axes = plt.subplots(2, 2, figsize=(11, 9.5))
    fig.subplots_adjust(hspace=0.32)
    ax = axes[0, 0]
    labels = [f"{name}: {np.mean(bpt == code):.0%}" + (" (a line at S/N < 3)" if code == 0 else "")
              for code, name in enumerate(BPT_CLASSES)]
    plot_bpt(ax, *bpt_ratios(cat, "true_flux_"), bpt, labels, BPT_DEMARCATIONS, marker=".", ms=2, alpha=0.5)
    ax.set(xlim=(-1.8, 0.7), ylim=(-1.5, 1.5), title="BPT diagram of the true fibre lines")
    ax.legend(fontsize=7, markerscale=4, loc="lower left")
    ax = axes[0, 1]
    ew = col("true_ew_halpha")
    ax.hist(np.log10(np.clip(ew, 0.01, None)), bins=60, color="tab:blue", alpha=0.8)
    ax.set(xlabel=r"log EW(H$\alpha$) [$\mathrm{\AA}$], rest frame, emission positive", ylabel="galaxies",
           title=f"H-alpha equivalent width (median {np.median(ew):.1f} A; {np.mean(ew > 3):.0%} above 3 A)")
    ax = axes[1, 0]
    ax.hist(col("true_dn4000"), bins=np.linspace(0.9, 2.3, 57), color="tab:orange", alpha=0.8)
    ax.set(xlabel="Dn4000 (noise-free fibre spectrum)", ylabel="galaxies",
           title=f"Dn4000 (share below 1.5: {np.mean(col('true_dn4000') < 1.5):.0%})")
    ax = axes[1, 1]
    bt = col("bulge_frac_r")
    size = bt * col("r_bulge_arcsec") + (1 - bt) * col("r_disc_arcsec")
    ax.scatter(size, col("fibre_frac_r"), s=2, alpha=0.3, c=bt, cmap="coolwarm")
    ax.set(xscale="log", xlabel="light-weighted half-light radius [arcsec]", ylabel="fibre / total flux (r)",
           title=f"fibre ({cat.meta.get('FIBRE', 3.0)}\" diameter) share of the light; colour: B/T")
    fig.suptitle("Mock survey: the true properties in catalog.fits")
    return save(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/mock", help="output folder (default data/mock)")
    parser.add_argument("--n", type=int, default=None, help="number of galaxies (default: every real one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ugriz", action="store_true", help="also store 5-band float images")
    parser.add_argument("--fibre", choices=tuple(FIBRE_DIAMETER), default="sdss",
                        help="fibre diameter of the spectra: sdss 3\" (default) or boss 2\"")
    parser.add_argument("--grid", choices=GRIDS, default="neurips",
                        help="neurips: the SDSS pixels (default); apj: 4000-8500 A in 1 A steps (SPEC 5)")
    parser.add_argument("--figures", default=None, help="write the mock figures into this folder")
    args = parser.parse_args(argv)
    if not Path(args.root, "catalog.fits").exists():
        generate_mock(args.root, args.n, args.seed, ugriz=args.ugriz, fibre=args.fibre, grid=args.grid)
    if args.figures:
        mock_figures(args.root, args.figures)


if __name__ == "__main__":
    from utils.errors import cli
    cli(main)

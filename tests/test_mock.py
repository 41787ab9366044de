"""The mock survey: grid, shapes, finite values, photometry, noise model and determinism."""
from __future__ import annotations

import astropy.units as u
import numpy as np
import pytest
import speclite.filters
import torch

from utils.astro.science import dn4000
from utils.astro.spectra import neurips_loglam
from utils.astro.templates import TemplateSpectra
from utils.data.dataset import open_survey
from utils.data.mock import generate_mock, sample_galaxies, sky_spectrum


def test_layout_grid_and_values(tiny_mock):
    s = open_survey(tiny_mock)
    assert len(s) == 48
    assert np.allclose(s.loglam, neurips_loglam())
    assert s.flux.shape == s.ivar.shape == (48, 3598)
    assert s.images["gri"].shape == (48, 64, 64, 3)
    assert s.images["ugriz"].shape == (48, 5, 64, 64)
    assert np.all(np.isfinite(s.flux))
    assert np.all(s.ivar > 0)
    z = np.asarray(s.catalog["z"])
    assert np.all((z > 0.02) & (z < 0.3))
    assert set(np.asarray(s.catalog["split"])) <= {"train", "val", "test"}


def test_photometry_matches_catalog():
    gal = sample_galaxies(40, seed=3)
    grid = np.arange(3.52, 4.02, 1e-4)  # g to i, wider than the stored window
    clean = TemplateSpectra().observed(gal.z, gal.coeffs, grid)
    filters = speclite.filters.load_filters("sdss2010-g", "sdss2010-r", "sdss2010-i")
    m = filters.get_ab_magnitudes(clean * 1e-17 * u.erg / u.s / u.cm ** 2 / u.AA, 10 ** grid * u.AA)
    synth = np.stack([m[c] for c in m.colnames], 1)
    assert np.all(np.median(np.abs(synth - gal.mags[:, 1:4]), 0) < 0.05)


def test_resampled_objects_are_perturbed_copies():
    base = sample_galaxies(None, seed=0)
    more = sample_galaxies(len(base) + 30, seed=0)
    extra = slice(len(base), None)
    assert len(np.unique(more.objid)) == len(more)
    src = more.source_row[extra]
    assert np.all(np.abs(more.z[extra] - base.z[np.searchsorted(base.source_row, src)]) < 0.1)
    assert not np.allclose(more.coeffs[extra], base.coeffs[np.searchsorted(base.source_row, src)])


def test_noise_falls_with_magnitude_and_rises_at_sky_lines(tiny_mock):
    s = open_survey(tiny_mock)
    wave = s.wave
    snr = np.median(s.flux * np.sqrt(s.ivar), 1)
    r = np.asarray(s.catalog["mag_r"])
    assert np.corrcoef(r, np.log(snr))[0, 1] < -0.5
    line = np.argmin(np.abs(wave - 5577.3))
    near = np.argmin(np.abs(wave - 5540.0))
    assert np.all(s.ivar[:, line] < s.ivar[:, near])
    assert sky_spectrum(np.array([5577.3]))[0] > 5 * sky_spectrum(np.array([5540.0]))[0]


def test_images_follow_flux_and_colour(tiny_mock):
    s = open_survey(tiny_mock)
    ugriz = np.asarray(s.images["ugriz"], dtype=np.float64)
    total = ugriz.sum((2, 3))  # nanomaggies
    expected = 10 ** (-0.4 * (np.stack([s.catalog[f"mag_{b}"] for b in "ugriz"], 1) - 22.5))
    bright = expected[:, 2] > 30
    ratio = total[bright, 1:4] / expected[bright, 1:4]
    assert np.all(np.median(ratio, 0) > 0.85)
    assert np.all(np.median(ratio, 0) < 1.1)
    gri = s.images["gri"].astype(float)
    centre = gri[:, 28:36, 28:36].mean((1, 2))
    edge = gri[:, :6, :6].mean((1, 2))
    assert np.all(centre.sum(1) > edge.sum(1))  # a galaxy sits in the middle


def test_deterministic_by_seed(tmp_path):
    a = open_survey(generate_mock(tmp_path / "a", 12, seed=5, progress=False))
    b = open_survey(generate_mock(tmp_path / "b", 12, seed=5, progress=False))
    c = open_survey(generate_mock(tmp_path / "c", 12, seed=6, progress=False))
    assert np.array_equal(a.flux, b.flux)
    assert np.array_equal(a.images["gri"], b.images["gri"])
    assert np.array_equal(np.asarray(a.catalog["objid"]), np.asarray(b.catalog["objid"]))
    assert not np.array_equal(a.flux, c.flux)
    # without the H-alpha scatter the same galaxies keep everything but their star formation's line strengths
    d = open_survey(generate_mock(tmp_path / "d", 12, seed=5, progress=False, halpha_scatter_dex=0.0))
    assert np.array_equal(a.images["gri"], d.images["gri"])
    for col in ("z", "agn", "true_ebv_gas", "oh_gas", "true_oh_n2", "fibre_frac_disc", "true_dn4000"):
        assert np.allclose(np.asarray(a.catalog[col], float), np.asarray(d.catalog[col], float)), col
    ha_a, ha_d = (np.asarray(x.catalog["true_flux_halpha"], float) for x in (a, d))
    star_forming = (np.asarray(a.catalog["agn"]) == 0) & (ha_a > 0)
    assert star_forming.sum() >= 3
    shift = np.log10(ha_a[star_forming] / ha_d[star_forming])
    assert np.all(np.abs(shift) < 4 * 0.35)
    assert np.std(shift) > 0.05  # the drawn scatter, and only it
    nii_ratio = [np.asarray(x.catalog["true_flux_nii_6584"], float)[star_forming] / x_ha[star_forming]
                 for x, x_ha in ((a, ha_a), (d, ha_d))]
    assert np.allclose(*nii_ratio, rtol=1e-4)


def test_mock_figures_are_written(tiny_mock, tmp_path):
    from PIL import Image

    from utils.data.mock import mock_figures

    paths = mock_figures(tiny_mock, tmp_path, n_show=3)
    assert [p.name for p in paths] == ["mock_galaxies.png", "mock_color_redshift.png", "mock_physics.png"]
    assert all(Image.open(p).size[0] > 500 for p in paths)


# --------------------------------------------------------------------------------------------
# fibre spectra, drawn emission lines and AGN, true properties
# --------------------------------------------------------------------------------------------
def test_total_light_still_matches_the_photometry():
    """Bulge + disc without their lines (utils.data.mock_physics) on a g-to-i grid: the synthetic
    g, r, i magnitudes of the total light match the catalog's (the fibre sees only part of it)."""
    from utils.data.mock import bulge_fractions, galaxy_physics
    from utils.data.mock_physics import FibreSpectra

    gal = sample_galaxies(40, seed=3)
    grid = np.arange(3.52, 4.02, 1e-4)
    physics = FibreSpectra(grid)
    sigma = galaxy_physics(gal, bulge_fractions(gal, physics.old), seed=3)["veldisp"]
    bulge, disc = physics.components(gal.z, gal.coeffs, sigma)
    filters = speclite.filters.load_filters("sdss2010-g", "sdss2010-r", "sdss2010-i")
    m = filters.get_ab_magnitudes((bulge + disc) * 1e-17 * u.erg / u.s / u.cm ** 2 / u.AA, 10 ** grid * u.AA)
    synth = np.stack([m[c] for c in m.colnames], 1)
    assert np.all(np.median(np.abs(synth - gal.mags[:, 1:4]), 0) < 0.05)


def test_fibre_sees_less_of_larger_galaxies(tiny_mock):
    from utils.astro.photometry import aperture_weights

    weights = aperture_weights(torch.zeros(1, 2), 3.0, 64)[0]
    assert float(weights.sum()) == pytest.approx(np.pi * (1.5 / 0.396) ** 2, rel=0.02)
    cat = open_survey(tiny_mock).catalog
    frac = np.asarray(cat["fibre_frac_r"])
    assert np.all((frac > 0.02) & (frac < 1))
    assert np.all(cat["fibermag_r"] > cat["mag_r"])
    size = np.asarray(cat["bulge_frac_r"] * cat["r_bulge_arcsec"] + (1 - cat["bulge_frac_r"]) * cat["r_disc_arcsec"])
    assert np.corrcoef(np.log(size), frac)[0, 1] < -0.5
    assert np.median(cat["fibre_frac_bulge"] - cat["fibre_frac_disc"]) > 0  # bulges are concentrated
    # a BOSS fibre (2") sees less of the same galaxies than an SDSS fibre (3")
    from utils.data.mock import bulge_fractions, render_images

    gal = sample_galaxies(12, seed=3)
    bt = bulge_fractions(gal, TemplateSpectra().old_template)
    sdss, boss = (render_images(gal, bt, np.random.default_rng(0), d) for d in (3.0, 2.0))
    assert np.all(boss.fibre_disc < sdss.fibre_disc)
    assert np.all(boss.fibre_bulge < sdss.fibre_bulge)
    assert np.array_equal(boss.images, sdss.images)


def test_spectra_carry_the_true_lines_and_dn4000(tiny_mock):
    """The catalog's true properties are what the noisy spectra show, measured at the true z."""
    from utils.astro.science import fit_lines
    from utils.data.mock import TRUE_COLUMNS

    s = open_survey(tiny_mock)
    cat = s.catalog
    assert set(TRUE_COLUMNS) <= set(cat.colnames)
    z = np.asarray(cat["z"], dtype=np.float64)
    flux = np.asarray(s.flux, dtype=np.float64)
    assert np.median(np.abs(dn4000(flux, s.wave, z) - cat["true_dn4000"])) < 0.03
    found, errors, _ = fit_lines(flux, s.wave, z)
    true = np.asarray(cat["true_flux_halpha"], dtype=np.float64)
    strong = true > 10 * errors["halpha"]
    assert strong.sum() >= 5
    assert np.median(np.abs(found["halpha"][strong] / true[strong] - 1)) < 0.15


def test_line_physics():
    """Scatter that no input predicts, Balmer decrements from dust, the star-forming sequence,
    AGN above the Kewley line and more common in massive bulges, fixed doublet ratios."""
    from utils.astro.science import TIED, bpt_class, kauffmann03
    from utils.data.mock_physics import BALMER_DECREMENT, draw_lines

    n = 6000
    rng = np.random.default_rng(0)
    log_mass = rng.uniform(8.5, 11.5, n)
    bulge_mass = log_mass - rng.uniform(0, 1.5, n)
    same = np.full(n, 1000.0)
    out = draw_lines(same, log_mass, bulge_mass, np.full(n, 10.0), np.ones(n), rng)
    f = out["flux"]
    sf = out["agn"] == 0
    assert np.std(np.log10(f["halpha"][sf])) >= 0.3  # same inputs, at least 0.3 dex apart
    decrement = f["halpha"] / f["hbeta"]
    assert np.all(decrement[sf] >= BALMER_DECREMENT - 1e-9)
    assert np.corrcoef(out["ebv"][sf], np.log(decrement[sf]))[0, 1] > 0.99
    x, y = np.log10(f["nii_6584"] / f["halpha"]), np.log10(f["oiii_5007"] / f["hbeta"])
    assert np.mean(y[sf] < kauffmann03(x[sf])) > 0.9
    unsaturated = sf & (out["oh"] < 8.75)  # the N2 calibration saturates above
    assert unsaturated.sum() > 100
    assert np.corrcoef(out["oh"][unsaturated], x[unsaturated])[0, 1] > 0.8
    pure = draw_lines(np.zeros(n), log_mass, bulge_mass, np.full(n, 10.0), np.ones(n), np.random.default_rng(1))
    active = pure["agn"] > 0
    errors = {k: v / 100 + 1e-9 for k, v in pure["flux"].items()}
    assert active.sum() > 200
    assert np.all(bpt_class(pure["flux"], errors)[active] == 3)  # above Kewley et al. 2001
    massive, light = bulge_mass > 10.8, bulge_mass < 10.0
    assert np.mean(out["agn"][massive] > 0) > 0.25
    assert np.mean(out["agn"][light] > 0) < 0.05
    assert {1, 2} <= set(out["agn"][massive].tolist())  # Seyferts and LINERs
    for tied, (main, _, ratio) in TIED.items():
        assert np.allclose(f[tied], f[main] * ratio)
    assert np.all(pure["sigma_kms"][active] > out["sigma_kms"][sf].max())  # broader NLR lines


def test_velocity_dispersion_broadens_only_beyond_the_template_resolution():
    from utils.data.mock_physics import TEMPLATE_SIGMA_KMS, broadened

    wave = np.linspace(5000, 6000, 20001)
    line = np.exp(-0.5 * ((wave - 5500) / 0.5) ** 2)
    assert np.allclose(broadened(wave, line, TEMPLATE_SIGMA_KMS), line)
    wide = broadened(wave, line, 300.0)
    assert np.trapezoid(wide, wave) == pytest.approx(np.trapezoid(line, wave), rel=1e-3)
    width = np.sqrt(np.trapezoid(wide * (wave - 5500) ** 2, wave) / np.trapezoid(wide, wave))
    expected = np.hypot(0.5, 5500 * np.sqrt(300.0 ** 2 - TEMPLATE_SIGMA_KMS ** 2) / 299792.458)
    assert width == pytest.approx(expected, rel=0.03)



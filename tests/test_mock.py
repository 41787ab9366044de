"""The mock survey: grid, shapes, finite values, photometry, noise model and determinism."""
from __future__ import annotations

import astropy.units as u
import numpy as np
import speclite.filters

from utils.dataset import open_survey
from utils.mock import generate_mock, sample_galaxies, sky_spectrum
from utils.templates import TemplateSpectra
from utils.spectra import neurips_loglam


def test_layout_grid_and_values(tiny_mock):
    s = open_survey(tiny_mock)
    assert len(s) == 48 and np.allclose(s.loglam, neurips_loglam())
    assert s.flux.shape == s.ivar.shape == (48, 3598)
    assert s.images["gri"].shape == (48, 64, 64, 3) and s.images["ugriz"].shape == (48, 5, 64, 64)
    assert np.all(np.isfinite(s.flux)) and np.all(s.ivar > 0)
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
    assert np.all(np.median(ratio, 0) > 0.85) and np.all(np.median(ratio, 0) < 1.1)
    gri = s.images["gri"].astype(float)
    centre = gri[:, 28:36, 28:36].mean((1, 2))
    edge = gri[:, :6, :6].mean((1, 2))
    assert np.all(centre.sum(1) > edge.sum(1))  # a galaxy sits in the middle


def test_deterministic_by_seed(tmp_path):
    a = open_survey(generate_mock(tmp_path / "a", 12, seed=5, progress=False))
    b = open_survey(generate_mock(tmp_path / "b", 12, seed=5, progress=False))
    c = open_survey(generate_mock(tmp_path / "c", 12, seed=6, progress=False))
    assert np.array_equal(a.flux, b.flux) and np.array_equal(a.images["gri"], b.images["gri"])
    assert np.array_equal(np.asarray(a.catalog["objid"]), np.asarray(b.catalog["objid"]))
    assert not np.array_equal(a.flux, c.flux)


def test_mock_figures_are_written(tiny_mock, tmp_path):
    from PIL import Image

    from utils.mock import mock_figures

    paths = mock_figures(tiny_mock, tmp_path, n_show=3)
    assert [p.name for p in paths] == ["mock_galaxies.png", "mock_color_redshift.png"]
    assert all(Image.open(p).size[0] > 500 for p in paths)

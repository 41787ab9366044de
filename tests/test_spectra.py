"""Spectrum grids and preprocessing: both preprocessings and their inverses."""
from __future__ import annotations

import numpy as np
import pytest

from utils.astro.spectra import (
    LOG_NORM_WINDOW,
    NEURIPS_NPIX,
    apj_wave,
    deprocess,
    neurips_loglam,
    preprocess,
    rebin,
    reprocess,
)


def test_grids():
    loglam = neurips_loglam()
    assert len(loglam) == NEURIPS_NPIX == 3598
    assert loglam[0] == pytest.approx(3.5901)
    assert np.allclose(np.diff(loglam), 1e-4)
    assert 10 ** loglam[0] == pytest.approx(3891, abs=1)
    assert 10 ** loglam[-1] == pytest.approx(8908, abs=2)
    wave = apj_wave()
    assert wave[0] == 4000
    assert wave[-1] == 8500
    assert len(wave) == 4501


@pytest.fixture
def spectra():
    rng = np.random.default_rng(0)
    wave = 10 ** neurips_loglam()
    base = 20 + 5 * np.sin(wave / 300.0)[None] + rng.uniform(1, 30, (6, 1))
    return wave, base + rng.normal(0, 0.5, (6, len(wave)))


@pytest.mark.parametrize("kind", ["scale", "log"])
def test_preprocess_inverts(spectra, kind):
    wave, flux = spectra
    x, params = preprocess(flux, wave, kind)
    assert x.shape == flux.shape
    assert x.dtype == np.float32
    assert params.shape == (6, 2)
    assert np.allclose(deprocess(x, params, kind), flux, rtol=1e-5, atol=1e-4)
    # one galaxy's params broadcast over several samples
    several = np.stack([x[0], x[0]])
    assert np.allclose(deprocess(several, params[0], kind), flux[0][None], rtol=1e-5, atol=1e-4)
    # reprocess: other spectra (samples) in a galaxy's units, the inverse of deprocess
    samples = x[:, None] + np.random.default_rng(1).normal(0, 0.05, (6, 3, x.shape[1])).astype(np.float32)
    assert np.allclose(reprocess(deprocess(samples, params[:, None], kind), params[:, None], kind), samples, atol=1e-5)
    assert np.array_equal(reprocess(flux, params, kind), x)


def test_scale_maps_to_minus_one_one(spectra):
    wave, flux = spectra
    x, _ = preprocess(flux, wave, "scale")
    assert np.allclose(x.min(1), -1)
    assert np.allclose(x.max(1), 1)


def test_log_normalises_in_window(spectra):
    wave, flux = spectra
    x, params = preprocess(flux, wave, "log")
    sel = (wave >= LOG_NORM_WINDOW[0]) & (wave <= LOG_NORM_WINDOW[1])
    assert np.allclose(np.exp(x[:, sel]).mean(1), 1.0, atol=1e-5)
    assert np.allclose(params[:, 0], flux[:, sel].mean(1))


def test_log_needs_the_norm_window():
    wave = np.linspace(4000, 6000, 100)
    with pytest.raises(ValueError, match="6900-6950"):
        preprocess(np.ones((1, 100)), wave, "log")


def test_rebin_is_inverse_variance_weighted():
    flux = np.array([[1.0, 3.0, 5.0, 7.0, 9.0]])
    ivar = np.array([[1.0, 3.0, 0.0, 2.0, 1.0]])
    f, iv, grid = rebin(flux, ivar, np.arange(5.0), 2)
    assert np.allclose(f, [[(1 + 9) / 4, 7.0]])
    assert np.allclose(iv, [[4.0, 2.0]])
    assert np.allclose(grid, [0.5, 2.5])


@pytest.mark.parametrize("kind", ["scale", "log"])
def test_spectral_grid_owns_downsampling_preprocessing_and_inversion(kind):
    from utils.astro.spectra import SpectralGrid, neurips_loglam, rebin

    rng = np.random.default_rng(0)
    flux, ivar = rng.uniform(1, 5, (3, 3598)), rng.uniform(0.5, 2, (3, 3598))
    grid = SpectralGrid(neurips_loglam(), 16, kind)
    f, iv = grid.rebin(flux, ivar)
    assert grid.n_pixels == 224 == f.shape[-1]
    assert np.allclose(grid.wave, 10 ** grid.loglam)
    assert np.allclose(grid.loglam, rebin(flux, ivar, neurips_loglam(), 16)[2])
    x, params = grid.preprocess(f)
    assert np.allclose(grid.deprocess(x, params), f, rtol=1e-5)
    with pytest.raises(ValueError, match="downsample"):
        SpectralGrid(neurips_loglam(), 0, kind)
    with pytest.raises(ValueError, match="preprocessing"):
        SpectralGrid(neurips_loglam(), 1, "sqrt")

"""Aperture photometry of the ugriz images (utils.astro.photometry): total and fibre-circle colours."""
from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from utils.astro.photometry import N_FEATURES, PIXEL_SCALE, asinh_colours, fibre_diameters, photometry_features
from utils.data.dataset import open_survey


def _ab(nanomaggies: np.ndarray) -> np.ndarray:
    return 22.5 - 2.5 * np.log10(nanomaggies)


def test_fibre_and_total_colours_of_a_core_and_a_ring():
    """A bright core inside the fibre and a ring of other colours outside it: the fibre sees the
    core's colours and r, the total the sum of both (bright, so asinh = Pogson magnitudes)."""
    core = np.array([2e3, 5e3, 8e3, 1e4, 1.2e4])  # nanomaggies, u..z
    ring = np.array([6e3, 6e3, 4e3, 3e3, 2e3])
    images = np.zeros((1, 5, 64, 64))
    images[0, :, 31:33, 31:33] = core[:, None, None] / 4  # within a pixel of the stamp centre
    yy, xx = np.mgrid[:64, :64] + 0.5 - 32
    annulus = (np.hypot(xx, yy) > 3.0 / PIXEL_SCALE) & (np.hypot(xx, yy) < 20)  # outside the 3" circle
    images[0, :, annulus] = ring / annulus.sum()
    features = photometry_features(images, 3.0)[0]
    assert features.shape == (N_FEATURES,)
    total = core + ring
    assert np.allclose(features[:4], _ab(total)[:-1] - _ab(total)[1:], atol=1e-4)
    assert features[4] == pytest.approx(_ab(total)[2], abs=1e-4)
    assert np.allclose(features[5:9], _ab(core)[:-1] - _ab(core)[1:], atol=1e-4)
    assert features[9] == pytest.approx(_ab(core)[2], abs=1e-4)
    assert photometry_features(images, None).shape == (1, 5)  # total only
    # a smaller fibre (BOSS's 2") loses none of a core this compact
    assert np.allclose(photometry_features(images, [2.0])[0, 5:], features[5:], atol=1e-4)


def test_asinh_magnitudes_are_finite_without_flux():
    out = asinh_colours(np.array([[0.0, -1e-10, 1e-9, 0.0, 1e-8]]))
    assert np.all(np.isfinite(out))
    with pytest.raises(ValueError, match="ugriz images"):
        photometry_features(np.zeros((2, 3, 64, 64)), 3.0)


def test_fibre_diameter_per_row():
    both = Table({"instrument": ["SDSS", "BOSS", b"BOSS "]})
    assert fibre_diameters(both, {}).tolist() == [3.0, 2.0, 2.0]
    assert fibre_diameters(Table({"z": [0.1, 0.2]}), {"fibre_arcsec": 2.0}).tolist() == [2.0, 2.0]
    assert fibre_diameters(Table({"z": [0.1]}), {}).tolist() == [3.0]  # the legacy survey's


def test_the_mock_images_photometry_matches_its_catalog(tiny_mock):
    """The r magnitude of a stored ugriz cutout's summed flux agrees with the mock catalog's (sky and
    photon noise, light off the stamp); a 2" fibre circle sees less light than a 3" one."""
    survey = open_survey(tiny_mock)
    images = np.asarray(survey.images["ugriz"])
    table = photometry_features(images, 3.0)
    offset = table[:, 4] - np.asarray(survey.catalog["mag_r"])
    assert abs(np.median(offset)) < 0.15
    assert np.all(photometry_features(images, 2.0)[:, 9] > table[:, 9])  # fainter in the smaller circle


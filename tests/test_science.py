"""The property measurements (utils.astro.science) on synthetic spectra whose redshift, Dn4000 and lines
are known, the statistics of utils.eval.metrics, and the baselines' alignment with the evaluated
galaxies (utils.eval.baselines)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import nnls
from scipy.special import ndtr

from utils.astro.science import (
    BPT_CLASSES,
    C_KMS,
    LINES,
    TIED,
    RedshiftFitter,
    bpt_class,
    dn4000,
    fit_lines,
    balmer_ebv,
    ccm_k,
    measure,
    n2_metallicity,
    redshift_weights,
)
from utils.astro.spectra import block_grid, neurips_loglam
from utils.astro.templates import TemplateSpectra, pixel_edges
from utils.eval.metrics import confusion, crps, interval_coverage, nmad, property_stats, redshift_stats


def grid(downsample: int) -> np.ndarray:
    return 10 ** block_grid(neurips_loglam(), downsample)


def template_galaxies(wave, n, seed, noise=0.3):
    rng = np.random.default_rng(seed)
    z = rng.uniform(0.02, 0.3, n)
    clean = TemplateSpectra().observed(z, rng.uniform(0, 1, (n, 5)), np.log10(wave))
    clean *= 10 / np.median(clean, 1, keepdims=True)
    return z, clean + rng.normal(0, noise, clean.shape)


@pytest.mark.parametrize("downsample", [1, 16])
def test_template_fit_recovers_redshift(downsample):
    wave = grid(downsample)
    z, flux = template_galaxies(wave, 150, seed=downsample)
    found, chi2 = RedshiftFitter(wave).fit(flux)
    dz = (found - z) / (1 + z)
    tolerance = 3e-4 if downsample == 1 else 2e-3  # a tenth of a pixel, a third of a 16-fold pixel
    assert nmad(dz) < tolerance / 3
    assert np.max(np.abs(dz)) < tolerance
    assert np.all(chi2 > 0)


def test_a_spectrum_without_finite_pixels_has_no_redshift():
    """All-NaN flux (a sample of an image with NaN pixels) gets NaN, not the fit of zeros; a few
    NaN pixels count as zero flux and leave the redshift."""
    wave = grid(16)
    z, flux = template_galaxies(wave, 3, seed=2)
    holed = flux.copy()
    holed[1, 10:13] = np.nan
    holed[2] = np.nan
    found, chi2 = RedshiftFitter(wave).fit(holed)
    assert np.isnan(found[2])
    assert np.isnan(chi2[2])
    assert np.all(np.isfinite(found[:2]))
    assert np.all(np.abs(found[:2] - z[:2]) / (1 + z[:2]) < 2e-3)


def test_nnls_by_subsets_equals_scipy_nnls():
    wave = grid(16)
    fitter = RedshiftFitter(wave, z_range=(0.05, 0.15))
    rng = np.random.default_rng(5)
    flux = rng.normal(1, 1, (6, len(wave))) + fitter.basis[7].T.sum(1) * rng.uniform(-2, 2, (6, 1))
    chi2, f = fitter._fit_grid(flux)
    for zi in (0, 7, len(fitter.z) - 1):
        a = (fitter.basis[zi].astype(np.float64) * np.sqrt(fitter.weights)).T
        for m in range(len(flux)):
            _, residual = nnls(a, f[m] * np.sqrt(fitter.weights))
            assert chi2[zi, m] == pytest.approx(residual ** 2, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("downsample", [1, 16])
def test_dn4000_of_power_laws(downsample):
    wave = grid(downsample)
    z = np.array([0.05, 0.1, 0.2])
    alpha = np.array([[-2.0], [0.0], [3.0]])  # F_nu ~ lambda_rest^alpha
    fnu = (wave[None] / (1 + z[:, None])) ** alpha
    flux = fnu / wave ** 2
    expected = [((4100 ** (a + 1) - 4000 ** (a + 1)) / (3950 ** (a + 1) - 3850 ** (a + 1))) for a in alpha[:, 0]]
    assert dn4000(flux, wave, z) == pytest.approx(expected, rel=5e-3 if downsample == 1 else 2e-2)
    assert np.isnan(dn4000(flux[:1], wave, np.array([-0.05]))[0])  # the blue window leaves the grid


def line_spectra(wave, z, fluxes, continuum=5.0, noise=0.05, seed=0, sigma_kms=120.0):
    """Power-law continuum plus pixel-integrated Gaussian lines (tied companions included) of
    width ``sigma_kms`` (a number or one per spectrum)."""
    rng = np.random.default_rng(seed)
    edges = pixel_edges(np.log10(wave))
    spec = continuum * (wave / 5000.0) ** -1.0 * np.ones((len(z), 1))

    def add(rest, flux):
        mu = rest * (1 + z)[:, None]
        sig = mu * np.reshape(sigma_kms, (-1, 1)) / C_KMS
        return flux[:, None] * (ndtr((edges[1:] - mu) / sig) - ndtr((edges[:-1] - mu) / sig)) / np.diff(edges)

    for name, rest in LINES.items():
        spec = spec + add(rest, fluxes[name])
    for main, rest, ratio in TIED.values():
        spec = spec + add(rest, fluxes[main] * ratio)
    return spec + rng.normal(0, noise, spec.shape)


@pytest.mark.parametrize("downsample,tolerance", [(1, 0.01), (16, 0.04)])
def test_line_fluxes_and_equivalent_widths_are_recovered(downsample, tolerance):
    """Median relative error within ``tolerance`` (16-pixel blocks blend H-alpha and [N II]), and
    every error within 4.5 of the fit's own standard errors plus 1% (the fitted width's
    interpolation leaves a sub-percent bias, visible at this S/N of ~1000)."""
    wave = grid(downsample)
    rng = np.random.default_rng(2)
    z = rng.uniform(0.02, 0.3, 40)
    true = {name: rng.uniform(30, 200, len(z)) for name in LINES}
    found, errors, ews = fit_lines(line_spectra(wave, z, true), wave, z)
    for name in LINES:
        assert np.median(np.abs(found[name] / true[name] - 1)) < tolerance, name
        assert np.all(np.abs(found[name] - true[name]) < 4.5 * errors[name] + 0.01 * true[name]), name
        continuum = 5.0 * (LINES[name] * (1 + z) / 5000.0) ** -1.0
        assert np.median(np.abs(ews[name] / (true[name] / continuum / (1 + z)) - 1)) < tolerance, name


def test_equivalent_width_agrees_with_specutils():
    """specutils' equivalent_width on a continuum-normalised isolated H-alpha line (no [N II])."""
    import astropy.units as u
    from specutils import SpectralRegion, Spectrum
    from specutils.analysis import equivalent_width

    wave, z = grid(1), np.array([0.1])
    fluxes = {name: np.array([0.0]) for name in LINES} | {"halpha": np.array([150.0])}
    spec = line_spectra(wave, z, fluxes, continuum=5.0, noise=0.0)
    _, _, ours = fit_lines(spec, wave, z)
    continuum = 5.0 * (wave / 5000.0) ** -1.0
    normalised = Spectrum(flux=(spec[0] / continuum) * u.dimensionless_unscaled, spectral_axis=wave / (1 + z[0]) * u.AA)
    theirs = equivalent_width(normalised, regions=SpectralRegion(6540 * u.AA, 6590 * u.AA))
    assert ours["halpha"][0] == pytest.approx(-theirs.to_value(u.AA), rel=0.01)  # specutils: emission negative


def test_bpt_classes_follow_the_demarcations():
    #                      star-forming   composite    AGN        weak lines
    log_nii_ha = np.array([-0.5, -0.2, 0.0, -0.5])
    log_oiii_hb = np.array([-0.3, 0.0, 0.8, -0.3])
    flux = {"halpha": np.full(4, 100.0), "hbeta": np.full(4, 30.0)}
    flux["nii_6584"] = flux["halpha"] * 10 ** log_nii_ha
    flux["oiii_5007"] = flux["hbeta"] * 10 ** log_oiii_hb
    err = {k: v / 20 for k, v in flux.items()}
    err["hbeta"] = err["hbeta"] * np.array([1, 1, 1, 10])  # S/N 2 for the last galaxy's H-beta
    codes = bpt_class(flux, err)
    assert [BPT_CLASSES[c] for c in codes] == ["star-forming", "composite", "AGN", "unclassified"]


def test_measure_classifies_synthetic_star_formers_and_agn():
    wave, z = grid(1), np.array([0.08, 0.12])
    fluxes = {"halpha": np.array([300.0, 100.0]), "hbeta": np.array([100.0, 30.0]),
              "nii_6584": np.array([300 * 10 ** -0.6, 100.0]), "oiii_5007": np.array([100 * 10 ** -0.4, 200.0])}
    props = measure(line_spectra(wave, z, fluxes, noise=0.1), wave, z=z)
    assert [BPT_CLASSES[c] for c in props.bpt] == ["star-forming", "AGN"]
    assert np.all(props.table()["ew_halpha"] > 0)


def test_line_width_is_measured_where_the_pixels_resolve_it():
    """The lines' sigma (80 to 300 km/s, as the mock's star formers and AGN) within 5% on SDSS
    pixels (69 km/s), NaN on 16-pixel blocks (1100 km/s) and where no line reaches S/N 3."""
    rng = np.random.default_rng(4)
    z = rng.uniform(0.03, 0.25, 30)
    sigma = rng.uniform(80, 300, len(z))
    fluxes = {name: rng.uniform(40, 150, len(z)) for name in LINES}
    wave = grid(1)
    found = measure(line_spectra(wave, z, fluxes, sigma_kms=sigma), wave, z=z).sigma_lines
    assert np.all(np.abs(found / sigma - 1) < 0.05)
    coarse = grid(16)
    assert np.isnan(measure(line_spectra(coarse, z, fluxes, sigma_kms=sigma), coarse, z=z).sigma_lines).all()
    none = {name: np.zeros(len(z)) for name in LINES}
    assert np.isnan(measure(line_spectra(wave, z, none, sigma_kms=sigma), wave, z=z).sigma_lines).all()


def test_balmer_decrement_and_n2_metallicity():
    """E(B-V) from lines reddened by the CCM curve from case B comes back; N2 gives 8.90 + 0.57 N2
    for star formers and unclassified galaxies, NaN for composites, AGN and at low S/N."""
    ebv = np.array([0.0, 0.2, 0.5, 0.3])
    ha = np.full(4, 100.0)
    hb = ha / 2.86 * 10 ** (-0.4 * ebv * (ccm_k(LINES["hbeta"]) - ccm_k(LINES["halpha"])))
    nii = ha * 10 ** np.array([-1.0, -0.5, -0.2, -1.0])
    flux = {"halpha": ha, "hbeta": hb, "nii_6584": nii, "oiii_5007": ha / 10}
    err = {k: np.ones(4) for k in flux}
    assert balmer_ebv(flux, err) == pytest.approx(ebv, abs=1e-9)
    sf, agn = BPT_CLASSES.index("star-forming"), BPT_CLASSES.index("AGN")
    unclassified, composite = BPT_CLASSES.index("unclassified"), BPT_CLASSES.index("composite")
    oh = n2_metallicity(flux, err, np.array([sf, unclassified, composite, agn]))
    assert oh[:2] == pytest.approx([8.90 - 0.57, 8.90 - 0.57 * 0.5])
    assert np.isnan(oh[2:]).all()  # composites' and AGN's lines are not HII regions
    faint = dict(err, hbeta=hb / 4)  # H-beta at S/N 4: too faint for the decrement
    assert np.isnan(balmer_ebv(flux, faint)[1:]).all()
    assert np.isnan(n2_metallicity(dict(flux, nii_6584=np.full(4, 2.0)), err, np.full(4, sf))).all()  # S/N 2


def test_the_mocks_dust_metallicity_and_line_widths_are_measured_on_its_spectra(tiny_mock):
    """Measured on the tiny mock's observed spectra, the lines' width, the Balmer E(B-V) and the
    N2 metallicity follow the catalog's intrinsic values where their lines are detected (rank
    correlation), with small biases."""
    from scipy.stats import spearmanr

    from utils.data.dataset import open_survey

    survey = open_survey(tiny_mock)
    flux = survey.flux.astype(np.float64)
    wave = 10 ** survey.loglam
    found = measure(flux, wave, z=np.asarray(survey.catalog["z"], float)).table()
    for prop, floor, bias in (("sigma_lines", 0.7, 15.0), ("ebv_gas", 0.3, 0.1), ("oh_n2", 0.3, 0.05)):
        truth = np.asarray(survey.catalog[f"true_{prop}"], float)
        ok = np.isfinite(found[prop])
        assert ok.sum() >= 12, prop
        assert spearmanr(found[prop][ok], truth[ok]).statistic > floor, prop
        assert abs(np.median(found[prop][ok] - truth[ok])) < bias, prop


def test_statistics():
    rng = np.random.default_rng(0)
    assert nmad(rng.normal(0, 2, 20000)) == pytest.approx(2, rel=0.05)
    true = rng.uniform(0.05, 0.3, 1000)
    pred = true + 0.01 * (1 + true) * rng.standard_normal(1000)
    pred[:30] = 0.9  # catastrophic
    stats = redshift_stats(pred, true)
    assert stats["sigma_nmad"] == pytest.approx(0.01, rel=0.1)
    assert stats["outliers"] == pytest.approx(0.03)
    assert redshift_stats(np.array([np.nan, 0.1]), np.array([0.1, 0.1]))["outliers"] == 0.5  # no value: outlier
    s = property_stats(true * 2 + 1, true)
    assert s["corr"] == pytest.approx(1)
    assert s["bias"] == pytest.approx(np.median(true + 1))
    # CRPS: a point forecast's is its absolute error; two equally likely values 0 and 1 score 0.25 at 0.5
    assert crps(np.array([[2.0]]), np.array([0.5]))[0] == pytest.approx(1.5)
    assert crps(np.array([[0.0, 1.0]]), np.array([0.5]))[0] == pytest.approx(0.25)
    samples = rng.standard_normal((4000, 200))
    truth = rng.standard_normal(4000)
    assert interval_coverage(samples, truth, 0.68) == pytest.approx(0.68, abs=0.03)
    assert interval_coverage(samples * 0.5, truth, 0.9) < 0.7  # too narrow shows as under-coverage
    assert confusion(np.array([1, 1, 3]), np.array([1, 2, 3]), 4)[2, 1] == 1


class ImageMeanEmbedding(torch.nn.Module):
    """A stand-in contrastive network whose image embedding is the normalised image itself."""

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(images.flatten(1), dim=-1)


def test_baselines_belong_to_the_evaluated_galaxies(tiny_mock):
    """Evaluating training galaxies with k = 1: each one's nearest image is its own, so the
    retrieval baseline must return its own spectrum and the photo-z its own redshift, row by row."""
    from utils.data.dataset import open_survey
    from utils.data.survey import configured_dataset
    from utils.eval.baselines import compute_baselines

    survey = open_survey(tiny_mock)
    data = {"image": "gri", "preprocessing": "scale", "downsample": 16}
    train = configured_dataset(survey, "train", data)
    evaluated = train.like(train.rows[::-1][:7])  # a different order than the training set's
    truth = np.stack([evaluated[i]["spectrum"][0].numpy() for i in range(len(evaluated))])
    params = np.stack([evaluated[i]["params"].numpy() for i in range(len(evaluated))])
    mean = np.linspace(-1, 1, evaluated.n_pixels)
    spectra, photo_z = compute_baselines(train, evaluated, ImageMeanEmbedding(), torch.device("cpu"), mean, params,
                                         k=1)
    flux, pre = spectra["knn_embedding"]
    assert np.allclose(pre, truth, atol=1e-6)
    assert np.allclose(flux, [evaluated.flux(i)[0] for i in range(len(evaluated))], rtol=1e-4, atol=1e-3)
    assert np.allclose(photo_z, survey.catalog["z"][evaluated.rows])
    assert np.allclose(spectra["mean_train"][1], mean[None])
    assert spectra["mean_train"][0].shape == truth.shape


def test_report_compares_with_survey_values_in_their_conventions():
    """MPA-JHU columns in a catalog: equivalent widths flip sign (theirs are negative for emission),
    the missing-value flag -9999 becomes NaN, BPTCLASS maps onto our classes."""
    from astropy.table import Table

    from utils.data.files import SURVEY_MEASUREMENTS
    from utils.eval.report import SURVEY_COLUMNS, compare, survey_values

    assert set(SURVEY_COLUMNS) | {"bptclass"} <= set(SURVEY_MEASUREMENTS)  # the query fetches what we compare
    catalog = Table({"z": [0.1, 0.2, 0.3, 0.15], "h_alpha_eqw": [-20.0, -5.0, -9999.0, 1.0],
                     "d4000_n": [1.2, 1.8, 1.5, 1.4], "bptclass": [1, 4, -1, 3]})
    values = survey_values(catalog)
    assert np.allclose(values["ew_halpha"], [20, 5, np.nan, -1], equal_nan=True)
    assert [BPT_CLASSES[c] for c in values["bpt"]] == ["star-forming", "AGN", "unclassified", "composite"]
    assert survey_values(Table({"z": [0.1]})) == {}  # a catalog without survey measurements
    perfect = {"z": values["z"], "dn4000": values["dn4000"], "ew_halpha": values["ew_halpha"], "bpt": values["bpt"]}
    stats, matrices = compare({"ours": perfect}, values, n_boot=20)
    assert stats["ours"]["z_sigma_nmad"][0] == 0
    assert stats["ours"]["dn4000_corr"][0] == pytest.approx(1)
    assert stats["ours"]["bpt_accuracy"][0] == 1
    assert np.trace(matrices["ours"]) == 4
    assert stats["ours"]["bpt_auc_AGN"][0] == 1  # a perfect classification ranks perfectly
    # the survey's line fluxes give E(B-V) and the N2 metallicity through our conventions
    lines = Table({"z": [0.1, 0.1], "bptclass": [1, 4], "h_alpha_flux": [286.0, 100.0],
                   "h_alpha_flux_err": [1.0, 1.0], "h_beta_flux": [100.0, 10.0], "h_beta_flux_err": [1.0, 5.0],
                   "nii_6584_flux": [28.6, 60.0], "nii_6584_flux_err": [1.0, 1.0]})
    derived = survey_values(lines)
    assert derived["ebv_gas"] == pytest.approx([0.0, np.nan], nan_ok=True)  # case B; H-beta at S/N 2
    assert derived["oh_n2"] == pytest.approx([8.90 - 0.57, np.nan], nan_ok=True)  # the AGN has none


def test_bpt_roc_auc_uses_the_samples_shares():
    """roc_auc equals the share of (positive, negative) pairs ordered right, ties one half; a
    constant score gives 0.5; compare() scores the samples by their share in each class, so samples
    that know the AGN without ever being mostly AGN get an AUC the mode's hard class cannot."""
    from utils.eval.report import class_shares, compare, roc_auc

    rng = np.random.default_rng(0)
    score, positive = rng.integers(0, 5, 40).astype(float), rng.random(40) < 0.4
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for a in score[positive] for b in score[~positive]]
    assert roc_auc(score, positive) == pytest.approx(np.mean(pairs))
    assert roc_auc(np.ones(40), positive) == 0.5
    assert np.isnan(roc_auc(score, np.ones(40, bool)))
    agn, sf = BPT_CLASSES.index("AGN"), BPT_CLASSES.index("star-forming")
    true = np.array([agn] * 10 + [sf] * 30)
    codes = np.full((40, 10), sf)
    codes[:10, :4] = agn  # the AGN's samples: 40% AGN, the rest star-forming
    codes[10:, 0] = np.where(np.arange(30) < 10, agn, sf)  # some star formers: 10% AGN
    stats, _ = compare({"samples": {"bpt": np.full(40, sf), "bpt_shares": class_shares(codes)}}, {"bpt": true},
                       n_boot=20)
    assert stats["samples"]["bpt_accuracy"][0] == 0.75
    assert stats["samples"]["bpt_auc_AGN"][0] == 1
    hard, _ = compare({"mode": {"bpt": np.full(40, sf)}}, {"bpt": true}, n_boot=20)
    assert hard["mode"]["bpt_auc_AGN"][0] == 0.5


@pytest.mark.parametrize("downsample", [1, 16])
def test_lines_outside_the_grid_are_nan_not_errors(downsample):
    """At z = 0.5 H-alpha lies beyond the red end: its fit window is empty (an all-zero design),
    which must give NaN, not an exception; H-beta is still measured."""
    wave = grid(downsample)
    z = np.array([0.5, 0.1])
    fluxes = {name: np.array([50.0, 50.0]) for name in LINES}
    found, errors, ews = fit_lines(line_spectra(wave, z, fluxes), wave, z)
    assert np.isnan(found["halpha"][0])
    assert np.isnan(errors["halpha"][0])
    assert np.isnan(ews["halpha"][0])
    assert np.isfinite(found["hbeta"]).all()
    assert np.isfinite(found["halpha"][1])


def _stats(mse_diff, z_gen, z_photo, ew_corr, dn_corr, bpt_gen, bpt_knn, cov68, cov90):
    stats = {"samples": {"z_sigma_nmad": [z_gen, 0.001], "ew_halpha_corr": [ew_corr, 0.05],
                         "dn4000_corr": [dn_corr, 0.03], "bpt_accuracy": [bpt_gen, 0.02]},
             "mean_of_n": {"mse": [0.05, 0.004], "mse_minus_knn": [mse_diff, 0.002]},
             "knn_embedding": {"mse": [0.05 - mse_diff, 0.004], "bpt_accuracy": [bpt_knn, 0.02]},
             "photo_z": {"z_sigma_nmad": [z_photo, 0.001]}}
    for prop in ("pixels", "z", "dn4000", "ew_halpha", "ew_oiii_5007"):
        stats["samples"][f"coverage68_{prop}"], stats["samples"][f"coverage90_{prop}"] = [cov68, 0.02], [cov90, 0.02]
    return stats


def test_targets_are_judged_against_the_same_runs_baselines():
    from utils.eval.report import format_targets, targets

    good = targets(_stats(-0.004, 0.015, 0.017, 0.65, 0.85, 0.83, 0.80, 0.68, 0.90), majority_rate=0.79)
    assert all(r["met"] is True for r in good)
    assert len(good) == 15
    bad = targets(_stats(0.004, 0.019, 0.017, 0.55, 0.75, 0.79, 0.80, 0.60, 0.95), majority_rate=0.79)
    assert all(r["met"] is False for r in bad)
    # BPT: beating the majority rate is not enough when retrieval does better, and the reverse
    assert targets(_stats(-1, 0, 1, 1, 1, 0.81, 0.82, 0.68, 0.9), 0.79)[4]["met"] is False
    assert targets(_stats(-1, 0, 1, 1, 1, 0.81, 0.70, 0.68, 0.9), 0.85)[4]["met"] is False
    # coverage just outside either end of its range misses
    edges = targets(_stats(-1, 0, 1, 1, 1, 0.9, 0.8, 0.74, 0.85), 0.79)
    assert [r["met"] for r in edges[5:]] == [False] * 10
    # without baselines the comparison targets are not measurable (not met, not missed)
    stats = _stats(-0.004, 0.015, 0.017, 0.65, 0.85, 0.83, 0.80, 0.68, 0.90)
    del stats["photo_z"], stats["knn_embedding"], stats["mean_of_n"]["mse_minus_knn"]
    partial = targets(stats, 0.79)
    assert partial[0]["met"] is None
    assert partial[1]["met"] is None
    assert partial[2]["met"] is True
    text = format_targets(partial)
    assert "13 of 15 met" in text
    assert "n/a" in text


def test_paired_difference_from_retrieval():
    """The paired MSE difference is the mean of per-galaxy differences, with the (small) standard
    error of those differences, not of either MSE."""
    from utils.eval.report import _pixel_stats

    rng = np.random.default_rng(0)
    truth = rng.normal(size=(200, 30))
    hardness = rng.uniform(0.5, 2.0, size=(200, 1))  # per-galaxy difficulty, shared by both predictors
    samples = truth[:, None] + 0.3 * hardness[:, None] * rng.normal(size=(200, 25, 30))
    knn = truth + 0.35 * hardness * rng.normal(size=(200, 30))
    stats = {"samples": {}, "mean_of_n": {}, "knn_embedding": {}}
    _pixel_stats(stats, {"samples": samples, "mean_of_n": samples.mean(1), "knn_embedding": knn}, samples, truth)
    per_galaxy = ((samples.mean(1) - truth) ** 2).mean(1) - ((knn - truth) ** 2).mean(1)
    diff, se = stats["mean_of_n"]["mse_minus_knn"]
    assert diff == pytest.approx(per_galaxy.mean())
    assert diff < 0
    assert se == pytest.approx(per_galaxy.std(ddof=1) / np.sqrt(200))
    assert se < stats["knn_embedding"]["mse"][1]
    assert stats["samples"]["crps_minus_knn"][0] < 0


def test_redshift_weights_are_each_pixels_median_inverse_variance():
    rng = np.random.default_rng(3)
    ivar = rng.uniform(1.0, 2.0, (9, 40))
    ivar[:6, 5] = 0.0  # masked in most spectra (a sky line)
    ivar[0, 7] = 1e6  # one galaxy's outlier does not set a pixel
    ivar[1:3, 9] = np.nan  # unknown counts as no information
    w = redshift_weights(ivar)
    assert w.shape == (40,)
    assert w[5] == 0.0
    assert w[7] < 2.0
    assert w[9] == pytest.approx(np.median(np.r_[0.0, 0.0, ivar[[0, *range(3, 9)], 9]]))
    clean = np.delete(np.arange(40), [5, 7, 9])
    assert np.allclose(w[clean], np.median(ivar[:, clean], 0))
    assert np.array_equal(redshift_weights(np.zeros((3, 40))), np.ones(40))  # nothing known: uniform
    with pytest.raises(ValueError, match="galaxies, pixels"):
        redshift_weights(ivar[0])


def _write_output(folder, root, split, samples, truth, ivar, objid, wave, top_k, preprocessing="scale"):
    """A generate.py output folder as utils.eval.outputs reads it (spectra.fits, config.yml)."""
    import yaml
    from astropy.io import fits
    from astropy.table import Table

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yml").write_text(yaml.safe_dump({"data": {"root": str(root), "preprocessing": preprocessing},
                                                       "sampling": {"split": split, "catalog": None}}))
    table = Table({"objid": objid, "samples": samples.astype(np.float32), "true_flux": truth.astype(np.float32),
                   "true_ivar": ivar.astype(np.float32)})
    table.meta["TOPK"] = top_k
    hdus = fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(table), fits.ImageHDU(wave, name="WAVELENGTH")])
    hdus[1].name = "SPECTRA"
    hdus.writeto(folder / "spectra.fits", overwrite=True)


def test_point_estimates_compare_the_samples_summaries_on_validation_outputs(tiny_mock, tmp_path):
    """utils.eval.estimates: the reference is the mock's intrinsic truth of the right galaxies;
    samples that carry the galaxy's own lines give a high correlation, ranked-first samples that
    carry another galaxy's give a low one, and the paired differences are to the median; test
    outputs and folders without spectra.fits are refused."""
    from utils.data.dataset import SpectraDataset, open_survey
    from utils.errors import UserError
    from utils.eval.estimates import compare_estimates, estimates, read_output

    survey = open_survey(tiny_mock)
    ds = SpectraDataset(survey, None, downsample=4)
    flux, ivar = ds.all_flux()
    rng = np.random.default_rng(0)
    own = flux[:, None] + rng.normal(0, 0.02 * np.abs(flux).mean(), (len(ds), 6, flux.shape[1]))
    other = np.roll(flux, 7, axis=0)[:, None].repeat(2, 1)  # the two best-ranked: another galaxy's spectrum
    samples = np.concatenate([other, own], 1)
    objid = np.asarray(survey.catalog["objid"])[ds.rows]
    _write_output(tmp_path / "val", tiny_mock, "val", samples, flux, ivar, objid, ds.wave, top_k=2)

    out = read_output(tmp_path / "val", None)
    truth = np.asarray(survey.catalog["true_ew_halpha"], float)[ds.rows]
    assert np.array_equal(out["reference"]["ew_halpha"], truth)
    assert out["top_k"] == 2
    assert out["n"] == 8
    est = estimates(out, "ew_halpha")
    assert list(est) == ["median of all N", "mean of all N", "20%-trimmed mean of all N", "median of the top 2",
                         "median of 2 at random", "the top-ranked sample", "one sample at random",
                         "of the mean spectrum"]
    values = out["props"]["ew_halpha"]  # (G, N), ranked order kept
    finite = np.isfinite(values).all(1)  # eight values: the lowest and the highest one dropped
    assert finite.any()
    assert (np.allclose(est["20%-trimmed mean of all N"][finite],
                                        np.sort(values[finite], 1)[:, 1:-1].mean(1)))
    assert values.shape == (len(ds), 8)
    assert np.allclose(est["median of the top 2"], np.median(values[:, :2], 1))
    assert np.array_equal(est["the top-ranked sample"], values[:, 0], equal_nan=True)
    assert all(v in row for v, row in zip(est["one sample at random"], values) if np.isfinite(v))
    random2 = est["median of 2 at random"]  # two of the galaxy's eight values (NaN where neither is finite)
    assert np.all((random2 >= np.nanmin(values, 1) - 1e-9) & (random2 <= np.nanmax(values, 1) + 1e-9)
                  | np.isnan(random2))
    rows = compare_estimates(est, truth, boot=50)
    assert rows["median of all N"]["minus_median"] == 0
    assert rows["median of all N"]["corr"] > 0.6
    assert rows["median of the top 2"]["corr"] < rows["median of all N"]["corr"] - 0.4
    assert rows["median of 2 at random"]["corr"] > rows["median of the top 2"]["corr"] + 0.2  # mostly own lines
    top = rows["median of the top 2"]
    assert top["minus_median"] == pytest.approx(top["corr"] - rows["median of all N"]["corr"])
    assert top["se"] > 0

    _write_output(tmp_path / "test", tiny_mock, "test", samples, flux, ivar, objid, ds.wave, top_k=2)
    with pytest.raises(UserError, match="split is 'test'"):
        read_output(tmp_path / "test", None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="spectra.fits: not found"):
        read_output(tmp_path / "empty", None)


def test_pool_models_draws_fair_shares_and_judges_them_like_generate(tiny_mock, tmp_path):
    """utils.eval.outputs.pool: the pool takes N / k samples of each output at random (not the
    best-ranked first ones); samples equal to the truth give an MSE of 0 and the truth's measured
    properties; outputs of other galaxies are refused."""
    from utils.astro.science import RedshiftFitter, measure, redshift_weights
    from utils.data.dataset import SpectraDataset, open_survey
    from utils.errors import UserError
    from utils.eval.outputs import pool, pooled_columns, read_samples
    from utils.eval.report import COMPARED

    survey = open_survey(tiny_mock)
    ds = SpectraDataset(survey, None, downsample=4, preprocessing="log")
    flux, ivar = ds.all_flux()
    objid = np.asarray(survey.catalog["objid"])[ds.rows]
    for name, factor in (("a", 1.0), ("b", 2.0)):  # b's samples are twice the truth: recognisable
        samples = factor * flux[:, None].repeat(6, 1) * np.linspace(1, 1.01, 6)[None, :, None]
        _write_output(tmp_path / name, tiny_mock, "val", samples, flux, ivar, objid, ds.wave, top_k=2,
                      preprocessing="log")
    a, b = read_samples(tmp_path / "a", None), read_samples(tmp_path / "b", None)
    assert a["preprocessing"] == "log"
    mixed = pool([a, b], 5, seed=3)["samples"]  # 3 of a's, 2 of b's per galaxy
    ratio = mixed[:, :, 100] / flux[:, None, 100]
    assert mixed.shape == (len(ds), 5, flux.shape[1])
    assert np.all(ratio[:, :3] < 1.02)
    assert np.all(ratio[:, 3:] > 1.9)
    assert len({tuple(np.round(r, 6)) for r in ratio[:, :3]}) > 1  # a random draw, not always the first three

    exact = dict(a, samples=flux[:, None].repeat(4, 1))
    cols = pooled_columns(exact)
    assert np.allclose(cols["mse_mean"], 0, atol=1e-10)
    measured = measure(flux, ds.wave, fitter=RedshiftFitter(ds.wave, weights=redshift_weights(ivar))).table()
    for p in COMPARED:
        assert np.allclose(cols[f"{p}_gen"], measured[p], equal_nan=True)
        assert np.array_equal(cols[f"{p}_true"], np.asarray(survey.catalog[f"true_{p}"], float)[ds.rows])
    off = dict(b, samples=2 * flux[:, None].repeat(4, 1))  # twice the flux: log(2) in every pixel
    assert np.allclose(pooled_columns(off)["mse_mean"], np.log(2) ** 2, rtol=1e-4)
    with pytest.raises(UserError, match="different galaxies"):
        pool([a, dict(b, objid=b["objid"][::-1])], 4)


def test_compare_outputs_pairs_two_validation_runs_by_object(tiny_mock, tmp_path):
    """utils.eval.outputs.compare_outputs: statistics on the galaxies both outputs hold, matched by object id
    whatever their order, against the mock's intrinsic truth (not the file's measured values); the
    difference is other - base with a bootstrap standard error; a variant whose point values follow
    the truth better gains correlation; test outputs and unknown galaxies are refused."""
    import yaml
    from astropy.io import fits
    from astropy.table import Table

    from utils.data.dataset import open_survey
    from utils.errors import UserError
    from utils.eval.outputs import compare_outputs, read_columns
    from utils.eval.report import COMPARED

    catalog = open_survey(tiny_mock).catalog
    g, rng = len(catalog), np.random.default_rng(1)
    truth = {p: np.asarray(catalog[f"true_{p}"], float) for p in COMPARED}
    z = np.asarray(catalog["z"], float)

    def write(folder, noise, order, split="val", objid=np.asarray(catalog["objid"])):
        folder.mkdir()
        (folder / "config.yml").write_text(yaml.safe_dump({"data": {"root": str(tiny_mock)},
                                                           "sampling": {"split": split, "catalog": None}}))
        cols = {"objid": objid, "mse_mean": noise * np.ones(g) + rng.uniform(0, 1e-3, g),
                "z_gen": z + rng.normal(0, noise * 0.05, g), "z_true": z}
        for p in COMPARED:  # the file's measured values are noise: the catalog's truth must be used
            cols[f"{p}_gen"] = truth[p] / np.nanstd(truth[p]) + rng.normal(0, noise, g)
            cols[f"{p}_true"] = rng.normal(size=g)
        hdu = fits.table_to_hdu(Table({k: v[order] for k, v in cols.items()}))
        hdu.name = "SPECTRA"
        fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(folder / "spectra.fits")

    write(tmp_path / "base", 1.0, np.arange(g))
    write(tmp_path / "other", 0.02, rng.permutation(g)[: g - 8])  # shuffled, 8 galaxies fewer
    result = compare_outputs(read_columns(tmp_path / "base"), read_columns(tmp_path / "other"), boot=100)
    halpha = result["ew_halpha corr"]
    assert halpha["galaxies"] == g - 8
    assert halpha["other"] > 0.9 > halpha["base"]
    assert halpha["difference"] == pytest.approx(halpha["other"] - halpha["base"])
    assert 0 < halpha["se"] < 0.2
    assert result["MSE mean of N"]["difference"] == pytest.approx(-0.98, abs=0.01)
    assert result["z sigma_NMAD"]["difference"] < 0
    write(tmp_path / "test", 0.2, np.arange(g), split="test")
    with pytest.raises(UserError, match="split is 'test'"):
        read_columns(tmp_path / "test")
    write(tmp_path / "foreign", 0.2, np.arange(g), objid=np.arange(g) + 7)
    with pytest.raises(UserError, match="not in the catalog"):
        read_columns(tmp_path / "foreign")


def test_sample_count_curve_recovers_the_infinite_sample_correlation():
    """utils.eval.estimates.sample_curve: samples that scatter about each galaxy's model value give
    a correlation that rises with the samples pooled; the fit of rho_inf / sqrt(1 + c / n) finds
    the model values' own correlation with the truth and the noise ratio c, and inverts to the
    samples a target needs."""
    from scipy.stats import spearmanr

    from utils.eval.estimates import attenuated, fit_curve, sample_curve, samples_needed

    rng = np.random.default_rng(1)
    truth = rng.normal(size=2000)
    model = 0.7 * truth + np.sqrt(1 - 0.7 ** 2) * rng.normal(size=truth.size)  # Pearson 0.7, unit variance
    samples = model[:, None] + 2.0 * rng.normal(size=(truth.size, 200))  # per-sample noise variance 4
    curve = sample_curve(samples, truth, boot=3, fit_max=100, draws=2)
    expected = spearmanr(model, truth).statistic
    assert curve["counts"] == [1, 2, 5, 10, 25, 50, 100, 200]
    assert curve["fit_counts"] == [5, 10, 25, 50, 100]
    assert all(a < b for a, b in zip(curve["corr"], curve["corr"][1:]))  # more samples pooled, higher correlation
    assert abs(curve["rho_inf"] - expected) < 0.03
    assert curve["rho_inf_se"] > 0
    # the median of n normal draws has variance (pi / 2) 4 / n: c ~ 2 pi relative to the model's unit variance
    assert 4 < curve["c"] < 9
    assert abs(curve["corr"][-1] - curve["predicted"][-1]) < 0.02  # n = 200 lies beyond the fit and on it
    assert np.isclose(attenuated(np.array([1e9]), 0.7, 5.0)[0], 0.7)
    assert np.allclose(fit_curve(np.array([5, 10, 50, 100]), attenuated(np.array([5, 10, 50, 100]), 0.6, 8.0)),
                       (0.6, 8.0), atol=1e-4)
    assert np.isclose(attenuated(np.array([samples_needed(0.7, 5.0, 0.6)]), 0.7, 5.0)[0], 0.6)
    assert samples_needed(0.55, 5.0, 0.6) == np.inf
    assert samples_needed(float("nan"), 5.0, 0.6) == np.inf


def test_sample_count_figure_draws_the_curves_beside_the_ceilings(tmp_path):
    """The --curve figure: a panel per correlation target with a curve per output and each
    ceilings file's image-photometry network."""
    from matplotlib.image import imread

    from utils.eval.estimates import IMAGE_CEILING, plot_curves, sample_curve

    rng = np.random.default_rng(2)
    truth = rng.normal(size=300)
    samples = truth[:, None] + rng.normal(size=(300, 10))
    curve = sample_curve(samples, truth, boot=2, fit_max=10, draws=1)
    ceiling = {"split": "test", "predictors": {IMAGE_CEILING: {"ew_halpha_corr": [0.6, 0.04]}}}
    path = plot_curves(tmp_path / "curve.png", {"a": {"ew_halpha": curve}, "b": {"ew_halpha": curve}}, [ceiling])
    assert imread(path).shape[1] < 800  # one panel of 5.2 inches at 110 dpi: only H-alpha has curves


@pytest.mark.slow
def test_bench_scripts_refuse_bad_requests_in_one_line(tmp_path):
    """bench/point_estimates.py refuses --figure without --curve; bench/ceilings.py names a missing
    dataset folder in one line (no traceback); neither writes anything."""
    from conftest import run_script

    curve = run_script("bench/point_estimates.py", [str(tmp_path), "--figure", str(tmp_path / "x.png")])
    assert curve.returncode == 2
    assert "add --curve" in curve.stderr
    assert not (tmp_path / "x.png").exists()
    missing = run_script("bench/ceilings.py", ["--root", str(tmp_path / "missing"), "--out", str(tmp_path / "c.json")])
    assert missing.returncode == 1
    assert "missing' does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert not (tmp_path / "c.json").exists()


def test_ceilings_read_the_split_they_are_asked_for(tiny_mock):
    """utils.eval.ceilings on the test split evaluates the test galaxies (generate.py's subset with
    a galaxy count) with predictors that learn from the training split; the default is validation."""
    from utils.data.dataset import open_survey
    from utils.data.survey import subset_rows
    from utils.eval.ceilings import ceilings
    from utils.eval.metrics import catalog_truth

    survey = open_survey(tiny_mock)
    for split, galaxies in (("val", 0), ("test", 3)):
        result = ceilings(survey, split, galaxies, k=3)
        rows = survey.rows(split) if split == "val" else subset_rows(survey.rows("test"), 3, seed=0)
        assert result["split"] == split
        assert result["n_galaxies"] == len(rows) > 0
        classes = catalog_truth(survey.catalog[rows])["bpt"]
        assert result["majority_rate"] == pytest.approx(np.bincount(classes).max() / len(rows))
        assert set(result["predictors"]) == {"colours, r, B/T, sizes", "the same + true z"}
    assert len(survey.rows("test")) > 3  # the subset was a subset

"""generate.py: ranking, evaluation, FITS export, flux calibration and error paths."""
from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from conftest import gen_args, only_run, run_script, tiny_generative_args
from utils.astro.science import BPT_CLASSES, dn4000, measure
from utils.astro.spectra import preprocess
from utils.data.dataset import SpectraDataset, open_survey
from utils.eval.metrics import photometric_params, rank, summarise_samples


def test_oracle_scores_rank_the_closest_sample_first():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(6, 50))
    samples = truth[:, None] + rng.normal(scale=rng.uniform(0.1, 2, (6, 9, 1)), size=(6, 9, 50))
    oracle = -((samples - truth[:, None]) ** 2).mean(-1)  # a perfect scorer
    out = summarise_samples(samples, oracle, truth, top_k=3)
    errors = ((samples - truth[:, None]) ** 2).mean(-1)
    assert np.array_equal(out["order"][:, 0], errors.argmin(1))
    assert np.allclose(out["mse_contrastive"], errors.min(1))
    assert np.all(out["mse_contrastive"] <= out["mse_random_sample"])
    assert np.allclose(out["topk_mean"], np.take_along_axis(samples, out["order"][:, :3, None], 1).mean(1))
    assert np.all(np.diff(out["ranked_scores"], axis=1) <= 0)


def test_nan_scores_rank_last():
    order = rank(np.array([[0.1, np.nan, 0.5, -0.2]]))
    assert order.tolist() == [[2, 0, 3, 1]]


@pytest.mark.parametrize("kind", ["scale", "log"])
def test_photometric_calibration_recovers_flux(tiny_mock, kind):
    import astropy.units as u
    import speclite.filters

    survey = open_survey(tiny_mock)
    ds = SpectraDataset(survey, None, preprocessing=kind, downsample=4)
    flux = np.stack([ds.flux(i)[0] for i in range(8)])
    bands = speclite.filters.load_filters("sdss2010-r", "sdss2010-i")
    m = bands.get_ab_magnitudes(flux * 1e-17 * u.erg / u.s / u.cm ** 2 / u.AA, ds.wave * u.AA)
    x, true_params = preprocess(flux, ds.wave, kind)
    params = photometric_params(x, ds.wave, np.asarray(m["sdss2010-r"]), np.asarray(m["sdss2010-i"]), kind)
    assert np.allclose(params, true_params, rtol=1e-4, atol=1e-3)  # measured: within 1e-4 of the truth
    assert np.allclose(ds.deprocess(x, params), flux, rtol=0.02, atol=0.02 * np.abs(flux).max())


@pytest.mark.slow
def test_generate_end_to_end_writes_readable_fits(tiny_mock, trained_runs, tmp_path):
    checkpoint = tmp_path.parent / f"{tmp_path.name}-copied.pt"  # away from its run folder and config.yml:
    checkpoint.write_bytes(next((trained_runs[1] / "checkpoints").glob("latest_*.pt")).read_bytes())
    result = run_script("generate.py", gen_args(tiny_mock, trained_runs, tmp_path, "sampling.per_galaxy_fits=true",
                                                f"sampling.generative_run={checkpoint}",  # the file alone suffices
                                                "sampling.split=test", "sampling.calibration_objects=5"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MSE of the top-ranked sample" in result.stdout
    out = only_run(tmp_path)
    survey = open_survey(tiny_mock)
    ds = SpectraDataset(survey, "test", downsample=16)
    with fits.open(out / "spectra.fits") as hdus:
        wave = hdus["WAVELENGTH"].data
    table = Table.read(out / "spectra.fits", hdu="SPECTRA")
    assert np.allclose(wave, ds.wave)
    assert len(wave) == 3598 // 16
    assert len(table) == len(ds)
    assert table["samples"].shape == (len(ds), 4, len(wave))
    assert str(table["samples"].unit) == "1e-17 erg / (Angstrom s cm2)"
    true_flux = np.stack([ds.flux(i)[0] for i in range(len(ds))])
    assert np.allclose(table["true_flux"], true_flux, rtol=1e-4, atol=1e-3)  # back in flux units
    assert np.all(np.diff(table["scores"], axis=1) <= 0)
    lo, hi = true_flux.min(1), true_flux.max(1)  # 'scale' samples clip to the true range
    assert np.all(table["samples"].min((1, 2)) >= lo - 1e-3)
    assert np.all(table["samples"].max((1, 2)) <= hi + 1e-3)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"mse_mean", "mse_contrastive", "mse_contrastive_mean", "mse_random_sample",
            "mse_mean_train_spectrum"} == set(metrics["metrics"])
    assert list((out / "figures").glob("galaxy_*.png"))

    # the science evaluation: properties per galaxy, generation beside the baselines on the same galaxies
    science = metrics["science"]
    assert set(science["predictors"]) == {"samples", "mean_of_n", "knn_embedding", "mean_train", "photo_z", "observed"}
    assert science["truth"].startswith("the catalog's true")  # the mock's intrinsic properties
    assert science["bpt_true_counts"] == {name: int(np.sum(np.asarray(survey.catalog["true_bpt"])[ds.rows] == i))
                                          for i, name in enumerate(BPT_CLASSES)}
    assert science["n_galaxies"] == len(ds)
    assert "z_sigma_nmad" in science["predictors"]["photo_z"]
    assert all(len(v) == 2 for v in science["predictors"]["samples"].values())  # value and standard error
    # the intervals are widened by a calibration fitted on validation galaxies, not on these
    assert science["calibration"]["split"] == "val"
    assert (science["calibration"]["n_galaxies"] == min(5, len(
        survey.rows("val"))))
    assert set(science["calibration"]["factors"]) >= {"pixels", "z", "dn4000", "ew_halpha"}
    assert "coverage68_z_raw" in science["predictors"]["samples"]
    assert "(raw)" in result.stdout
    with fits.open(out / "spectra.fits") as hdus:
        header = hdus["SPECTRA"].header
    assert header["CALIBN"] == science["calibration"]["n_galaxies"]
    factor = science["calibration"]["factors"]["pixels"]["0.68"]  # None: unbounded
    assert header["CALPIX68"] == ("unbounded" if factor is None else pytest.approx(factor))
    assert "Science evaluation over" in result.stdout
    assert "kNN photo-z" in result.stdout
    for name in ("z_gen", "z_gen_lo", "z_gen_hi", "dn4000_true", "ew_halpha_knn", "bpt_gen", "z_photo"):
        assert name in table.colnames, name
        assert len(table[name]) == len(ds), name
    assert np.all(table["z_gen_lo"] <= table["z_gen"])
    assert np.all(table["z_gen"] <= table["z_gen_hi"])
    # the same code on the true spectra (generate.py weights the redshift fit by the typical ivar: tiny z shifts)
    assert np.allclose(table["dn4000_true"], dn4000(true_flux, ds.wave, measure(true_flux, ds.wave).z), rtol=1e-3)
    for figure in ("science_z", "science_dn4000", "science_bpt", "science_coverage"):
        assert (out / "figures" / f"{figure}.png").is_file(), figure

    # one file per galaxy in the spec-lite layout, which specutils' SDSS reader recognises
    from specutils import Spectrum

    per = sorted((out / "galaxies").glob("spec-*.fits"))
    assert len(per) == len(ds)
    spectrum = Spectrum.read(per[0])  # format identified from the file
    objid = int(per[0].stem.split("-")[1])
    g = int(np.flatnonzero(table["objid"] == objid)[0])
    assert np.allclose(spectrum.spectral_axis.to_value("Angstrom"), ds.wave, rtol=1e-6)
    assert np.allclose(spectrum.flux.value, table["mean"][g], rtol=1e-5)
    assert str(spectrum.flux.unit) == "1e-17 erg / (Angstrom s cm2)"
    spread = table["samples"][g].astype(np.float64).var(0, ddof=1)
    assert np.allclose(spectrum.uncertainty.array, 1 / spread, rtol=1e-3)
    with fits.open(per[0]) as hdus:
        assert hdus[0].header["FIBERID"] > 0
        assert hdus["SAMPLES"].data["flux"].shape == (4, len(wave))
        assert hdus[0].header["CALPIX68"] == header["CALPIX68"]  # the calibration travels with each file
        assert hdus["SPECOBJ"].data["z"][0] == pytest.approx(table["z_gen"][g])
        assert np.allclose(hdus["TRUTH"].data["flux"][0], true_flux[g], rtol=1e-4, atol=1e-3)


@pytest.mark.slow
def test_generate_refuses_missing_and_mismatched_models(tiny_mock, trained_runs, tmp_path):
    from utils.config import load_config
    from utils.errors import UserError
    from utils.trained import find_models

    # how the models are looked up (in-process: each script launch costs seconds of imports) ...
    config = load_config("generative", gen_args(tiny_mock, trained_runs, tmp_path) + [
        f"sampling.contrastive_run={tmp_path / 'nothing'}"])
    with pytest.raises(UserError, match="nothing' does not exist"):
        find_models(config)
    # the folder of runs (run.out_dir) instead of one run: the error names the newest run in it
    config = load_config("generative", gen_args(tiny_mock, trained_runs, tmp_path) + [
        f"sampling.contrastive_run={trained_runs[0].parent}"])
    with pytest.raises(UserError, match=f"holds run folders.*newest: '{trained_runs[0]}'"):
        find_models(config)
    config = load_config("generative", [f"data.root={tiny_mock}", f"run.out_dir={tmp_path / 'none'}"])
    with pytest.raises(UserError, match="no finished diffusion model run"):
        find_models(config)
    # ... and what the script makes of a refusal: exit code 1, one line, nothing written
    swapped = run_script("generate.py", gen_args(tiny_mock, trained_runs, tmp_path) + [
        f"sampling.contrastive_run={trained_runs[1]}"])  # the diffusion run given as the contrastive one
    assert swapped.returncode == 1
    assert "is a generative checkpoint, expected a contrastive one" in swapped.stderr
    assert "Traceback" not in swapped.stderr
    assert not list(tmp_path.glob("*/spectra.fits"))
    mismatch = load_config("generative", gen_args(tiny_mock, trained_runs, tmp_path) + ["data.downsample=8"])
    with pytest.raises(UserError, match="data.downsample differs"):
        find_models(mismatch)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_sequential_ddpm_matches_batched_ddpm(prediction):
    """bench/generate_speed.py times the research code's loop on a few galaxies and takes its
    quality from the batched sampler: with the same random draws both give the same spectra."""
    import torch

    from models.diffusion import GaussianDiffusion, cosine_betas
    from models.unet import ConditionalUNet1D
    from utils.generation import sample_for_images, sequential_ddpm

    torch.manual_seed(0)
    model = ConditionalUNet1D(40, 3, width=8, mults=(1, 2), attn_levels=(1,), head_dim=8, image_width=8).eval()
    for p in model.parameters():  # the zero-initialised projections would hide the image
        torch.nn.init.normal_(p, std=0.2)
    diffusion = GaussianDiffusion(cosine_betas(20), prediction=prediction)
    image = torch.randn(3, 64, 64)
    loop = sequential_ddpm(model, diffusion, image, 1, torch.Generator().manual_seed(3))
    batched = sample_for_images(model, diffusion, image[None], 1, "ddpm", None, clip=1.0,
                                generator=torch.Generator().manual_seed(3))
    assert torch.allclose(loop, batched[0], atol=1e-5)
    other = sample_for_images(model, diffusion, image[None], 1, "ddpm", None, clip=1.0,
                              generator=torch.Generator().manual_seed(4))
    assert not torch.allclose(loop, other[0], atol=1e-2)


@pytest.mark.slow
def test_validate_script_reproduces_the_runs_validation(tiny_mock, trained_runs, tmp_path):
    """bench/validate_generative.py with the run's own settings gives the run's last validation;
    --galaxies picks the subset size."""
    generative = trained_runs[1]
    logged = json.loads((generative / "metrics.json").read_text())["val"]
    out = tmp_path / "v.json"
    result = run_script("bench/validate_generative.py", [str(generative), "--galaxies", "4", "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads(out.read_text())
    n_val = len(open_survey(tiny_mock).rows("val"))
    assert again["galaxies"] == min(4, n_val)
    assert again["mse_ratio"] == pytest.approx(logged["mse_ratio"], rel=1e-4)
    assert again["mse_mean"] == pytest.approx(logged["mse_mean"], rel=1e-4)
    from utils.generation import validate_run  # in-process: a second launch would cost seconds of imports

    assert len(validate_run(generative, 2)["mse"]) == 2 < n_val


def test_image_encoder_warm_start_from_the_contrastive_network(tiny_mock, trained_runs, tmp_path):
    """model.image_init copies the contrastive image encoder (not its head) into the diffusion
    model's condition encoder before training; a different encoder is refused by name."""
    import torch

    from utils.builders import build_generative_model
    from utils.config import load_config
    from utils.errors import UserError
    from utils.trained import load_trained, warm_start_image_encoder

    contrastive = trained_runs[0]
    config = load_config("generative",
                         tiny_generative_args(tiny_mock, tmp_path / "g") + [f"model.image_init={contrastive}"])
    model = build_generative_model(config["model"], 224, 3)
    before = {k: v.clone() for k, v in model.image_encoder.state_dict().items()}
    encoder = ("gri", config["model"]["image_depth"], config["model"]["image_width"])
    assert warm_start_image_encoder(model, config["model"]["image_init"], *encoder).parent.parent == contrastive
    _, weights, _, _ = load_trained(str(contrastive), contrastive.parent, "contrastive network", "contrastive")
    after = model.image_encoder.state_dict()
    assert all(torch.equal(after[k], weights[f"image_encoder.{k}"]) for k in after)
    assert any(not torch.equal(after[k], before[k]) for k in after if k.endswith("weight"))
    wider = load_config("generative", tiny_generative_args(tiny_mock, tmp_path / "g") + ["model.image_width=16"])
    with pytest.raises(UserError, match="model.image_width: 16 here, 8 in"):
        warm_start_image_encoder(build_generative_model(wider["model"], 224, 3), str(contrastive), "gri", 18, 16)
    # the trainer uses it (the fixture's run starts from the fixture's contrastive network)
    assert f"image encoder initialised from the contrastive network {contrastive}" in \
        (trained_runs[1] / "log.txt").read_text()

"""Aperture photometry of the ugriz images (utils.photometry) and the denoiser's photometry
conditioning (model.photometry): the features, the dataset's batches, the network, the trainer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from astropy.table import Table

from conftest import ROOT, only_run, run_script, tiny_generative_args
from models.unet import ConditionalUNet1D, TransformerBlock
from utils.config import ConfigError, load_config
from utils.dataset import DataError, SpectraDataset, open_survey
from utils.photometry import N_FEATURES, PIXEL_SCALE, asinh_colours, fibre_diameters, photometry_features


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


def test_dataset_measures_the_stored_images_photometry_per_batch(tiny_mock):
    from utils.generation import photometry_of

    survey = open_survey(tiny_mock)
    ds = SpectraDataset(survey, "train", image="ugriz", downsample=16, train=True)  # augmentation leaves it alone
    stored = lambda i: np.asarray(survey.images["ugriz"][ds.rows[i]])[None]  # noqa: E731
    assert np.allclose(ds.photometry(ds.rows[3:4]), photometry_features(stored(3), 3.0))
    table = ds.photometry(chunk=5)  # all items, in row order across chunks
    assert table.shape == (len(ds), N_FEATURES)
    assert np.allclose(table, np.concatenate([ds.photometry(ds.rows[i:i + 1]) for i in range(len(ds))]))
    # the images' r agrees with the mock catalog's magnitudes (sky and photon noise, light off the stamp)
    offset = table[:, 4] - np.asarray(survey.catalog["mag_r"])[ds.rows]
    assert abs(np.median(offset)) < 0.15
    # a batch's features come from its survey rows; only a denoiser built to read them gets them
    batch = next(ds.iter_batches(4))
    assert "photometry" not in batch
    kwargs = dict(width=8, mults=(1, 2), attn_levels=(1,), head_dim=8, image_width=8)
    reader = ConditionalUNet1D(32, 5, photometry=N_FEATURES, **kwargs)
    assert photometry_of(ConditionalUNet1D(32, 5, **kwargs), ds, batch, torch.device("cpu")) is None
    assert np.allclose(photometry_of(reader, ds, batch, torch.device("cpu")).numpy(), table[:4])
    # the fibre's diameter comes from the survey (meta.json here): a 2" fibre sees other colours
    survey.meta["fibre_arcsec"] = 2.0
    boss = SpectraDataset(survey, "train", image="ugriz", downsample=16)
    assert np.allclose(boss.photometry(ds.rows[3:4]), photometry_features(stored(3), 2.0))
    assert not np.allclose(boss.photometry(ds.rows[3:4])[0, 5:], table[3, 5:], atol=1e-3)
    gri = SpectraDataset(survey, "train", image="gri", downsample=16)
    with pytest.raises(DataError, match="ugriz"):
        gri.photometry()


def test_photometry_token_and_timestep_term():
    torch.manual_seed(0)
    kwargs = dict(width=8, mults=(1, 2), attn_levels=(1,), head_dim=8, image_width=8)
    net = ConditionalUNet1D(32, 5, photometry=N_FEATURES, cond_drop=0.5, **kwargs).eval()
    plain = ConditionalUNet1D(32, 5, **kwargs).eval()
    missing, unexpected = plain.load_state_dict(net.state_dict(), strict=False)
    assert not missing and {k.split(".")[0] for k in unexpected} == {
        "photometry_mean", "photometry_std", "photometry_embed", "photometry_time", "null_context"}
    images, phot = torch.randn(4, 5, 64, 64), torch.randn(4, N_FEATURES) * 2 + 17
    with pytest.raises(ValueError, match="photometric features"):
        net.encode(images)
    net.set_photometry_stats(phot)
    assert torch.allclose(net.photometry_mean, phot.double().mean(0).float())
    context = net.encode(images, phot)
    assert context.shape == (4, 5, net.image_encoder.feature_dim)
    assert net.unconditional(context).shape == context.shape
    assert torch.allclose(context[:, :4], plain.encode(images), atol=1e-6)  # the image tokens are the paper's
    mean_token = net.photometry_embed(torch.zeros(1, N_FEATURES))
    assert torch.allclose(net.encode(images[:1], net.photometry_mean[None])[0, 4], mean_token[0], atol=1e-5)
    x, t = torch.randn(4, 1, 32), torch.randint(0, 10, (4,))
    other = net.encode(images, phot.flip(0))
    with torch.no_grad():  # a new transformer block is the identity: only the timestep term reads it
        assert not torch.allclose(net(x, t, context), net(x, t, other))
        torch.nn.init.zeros_(net.photometry_time[-1].weight)
        torch.nn.init.zeros_(net.photometry_time[-1].bias)
        assert torch.allclose(net(x, t, context), net(x, t, other), atol=1e-6)
        for block in net.modules():  # a trained cross-attention reads the fifth token
            if isinstance(block, TransformerBlock):
                torch.nn.init.normal_(block.proj_out.weight, std=0.1)
        assert not torch.allclose(net(x, t, context), net(x, t, other))
    with pytest.raises(ValueError, match="photometry needs conditioning 'x-attention'"):
        ConditionalUNet1D(32, 5, conditioning="concat", photometry=N_FEATURES, **kwargs)


def test_photometry_needs_ugriz_images():
    params = ROOT / "params_generative.yml"
    with pytest.raises(ConfigError, match="model.photometry.*ugriz"):
        load_config(params, ["model.photometry=true"])
    assert load_config(params, ["model.photometry=true", "data.image=ugriz"])["model"]["photometry"] is True


def test_trainer_standardises_with_the_training_galaxies_and_samples_follow_the_photometry(tiny_mock, tmp_path):
    from utils.builders import build_diffusion, build_generative_model
    from utils.generation import sample_for_images, validation_errors

    result = run_script("train_generative.py", tiny_generative_args(tiny_mock, tmp_path) +  # with the line weights
                        ["data.image=ugriz", "model.photometry=true", "train.max_iters=2", "train.line_weight=5"])
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = next((only_run(tmp_path) / "checkpoints").glob("latest_*.pt"))
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    config = load_config(ROOT / "params_generative.yml", tiny_generative_args(tiny_mock, tmp_path) +
                         ["data.image=ugriz", "model.photometry=true"])
    survey = open_survey(tiny_mock)
    train = SpectraDataset.from_config(survey, "train", config["data"])
    table = torch.from_numpy(train.photometry()).double()
    for key in ("model", "ema_model"):
        assert torch.allclose(saved[key]["photometry_mean"], table.mean(0).float())
        assert torch.allclose(saved[key]["photometry_std"], table.std(0).float())
    model = build_generative_model(config, train.n_pixels, train.n_channels)
    model.load_state_dict(saved["ema_model"])
    val = SpectraDataset.from_config(survey, "val", config["data"])
    mse, _, _ = validation_errors(model, build_diffusion(config), val, config, torch.device("cpu"),
                                  np.zeros(val.n_pixels))
    assert len(mse) == len(val) and np.all(np.isfinite(mse))
    batch = next(val.iter_batches(2))
    phot = torch.from_numpy(val.photometry(batch["index"].numpy()))
    draw = lambda phot: sample_for_images(model, build_diffusion(config), batch["image"], 2, "ddim", 3,  # noqa: E731
                                          config, torch.Generator().manual_seed(0), photometry=phot)
    assert torch.equal(draw(phot), draw(phot))
    assert not torch.allclose(draw(phot), draw(phot + 1.0))

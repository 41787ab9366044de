"""The ApJ 2024 cascade (SPEC 5): the low resolution and its interpolation, stage-aware data and
networks, conditioning augmentation, validation on the low stage's own samples, and the whole
cascade trained and sampled end to end; the research code's cascade defects pinned."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from astropy.io import fits

from conftest import only_run, run_script, tiny_contrastive_args, tiny_generative_args
from models.diffusion import GaussianDiffusion, cosine_betas
from models.unet import ConditionalUNet1D
from utils.astro.spectra import LowResolution
from utils.data.dataset import SpectraDataset, Stage, open_survey


@pytest.mark.parametrize("reduction", ["decimate", "mean"])
def test_low_resolution_pixels_sit_where_their_wavelengths_are(reduction):
    """4,500 pixels, factor 8: 563 low pixels (SPEC 5), each at the mean index of the pixels it
    stands for, so that a straight line survives the round trip through the low resolution (the
    research code's half-pixel-centred interpolation shifted the conditioning)."""
    low = LowResolution(4500, 8, reduction)
    assert low.n_low == 563
    x = np.arange(4500, dtype=np.float64)[None] * 0.01 + 3.0
    identity = np.array([[-1.0, 1.0]])  # 'scale' with these parameters leaves the values as they are
    lo = low.from_flux(x, np.ones_like(x), identity, "scale")
    assert lo.shape == (1, 563)
    assert np.allclose(lo[0], 3.0 + 0.01 * low.positions)  # a line's value at the low pixel's position
    if reduction == "decimate":
        assert np.allclose(lo[0], x[0, ::8])
        assert low.positions[1] == 8.0
    else:
        assert lo[0, 0] == pytest.approx(x[0, :8].mean())
        assert low.positions[0] == 3.5
        assert lo[0, -1] == pytest.approx(x[0, 4496:].mean())  # the last, shorter block
    up = low.upsample(lo)
    inside = (np.arange(4500) >= low.positions[0]) & (np.arange(4500) <= low.positions[-1])
    assert np.allclose(up[0, inside], x[0, inside], atol=1e-5)
    assert np.allclose(low.upsample_matrix().sum(1), 1.0)
    wave = np.linspace(4000.0, 8499.0, 4500)
    assert low.coordinate(wave)[1] == pytest.approx(4008.0 if reduction == "decimate" else 4011.5)
    with pytest.raises(ValueError, match="factor must be >= 2"):
        LowResolution(100, 1)
    if reduction == "mean":  # the flux's inverse-variance weighted mean: a pixel without weight counts for nothing
        ivar = np.ones_like(x)
        ivar[0, 0], x[0, 0] = 0.0, 1e6
        assert low.from_flux(x, ivar, identity, "scale")[0, 0] == pytest.approx(x[0, 1:8].mean())
        assert low.from_flux(x, np.zeros_like(x), identity, "scale")[0, 0] == pytest.approx(x[0, :8].mean())


def test_stage_items_carry_what_each_network_models(tiny_mock):
    survey = open_survey(tiny_mock)
    single = SpectraDataset(survey, "train", downsample=8)
    low = SpectraDataset(survey, "train", downsample=8, stage=Stage("low", 4, "mean"))
    sup = SpectraDataset(survey, "train", downsample=8, stage=Stage("super", 4, "mean"))
    assert low.n_pixels == -(-single.n_pixels // 4)
    assert sup.n_pixels == single.n_pixels
    flux, ivar = single.flux(2)
    params = single[2]["params"].numpy()
    assert np.allclose(low[2]["spectrum"][0].numpy(), low.low.from_flux(flux, ivar, params, single.preprocessing))
    assert np.allclose(sup[2]["low"][0].numpy(), low[2]["spectrum"][0].numpy())
    assert np.array_equal(sup[2]["spectrum"], single[2]["spectrum"])
    assert len(low.wave) == low.n_pixels
    assert low.wave[0] > single.wave[0]  # the first block's mean position
    assert "low" not in single[2]
    # 'mean' in 'log' units is the binned flux's log (the data of a single-stage model binned as much),
    # not the mean of the full pixels' logs, which noise biases low
    logs = SpectraDataset(survey, "train", downsample=8, preprocessing="log", stage=Stage("low", 4, "mean"))
    binned = SpectraDataset(survey, "train", downsample=32, preprocessing="log")
    expected = np.log(np.maximum(binned.flux(2)[0] / logs[2]["params"].numpy()[0], 1e-3))
    assert np.allclose(logs[2]["spectrum"][0].numpy()[: binned.n_pixels], expected, atol=1e-5)


def test_super_stage_network_needs_its_low_resolution_input_and_level():
    net = ConditionalUNet1D(64, 3, width=8, mults=(1, 2), attn_levels=(1,), image_width=8, low_channel=True,
                            noise_level=True)
    x, t, images = torch.randn(2, 1, 64), torch.tensor([3, 9]), torch.randn(2, 3, 64, 64)
    with pytest.raises(ValueError, match="low-resolution input"):
        net(x, t, images=images)
    with pytest.raises(ValueError, match="their level"):
        net(x, t, images=images, low=torch.randn(2, 1, 64))
    a = net(x, t, images=images, low=torch.zeros(2, 1, 64), level=torch.tensor([0, 0]))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    a = net(x, t, images=images, low=torch.zeros(2, 1, 64), level=torch.tensor([0, 0]))
    b = net(x, t, images=images, low=torch.ones(2, 1, 64), level=torch.tensor([0, 0]))
    c = net(x, t, images=images, low=torch.zeros(2, 1, 64), level=torch.tensor([50, 50]))
    assert not torch.allclose(a, b)  # it reads the low-resolution input
    assert not torch.allclose(a, c)  # and its noise level


def test_conditioning_augmentation_noises_the_low_input_to_levels_it_tells():
    """train.cond_noise: each item's low-resolution input noised to a random step up to the
    maximum (Ho et al. 2021), the step handed to the network; 0 (the research code's way) leaves
    the inputs clean, at level 0."""
    from utils.generation import super_stage_input

    diffusion = GaussianDiffusion(cosine_betas(100))
    low = LowResolution(40, 4, "mean")
    upsample = torch.from_numpy(low.upsample_matrix())
    truth = torch.linspace(-1, 1, 10).repeat(500, 1, 1)
    torch.manual_seed(0)
    noisy = super_stage_input(truth, diffusion, 30, upsample)
    assert noisy["low"].shape == (500, 1, 40)
    assert int(noisy["level"].min()) == 0
    assert int(noisy["level"].max()) == 30
    assert not torch.allclose(noisy["low"], truth @ upsample.T)
    high = noisy["level"] > 20
    spread = lambda sel: float((noisy["low"][sel] - (truth @ upsample.T)[sel]).std())  # noqa: E731
    assert spread(high) > spread(noisy["level"] < 3) * 3  # more noise at the higher levels
    clean = super_stage_input(truth, diffusion, 0, upsample)
    assert torch.allclose(clean["low"], truth @ upsample.T)
    assert int(clean["level"].abs().max()) == 0


def test_the_super_stage_is_validated_on_the_low_stages_samples_not_on_the_truth(tiny_mock):
    """validation_errors of a super-stage model conditions it on a low-stage sample (what it is
    given when used), never on the truth's low-resolution version (the research code's optimistic
    validation)."""
    from utils.generation import validation_errors
    from utils.trained import LowStage

    survey = open_survey(tiny_mock)
    val = SpectraDataset(survey, "val", downsample=16, stage=Stage("super", 4, "mean"))
    torch.manual_seed(0)
    kwargs = dict(width=8, mults=(1, 2), attn_levels=(1,), image_width=8)
    super_net = ConditionalUNet1D(val.n_pixels, 3, low_channel=True, **kwargs).eval()
    low_net = ConditionalUNet1D(val.low.n_low, 3, **kwargs).eval()
    diffusion = GaussianDiffusion(cosine_betas(10), prediction="v")
    stage = LowStage({}, None, {}, denoiser=low_net, diffusion=diffusion, low=val.low,
                     upsample=torch.from_numpy(val.low.upsample_matrix()))
    seen = []
    super_net.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["low"].detach().clone()), with_kwargs=True)
    low_calls = []
    low_net.register_forward_hook(lambda m, a, o: low_calls.append(1))
    validation_errors(super_net, diffusion, val.like(val.rows[:3]), np.zeros(val.n_pixels), n_samples=2, steps=2,
                      seed=0, device=torch.device("cpu"), low_stage=stage)
    assert low_calls
    truths = torch.stack([val[i]["low"] for i in range(3)])  # (3, 1, L_low)
    from_truth = (truths @ stage.upsample.T).repeat_interleave(2, 0)
    assert seen[0].shape == from_truth.shape
    assert not torch.allclose(seen[0], from_truth, atol=1e-3)


def test_a_cascade_shares_the_super_samples_among_the_best_low_ones():
    from utils.generation import SamplingPlan

    assert list(SamplingPlan(3, "ddim", 5, low_samples=3, low_keep=2).shares()) == [2, 1]
    assert list(SamplingPlan(5, "ddim", 5, low_samples=100, low_keep=5).shares()) == [1] * 5
    assert list(SamplingPlan(7, "ddim", 5, low_samples=2, low_keep=5).shares()) == [4, 3]  # keep at most what is drawn


def cascade_args(tiny_mock, out, kind, stage):
    base = tiny_contrastive_args(tiny_mock, out) if kind == "contrastive" else tiny_generative_args(tiny_mock, out)
    return base + ["data.downsample=8", f"model.stage={stage}", "model.low_factor=4", "model.low_reduction=mean"]


@pytest.fixture(scope="session")
def trained_cascade(tiny_mock, tmp_path_factory):
    """Both stages of a tiny cascade on the tiny mock (449 pixels, low stage 113): the low stage's
    ranker and diffusion model, then the super stage's (trained with noisy low inputs)."""
    runs = tmp_path_factory.mktemp("cascade")
    for kind, stage, extra in (("contrastive", "low", []), ("generative", "low", []), ("contrastive", "super", []),
                               ("generative", "super", ["train.cond_noise=0.3"])):
        out = runs / f"{kind}-{stage}"
        if kind == "contrastive":
            extra = extra + ["train.max_iters=3"]
        elif stage == "super":
            extra = extra + [f"val.low_run={only_run(runs / 'generative-low')}"]
        result = run_script(f"train_{kind}.py", cascade_args(tiny_mock, out, kind, stage) + extra)
        assert result.returncode == 0, result.stderr[-3000:]
    return {name: only_run(runs / name) for name in ("contrastive-low", "generative-low", "contrastive-super",
                                                     "generative-super")}


def generate_args(tiny_mock, runs, out, *extra):
    return [f"data.root={tiny_mock}", "data.source=folder", "data.downsample=8",
            f"sampling.generative_run={runs['generative-super']}",
            f"sampling.contrastive_run={runs['contrastive-super']}",
            f"sampling.low_run={runs['generative-low']}", f"sampling.low_contrastive_run={runs['contrastive-low']}",
            f"sampling.out_dir={out}", "sampling.split=val", "sampling.low_samples=4", "sampling.low_keep=2",
            "sampling.n_samples=3", "sampling.top_k=2", "sampling.sampler=ddim", "sampling.steps=3",
            "sampling.figures=1", "sampling.batch_galaxies=3", "sampling.cond_noise=0.1", *extra]



def test_a_cascade_figure_stays_readable_with_many_low_samples(tmp_path):
    """The low stage's panel names its best scores, not all of them: 100 low samples must not
    widen the figure beyond its 12 inches."""
    from PIL import Image

    from utils.plotting import plot_ranked

    rng = np.random.default_rng(0)
    wave, low_wave = np.linspace(3800, 9200, 400), np.linspace(3800, 9200, 25)
    spectra = rng.normal(size=(3, 400))
    low = (low_wave, rng.normal(size=(100, 25)), np.sort(rng.random(100))[::-1])
    path = plot_ranked(tmp_path / "g.png", wave, rng.random((64, 64, 3)), spectra[0], spectra[1], spectra[2],
                       spectra[:3], [0.9, 0.8, 0.7], 5, "galaxy", low=low)
    width = Image.open(path).size[0]
    assert width < 13 * 110, f"{width} pixels wide"


@pytest.mark.slow
def test_the_cascade_trains_and_generates_full_spectra(tiny_mock, trained_cascade, tmp_path):
    """The super stage validates on its low stage's samples, and generate.py runs the cascade:
    spectra on the full grid, the low stage's samples beside them, a figure of both."""
    log = (trained_cascade["generative-super"] / "log.txt").read_text()
    assert "449 pixels" in log
    assert "113 pixels" in (trained_cascade["generative-low"] / "log.txt").read_text()
    metrics = json.loads((trained_cascade["generative-super"] / "metrics.json").read_text())
    assert np.isfinite(metrics["val"]["mse_mean"])
    result = run_script("generate.py", generate_args(tiny_mock, trained_cascade, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    out = only_run(tmp_path)
    with fits.open(out / "spectra.fits") as hdus:
        assert hdus["SPECTRA"].data["samples"].shape[1:] == (3, 449)
        assert hdus["LOWSTAGE"].data["samples"].shape[1:] == (4, 113)
        assert len(hdus["LOWWAVE"].data) == 113
        assert np.isfinite(hdus["SPECTRA"].data["z_gen"]).all()
    assert list((out / "figures").glob("galaxy_*.png"))
    # bench/cascade.py puts both stages on one grid (blocks of 4: 112 pixels; the low stage's 113th dropped)
    bench = run_script("bench/cascade.py", [f"a={out}", f"b={out}", "--factor", "4", "--boot", "20",
                                            "--out", str(tmp_path / "c.json")])
    assert bench.returncode == 0, bench.stderr[-2000:]
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["grid_pixels"] == 112 and result["galaxies"] == 3
    assert result["a"]["low_stage"]["samples"] == 4
    assert result["b"]["mean_of_n_minus_a"] == [0.0, 0.0]


@pytest.mark.slow
def test_each_stage_starts_its_image_encoder_from_its_own_ranker(trained_cascade, tmp_path, monkeypatch):
    """model.image_init=contrastive takes the newest finished contrastive run of the diffusion
    model's stage, whichever stage's ranker finished last."""
    from utils.builders import build_generative_model
    from utils.config import load_config
    from utils.trained import warm_start_image_encoder

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "contrastive").mkdir(parents=True)
    for name in ("contrastive-super", "contrastive-low"):  # the low stage's ranker is the newer
        (tmp_path / "runs" / "contrastive" / name).symlink_to(trained_cascade[name])
    cfg = load_config("generative", ["model.width=8", "model.image_width=8", "model.mults=[1,2]",
                                     "model.attn_levels=[1]"])["model"]
    for stage in ("super", "low"):
        used = warm_start_image_encoder(build_generative_model(cfg, 64, 3), "contrastive", "gri", cfg["image_depth"],
                                        8, stage)
        assert used.resolve().is_relative_to(trained_cascade[f"contrastive-{stage}"].resolve())


@pytest.mark.slow
def test_cascade_refusals_name_the_stage(tiny_mock, trained_cascade, tmp_path):
    from utils.config import load_config
    from utils.errors import UserError
    from utils.trained import find_models

    def config(*extra):
        return load_config("generative", generate_args(tiny_mock, trained_cascade, tmp_path, *extra))

    with pytest.raises(UserError, match="sampling.generative_run .* is a low-stage diffusion model"):
        find_models(config(f"sampling.generative_run={trained_cascade['generative-low']}"))
    with pytest.raises(UserError, match="sampling.low_run .* is a super-stage diffusion model, expected a low"):
        find_models(config(f"sampling.low_run={trained_cascade['generative-super']}"))
    with pytest.raises(UserError, match="sampling.low_contrastive_run .* super-stage contrastive"):
        find_models(config(f"sampling.low_contrastive_run={trained_cascade['contrastive-super']}"))
    pair = find_models(config())
    assert pair.low_stage.gen_path.parent.parent == trained_cascade["generative-low"]
    # stages of different low resolutions do not make a cascade
    from utils.trained import build_models, find_low_stage

    other = {**pair.gen_cfg, "model": {**pair.gen_cfg["model"], "low_factor": 8}}
    with pytest.raises(UserError, match="model.low_factor of the low stage .* a cascade's stages must share it"):
        find_low_stage(str(trained_cascade["generative-low"]), False, config()["data"], other, "super",
                       tmp_path)
    # noisy low inputs for a super stage trained on clean ones: refused before anything is drawn
    from utils.generation import SamplingPlan, check_plan

    built = build_models(pair, 449, 3, torch.device("cpu"))
    check_plan(built, SamplingPlan.from_config(config()))
    del built.denoiser.level_embed  # what a super stage trained with train.cond_noise=0 lacks
    with pytest.raises(UserError, match="trained on clean ones"):
        check_plan(built, SamplingPlan.from_config(config()))
    check_plan(built, SamplingPlan.from_config(config("sampling.cond_noise=0")))
    no_low = run_script("train_generative.py", cascade_args(tiny_mock, tmp_path / "x", "generative", "super") +
                        [f"run.out_dir={tmp_path / 'empty'}"])
    assert no_low.returncode == 1
    assert "validated on samples of its low stage" in no_low.stderr
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").iterdir())

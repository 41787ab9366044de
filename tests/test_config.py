"""Configuration loading: presets, overlays, overrides and every error path."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from utils.config import ConfigError, load_config, save_config

PARAMS = ROOT / "params_contrastive.yml"
GEN_PARAMS = ROOT / "params_generative.yml"


def test_defaults_carry_paper_settings():
    c = load_config(PARAMS, [])
    assert c["train"]["lr"] == 1e-4 and c["train"]["weight_decay"] == 1e-3
    assert c["train"]["lr_decay"] == 0.997 and c["train"]["temperature"] == 0.05
    assert c["model"]["latent_dim"] == 128 and c["model"]["image_depth"] == 50
    g = load_config(GEN_PARAMS, [])
    assert g["diffusion"]["timesteps"] == 250 and g["diffusion"]["schedule"] == "cosine"
    assert g["train"]["ema_decay"] == 0.99 and g["train"]["lr_decay"] == 0.998
    assert g["model"]["mults"] == [1, 2, 4, 8, 16] and g["sampling"]["n_samples"] == 25


def test_section_and_leaf_overrides_are_typed():
    c = load_config(PARAMS, ["train.lr=3e-4", "max_epochs=8", "run.precision=bf16", "spectrum_mults=[1, 2]"])
    assert c["train"]["lr"] == pytest.approx(3e-4) and isinstance(c["train"]["lr"], float)
    assert c["train"]["max_epochs"] == 8
    assert c["run"]["precision"] == "bf16"
    assert c["model"]["spectrum_mults"] == [1, 2]


def test_int_given_for_float_is_accepted_and_null_for_path():
    c = load_config(PARAMS, ["lr=1", "resume=null", "resume=runs/x"])
    assert c["train"]["lr"] == 1.0 and c["run"]["resume"] == "runs/x"


@pytest.mark.parametrize("arg, words", [
    ("train.lr=abc", ["train.lr", "'abc'", "a number"]),
    ("max_epochs=2.5", ["train.max_epochs", "2.5", "an integer"]),
    ("compile=yes please", ["run.compile", "boolean"]),
    ("nonsense=3", ["unknown config key 'nonsense'"]),
    ("model.nonsense=3", ["unknown config key 'model.nonsense'"]),
    ("data.image=rgb", ["data.image", "'rgb'", "'gri'", "'ugriz'"]),
    ("spectrum_mults=[1, x]", ["model.spectrum_mults[1]", "an integer"]),
    ("data=3", ["unknown config key 'data'"]),
    ("sampling.calibration_objects=-1", ["sampling.calibration_objects", "-1", ">= 0"]),
])
def test_bad_overrides_name_key_value_and_expectation(arg, words):
    with pytest.raises(ConfigError) as err:
        load_config(GEN_PARAMS if arg.startswith("sampling.") else PARAMS, [arg])
    for word in words:
        assert word in str(err.value)


def test_calibrating_on_the_evaluated_split_is_refused():
    """The interval calibration is fitted on validation galaxies, so they cannot also judge it."""
    with pytest.raises(ConfigError, match="'sampling.calibration_objects': got 50, expected 0 when sampling.split"):
        load_config(GEN_PARAMS, ["sampling.split=val", "sampling.calibration_objects=50"])
    assert load_config(GEN_PARAMS, ["sampling.split=test", "sampling.calibration_objects=50"])
    catalog = load_config(GEN_PARAMS, ["sampling.split=val", "sampling.catalog=x", "sampling.calibration_objects=5"])
    assert catalog["sampling"]["calibration_objects"] == 5  # a catalog is evaluated, not the split


def test_antithetic_noise_needs_a_deterministic_sampler():
    """Mirrored starting noises pay only where a sample is a function of its starting noise."""
    for args in (["sampling.sampler=ddpm"], ["sampling.sampler=ddim", "sampling.eta=0.5"]):
        with pytest.raises(ConfigError, match="'sampling.antithetic': got true, expected false with a stochastic"):
            load_config(GEN_PARAMS, args + ["sampling.antithetic=true"])
    for args in (["sampling.sampler=ddim", "sampling.eta=0"], ["sampling.sampler=dpmpp2m", "sampling.eta=1"]):
        assert load_config(GEN_PARAMS, args + ["sampling.antithetic=true"])["sampling"]["antithetic"] is True


def test_ambiguous_leaf_key_is_refused():
    with pytest.raises(ConfigError, match="'n_samples' is ambiguous: write one of sampling.n_samples, val.n_samples"):
        load_config(GEN_PARAMS, ["n_samples=3"])


def test_preset_and_config_file_overlay(tmp_path):
    quick = load_config(PARAMS, ["--preset", "quick"])
    assert quick["preset"] == "quick" and quick["data"]["downsample"] == 16 and quick["model"]["image_depth"] == 18
    overlay = tmp_path / "mine.yml"
    overlay.write_text("train:\n  batch_size: 12\nval:\n  every: 7\n")
    c = load_config(PARAMS, ["--preset=quick", "--config", str(overlay), "val.every=9"])
    assert c["train"]["batch_size"] == 12 and c["val"]["every"] == 9 and c["data"]["downsample"] == 16
    bad = tmp_path / "bad.yml"
    bad.write_text("train:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(PARAMS, ["--config", str(bad)])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PARAMS, ["--config", str(tmp_path / "missing.yml")])
    with pytest.raises(ConfigError, match="unknown preset 'fast'.*quick"):
        load_config(PARAMS, ["--preset", "fast"])


def test_resolved_config_round_trips(tmp_path):
    c = load_config(PARAMS, ["--preset", "quick", "seed=5"])
    save_config(c, tmp_path / "config.yml")
    assert yaml.safe_load((tmp_path / "config.yml").read_text()) == c


def test_cli_exit_code_2_without_traceback():
    ok = subprocess.run([sys.executable, "-m", "utils.config", str(PARAMS), "train.lr=2e-4"], cwd=ROOT,
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "lr: 0.0002" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "utils.config", str(PARAMS), "train.lr=fast"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and "train.lr" in bad.stderr and "'fast'" in bad.stderr


def test_allowed_values_come_from_the_implementing_modules(monkeypatch):
    """A sampler added to models.samplers.SAMPLERS is a valid config value (read once per process), and the
    advertised conditionings are the UNet's own."""
    from models import samplers
    from models.unet import CONDITIONINGS
    from utils.config import choices

    choices.cache_clear()  # read the modules anew after the change below
    monkeypatch.setitem(samplers.SAMPLERS, "mine", samplers.SAMPLERS["ddim"])
    assert load_config(GEN_PARAMS, ["sampling.sampler=mine"])["sampling"]["sampler"] == "mine"
    assert choices()["model.conditioning"] == CONDITIONINGS
    monkeypatch.delitem(samplers.SAMPLERS, "mine")
    choices.cache_clear()
    with pytest.raises(ConfigError, match="expected one of 'ddpm', 'ddim', 'dpmpp2m'"):
        load_config(GEN_PARAMS, ["sampling.sampler=mine"])


@pytest.mark.parametrize("preset", [None, "quick", "standard"])
def test_presets_of_both_trainers_prepare_the_same_data(preset):
    """generate.py refuses models trained on differently prepared data: each preset must give the
    contrastive network and the diffusion model the same dataset, bands, preprocessing and grid."""
    from utils.checkpoints import DATA_KEYS

    argv = ["--preset", preset] if preset else []
    con, gen = load_config(PARAMS, argv), load_config(GEN_PARAMS, argv)
    for key in ("root", "source", "mock_objects", "mock_seed", "mock_train_copies", *DATA_KEYS):
        assert con["data"][key] == gen["data"][key], key
    if preset == "standard":  # issue 15: at least 300 test galaxies; ugriz images in their own mock folder
        assert gen["sampling"]["max_objects"] >= 300 and gen["data"]["image"] == "ugriz"
        assert gen["sampling"]["calibration_objects"] >= 300 and gen["sampling"]["split"] == "test"
        assert con["data"]["root"] != load_config(PARAMS, ["--preset", "quick"])["data"]["root"]
    if preset:  # both presets judge calibrated intervals, fitted on validation galaxies
        assert gen["sampling"]["calibration_objects"] >= gen["sampling"]["max_objects"]

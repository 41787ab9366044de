"""Configuration loading: the schema, presets, overlays, overrides and every error path."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from utils.config import ConfigError, check_value, load_config, load_presets, preset_overrides, save_config
from utils.schema import KINDS, SCHEMAS, WHY, keys


def test_defaults_carry_paper_settings():
    c = load_config("contrastive", [])
    assert c["train"]["lr"] == 1e-4
    assert c["train"]["weight_decay"] == 1e-3
    assert c["train"]["lr_decay"] == 0.997
    assert c["train"]["temperature"] == 0.05
    assert c["model"]["latent_dim"] == 128
    assert c["model"]["image_depth"] == 50
    assert c["train"]["batch_size"] == 64
    g = load_config("generative", [])
    assert g["diffusion"]["timesteps"] == 250
    assert g["diffusion"]["schedule"] == "cosine"
    assert g["train"]["ema_decay"] == 0.99
    assert g["train"]["lr_decay"] == 0.998
    assert g["train"]["batch_size"] == 4
    assert g["model"]["image_depth"] == 18
    assert g["model"]["mults"] == [1, 2, 4, 8, 16]
    assert g["sampling"]["n_samples"] == 25
    assert c["run"]["out_dir"] == "runs/contrastive"
    assert g["run"]["out_dir"] == "runs/generative"


def test_shared_sections_are_written_once():
    """data and run are the same key objects in both trainers' schemas: a change to one is a
    change to both (only the defaults a trainer sets differ)."""
    for section in ("data", "run"):
        assert SCHEMAS["contrastive"][section] is SCHEMAS["generative"][section]
    for shared in ("train.lr", "train.batch_size", "val.every", "model.image_depth", "data.image"):
        assert keys("contrastive")[shared].help == keys("generative")[shared].help


def test_every_numeric_key_has_a_range_and_every_key_a_meaning():
    """A renamed key keeps its check and its documentation, because both live in its Key."""
    for kind in KINDS:
        for path, key in keys(kind).items():
            assert key.help, path
            assert len(key.help) > 10, path
            default = key.default[0] if isinstance(key.default, list) else key.default
            if isinstance(default, (int, float)) and not isinstance(default, bool) and key.allowed() is None:
                assert key.range_text(), f"{kind} {path} has no range"
                check_value(path, key, key.default)  # the default is allowed



def test_every_key_is_named_where_its_section_says_why_it_exists():
    """The reference says for each section why its keys exist; a key added or renamed without a
    reason fails here, and so does a reason left for a key that is gone."""
    by_section: dict[str, set[str]] = {}
    for kind in KINDS:
        for path in keys(kind):
            section, name = path.split(".", 1)
            by_section.setdefault(section, set()).add(name)
    assert set(WHY) == set(by_section)
    for section, names in by_section.items():
        named = set(re.findall(r"`([a-z_]+)`", WHY[section]))
        assert names - named == set(), f"{section}: keys without a reason"
        assert named - names == set(), f"{section}: reasons for keys that do not exist"


def test_range_checks_follow_the_key(monkeypatch):
    """The range a Key carries is what load_config enforces: changing it changes the check."""
    import dataclasses

    from utils import schema

    key = schema.GENERATIVE["sampling"]["steps"]
    with pytest.raises(ConfigError, match="'sampling.steps': got 0, expected >= 1"):
        load_config("generative", ["sampling.steps=0"])
    monkeypatch.setitem(schema.GENERATIVE["sampling"], "steps", dataclasses.replace(key, low=0))
    schema.keys.cache_clear()
    try:
        assert load_config("generative", ["sampling.steps=0"])["sampling"]["steps"] == 0
    finally:
        monkeypatch.undo()
        schema.keys.cache_clear()


def test_section_and_leaf_overrides_are_typed():
    c = load_config("contrastive", ["train.lr=3e-4", "max_epochs=8", "run.precision=bf16", "latent_dim=32"])
    assert c["train"]["lr"] == pytest.approx(3e-4)
    assert isinstance(c["train"]["lr"], float)
    assert c["train"]["max_epochs"] == 8
    assert c["run"]["precision"] == "bf16"
    assert c["model"]["latent_dim"] == 32


def test_int_given_for_float_is_accepted_and_null_for_path():
    c = load_config("contrastive", ["lr=1", "resume=null", "resume=runs/x"])
    assert c["train"]["lr"] == 1.0
    assert c["run"]["resume"] == "runs/x"


@pytest.mark.parametrize("arg, words", [
    ("train.lr=abc", ["train.lr", "'abc'", "a number"]),
    ("max_epochs=2.5", ["train.max_epochs", "2.5", "an integer"]),
    ("compile=yes please", ["run.compile", "boolean"]),
    ("nonsense=3", ["unknown config key 'nonsense'"]),
    ("model.nonsense=3", ["unknown config key 'model.nonsense'"]),
    ("data.image=rgb", ["data.image", "'rgb'", "'gri'", "'ugriz'"]),
    ("model.mults=[1, x]", ["model.mults[1]", "an integer"]),
    ("data=3", ["unknown config key 'data'"]),
    ("sampling.calibration_objects=-1", ["sampling.calibration_objects", "-1", ">= 0"]),
    ("train.lr=0", ["train.lr", "> 0"]),
    ("train.ema_decay=1", ["train.ema_decay", "in [0, 1)"]),
    ("model.photometry=true", ["unknown config key 'model.photometry'"]),
])
def test_bad_overrides_name_key_value_and_expectation(arg, words):
    with pytest.raises(ConfigError) as err:
        load_config("generative", [arg])
    for word in words:
        assert word in str(err.value)


def test_calibrating_on_the_evaluated_split_is_refused():
    """The interval calibration is fitted on validation galaxies, so they cannot also judge it."""
    with pytest.raises(ConfigError, match="'sampling.calibration_objects': got 50, expected 0 when sampling.split"):
        load_config("generative", ["sampling.split=val", "sampling.calibration_objects=50"])
    assert load_config("generative", ["sampling.split=test", "sampling.calibration_objects=50"])
    catalog = load_config("generative", ["sampling.split=val", "sampling.catalog=x", "sampling.calibration_objects=5"])
    assert catalog["sampling"]["calibration_objects"] == 5  # a catalog is evaluated, not the split


def test_ambiguous_leaf_key_is_refused():
    with pytest.raises(ConfigError, match="'n_samples' is ambiguous: write one of sampling.n_samples, val.n_samples"):
        load_config("generative", ["n_samples=3"])


def test_preset_and_config_file_overlay(tmp_path):
    quick = load_config("contrastive", ["--preset", "quick"])
    assert quick["preset"] == "quick"
    assert quick["data"]["downsample"] == 16
    assert quick["model"]["image_depth"] == 18
    overlay = tmp_path / "mine.yml"
    overlay.write_text("train:\n  batch_size: 12\nval:\n  every: 7\n")
    c = load_config("contrastive", ["--preset=quick", "--config", str(overlay), "val.every=9"])
    assert c["train"]["batch_size"] == 12
    assert c["val"]["every"] == 9
    assert c["data"]["downsample"] == 16
    bad = tmp_path / "bad.yml"
    bad.write_text("train:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config("contrastive", ["--config", str(bad)])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("contrastive", ["--config", str(tmp_path / "missing.yml")])
    with pytest.raises(ConfigError, match="unknown preset 'fast'.*quick"):
        load_config("contrastive", ["--preset", "fast"])


def test_a_preset_sections_apply_to_the_scripts_that_have_them(tmp_path):
    """Shared sections reach every script whose schema has the key; a kind block only its own."""
    presets = tmp_path / "presets.yml"
    presets.write_text("p:\n  data: {downsample: 4}\n  train: {lr: 0.5}\n  contrastive:\n    train: {lr: 0.25}\n"
                       "  generative:\n    sampling: {n_samples: 3, top_k: 2}\n")
    con = load_config("contrastive", ["--preset", "p"], presets_file=presets)
    gen = load_config("generative", ["--preset", "p"], presets_file=presets)
    assert (con["data"]["downsample"], gen["data"]["downsample"]) == (4, 4)
    assert (con["train"]["lr"], gen["train"]["lr"]) == (0.25, 0.5)
    assert gen["sampling"]["n_samples"] == 3
    assert preset_overrides({"sampling": {"n_samples": 3}}, "contrastive") == {}  # not a contrastive key
    presets.write_text("p:\n  generative:\n    sampling: {n_sampels: 3}\n")
    with pytest.raises(ConfigError, match="unknown config key 'sampling.n_sampels'"):
        load_config("generative", ["--preset", "p"], presets_file=presets)


def test_resolved_config_round_trips(tmp_path):
    c = load_config("contrastive", ["--preset", "quick", "seed=5"])
    save_config(c, tmp_path / "config.yml")
    assert yaml.safe_load((tmp_path / "config.yml").read_text()) == c


def test_cli_exit_code_2_without_traceback():
    ok = subprocess.run([sys.executable, "-m", "utils.config", "contrastive", "train.lr=2e-4"], cwd=ROOT,
                        capture_output=True, text=True)
    assert ok.returncode == 0
    assert "lr: 0.0002" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "utils.config", "contrastive", "train.lr=fast"], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert "train.lr" in bad.stderr
    assert "'fast'" in bad.stderr


def test_help_shows_every_key_with_its_meaning(capsys):
    with pytest.raises(SystemExit) as done:
        load_config("generative", ["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for path, key in keys("generative").items():
        line = next(line for line in text.splitlines() if line.strip().startswith(f"{path} ="))
        assert key.help in line
    assert "presets: " in text
    assert "quick" in text
    assert "standard" in text


def test_allowed_values_come_from_the_implementing_modules(monkeypatch):
    """A sampler added to models.samplers.SAMPLERS is a valid config value (read once per process), and the
    advertised conditionings are the UNet's own."""
    from models import samplers
    from models.unet import CONDITIONINGS
    from utils.schema import module_values

    module_values.cache_clear()  # read the modules anew after the change below
    monkeypatch.setitem(samplers.SAMPLERS, "mine", samplers.SAMPLERS["ddim"])
    assert load_config("generative", ["sampling.sampler=mine"])["sampling"]["sampler"] == "mine"
    assert keys("generative")["model.conditioning"].allowed() == CONDITIONINGS
    monkeypatch.delitem(samplers.SAMPLERS, "mine")
    module_values.cache_clear()
    with pytest.raises(ConfigError, match="expected one of 'ddpm', 'ddim', 'dpmpp2m'"):
        load_config("generative", ["sampling.sampler=mine"])


@pytest.mark.parametrize("preset", [None, *load_presets()])
def test_presets_of_both_trainers_prepare_the_same_data(preset):
    """generate.py refuses models trained on differently prepared data: each preset must give the
    contrastive network and the diffusion model the same dataset, bands, preprocessing and grid."""
    argv = ["--preset", preset] if preset else []
    con, gen = load_config("contrastive", argv), load_config("generative", argv)
    assert con["data"] == gen["data"]
    if preset and gen["model"]["stage"] != "low":  # every preset generate.py runs judges calibrated intervals
        assert gen["sampling"]["calibration_objects"] >= gen["sampling"]["max_objects"]


def test_the_standard_preset_is_judged_on_300_test_galaxies_of_its_own_mock():
    gen = load_config("generative", ["--preset", "standard"])
    assert gen["sampling"]["max_objects"] >= 300
    assert gen["data"]["image"] == "ugriz"
    assert gen["sampling"]["calibration_objects"] >= 300
    assert gen["sampling"]["split"] == "test"
    assert gen["data"]["root"] != load_config("generative", ["--preset", "quick"])["data"]["root"]

"""Configuration: YAML defaults, presets, ``--config FILE`` overlays and ``key=value`` overrides.

Every value is checked against the type of its default, and keys with a closed set of values
against that set. A bad key or value raises :class:`ConfigError`, which the entry scripts turn
into a one-line message and exit code 2 (see :func:`cli`).

Precedence, lowest first: the defaults file, its ``presets.<name>`` block (``--preset NAME``),
``--config FILE`` overlays (in order), then ``key=value`` / ``section.key=value`` overrides.
"""
from __future__ import annotations

import copy
import functools
import logging
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from utils.errors import ConfigError, Interrupted, UserError

logger = logging.getLogger(__name__)

#: closed sets of values that belong to no module: where the data come from, the precision,
#: the process-group backend
DATA_SOURCES = ("mock", "folder")
PRECISIONS = ("fp32", "bf16")
BACKENDS = ("none", "gloo", "nccl")


@functools.cache
def choices() -> dict[str, tuple]:
    """Keys whose values come from a closed set, by dotted path, each set read from the module
    that implements it (imported on first use: reading a config does not need torch)."""
    from models.diffusion import PREDICTIONS, SCHEDULES
    from models.encoders import RESNET_LAYOUTS
    from models.samplers import SAMPLERS
    from models.unet import CONDITIONINGS
    from utils.dataset import IMAGE_FILES, SPLITS
    from utils.spectra import PREPROCESSINGS

    return {
        "data.source": DATA_SOURCES,
        "data.image": tuple(IMAGE_FILES),
        "data.preprocessing": PREPROCESSINGS,
        "model.image_depth": tuple(RESNET_LAYOUTS),
        "model.conditioning": CONDITIONINGS,
        "diffusion.schedule": SCHEDULES,
        "diffusion.prediction": PREDICTIONS,
        "sampling.sampler": tuple(SAMPLERS),
        "val.sampler": tuple(SAMPLERS),
        "run.precision": PRECISIONS,
        "run.backend": BACKENDS,
        "sampling.split": SPLITS,
    }


#: Numeric ranges by dotted path: (low, high, what), bounds inclusive, None for open; a list
#: value is checked item by item. Keys absent from a params file are ignored.
POSITIVE = (1, None, "at least 1")
NON_NEGATIVE = (0, None, ">= 0")
RANGES: dict[str, tuple[float | None, float | None, str]] = {
    **{key: POSITIVE for key in (
        "data.mock_objects", "data.downsample", "model.width", "model.head_dim", "model.image_width",
        "model.spectrum_width", "model.latent_dim", "model.mults", "model.attn_levels", "model.spectrum_mults",
        "diffusion.timesteps", "train.batch_size", "train.max_epochs", "val.every", "val.n_objects",
        "val.n_samples", "val.steps", "val.batch_size", "val.max_objects", "run.checkpoint_every",
        "sampling.max_objects", "sampling.n_samples", "sampling.steps", "sampling.top_k", "sampling.batch_galaxies",
        "sampling.knn", "sampling.baseline_train_max")},
    **{key: NON_NEGATIVE for key in (
        "data.mock_seed", "data.mock_train_copies", "data.num_workers", "train.max_iters", "train.max_minutes", "train.weight_decay",
        "train.line_weight", "train.min_snr_gamma",
        "run.seed", "sampling.eta", "sampling.figures", "sampling.calibration_objects")},
    "train.lr": (1e-12, None, "> 0"),
    "diffusion.shift": (1e-6, None, "> 0"),
    "train.temperature": (1e-6, None, "> 0"),
    "train.lr_decay": (1e-12, 1.0, "in (0, 1]"),
    "train.line_weight_below": (1e-12, 1.0, "in (0, 1]"),
    "train.ema_decay": (0.0, 0.999999, "in [0, 1)"),
    "model.cond_drop": (0.0, 0.999, "in [0, 1)"),
    "sampling.views": (1, 4, "in 1..4 (utils.generation.VIEWS)"),
    "val.max_fraction": (1e-6, 1.0, "in (0, 1]"),
    "val.guidance": NON_NEGATIVE,
    "sampling.guidance": NON_NEGATIVE,
}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested configuration as ``{"section.key": value}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _type_name(value: Any) -> str:
    if value is None:
        return "a string or null"
    if isinstance(value, bool):
        return "a boolean (true/false)"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _coerce(path: str, value: Any, default: Any) -> Any:
    """Return ``value`` converted to the type of ``default`` or raise :class:`ConfigError`."""

    def refuse() -> ConfigError:
        return ConfigError(f"config key '{path}': got {value!r}, expected {_type_name(default)}")

    if default is None:  # optional path-like keys
        if value is None or isinstance(value, str):
            return value
        raise refuse()
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise refuse()
    if isinstance(default, int):
        if isinstance(value, bool):
            raise refuse()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise refuse()
    if isinstance(default, float):
        if isinstance(value, bool):
            raise refuse()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads '1e-4' as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise refuse()
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise refuse()
    if isinstance(default, list):
        if not isinstance(value, list):
            raise refuse()
        if default:
            return [_coerce(f"{path}[{i}]", v, default[0]) for i, v in enumerate(value)]
        return value
    raise refuse()


def _set(tree: dict, path: str, value: Any) -> None:
    node = tree
    *parents, leaf = path.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value


def _resolve_key(key: str, flat_defaults: dict[str, Any]) -> str:
    if key in flat_defaults:
        return key
    matches = [p for p in flat_defaults if p.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"config key '{key}' is ambiguous: write one of {', '.join(sorted(matches))}")
    raise ConfigError(f"unknown config key '{key}' (see --help for the list of keys)")


def apply_overrides(config: dict, overrides: dict[str, Any], defaults: dict, source: str) -> None:
    """Apply flat ``{dotted_or_leaf_key: value}`` overrides to ``config`` in place, checked."""
    flat_defaults = flatten(defaults)
    for key, value in overrides.items():
        path = _resolve_key(key, flat_defaults)
        if isinstance(value, dict):
            raise ConfigError(f"config key '{path}' ({source}): got a mapping, expected {_type_name(flat_defaults[path])}")
        coerced = _coerce(path, value, flat_defaults[path])
        check_choice(path, coerced)
        _set(config, path, coerced)


def check_choice(path: str, value: Any) -> None:
    allowed = choices().get(path)
    if allowed is not None and value not in allowed:
        raise ConfigError(f"config key '{path}': got {value!r}, expected one of {', '.join(map(repr, allowed))}")


def check_range(path: str, value: Any) -> None:
    """Raise :class:`ConfigError` when a numeric value (or any item of a list) is NaN, infinite or
    outside :data:`RANGES`."""
    if path not in RANGES or value is None:
        return
    low, high, what = RANGES[path]
    for item in (value if isinstance(value, list) else [value]):
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue
        if not math.isfinite(item) or (low is not None and item < low) or (high is not None and item > high):
            raise ConfigError(f"config key '{path}': got {value!r}, expected {what}")


def check_consistency(config: dict) -> None:
    """Checks that involve several keys."""
    s = config.get("sampling", {})
    if "top_k" in s and "n_samples" in s and s["top_k"] > s["n_samples"]:
        raise ConfigError(f"config key 'sampling.top_k': got {s['top_k']}, expected at most sampling.n_samples "
                          f"({s['n_samples']})")
    if s.get("calibration_objects") and s.get("split") == "val" and not s.get("catalog"):
        raise ConfigError(f"config key 'sampling.calibration_objects': got {s['calibration_objects']}, expected 0 "
                          f"when sampling.split is 'val' (the calibration is fitted on validation galaxies, so they "
                          f"cannot also judge it)")
    if s.get("antithetic") and (s.get("sampler") == "ddpm" or (s.get("sampler") == "ddim" and s.get("eta"))):
        raise ConfigError(f"config key 'sampling.antithetic': got true, expected false with a stochastic sampler "
                          f"(sampling.sampler {s.get('sampler')!r}, sampling.eta {s.get('eta')}): mirrored starting "
                          f"noises pay only where a sample is a function of its starting noise (ddim with eta 0, "
                          f"dpmpp2m)")
    m = config.get("model", {})
    if m.get("photometry") and config.get("data", {}).get("image") != "ugriz":
        raise ConfigError(f"config key 'model.photometry': got true, expected false unless data.image is 'ugriz' "
                          f"(the photometry is measured on calibrated ugriz images; data.image is "
                          f"{config.get('data', {}).get('image')!r})")
    if "mults" not in m:
        return
    levels = len(m["mults"]) - 1  # the last multiplier is the bottleneck's (models.unet)
    if levels < 1:
        raise ConfigError(f"config key 'model.mults': got {m['mults']}, expected at least 2 entries")
    if any(a > levels for a in m.get("attn_levels", [])):
        raise ConfigError(f"config key 'model.attn_levels': got {m['attn_levels']}, expected levels in 1..{levels} "
                          f"(model.mults {m['mults']} has {levels} levels; its last entry is the bottleneck's)")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        with open(path) as handle:
            data = yaml.safe_load(handle)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {err}".splitlines()[0]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}': expected a mapping of sections at the top level")
    return data


def load_defaults(path: str | Path) -> tuple[dict, dict]:
    """Read a params file and return ``(defaults, presets)``."""
    data = _read_yaml(Path(path))
    presets = data.pop("presets", {}) or {}
    return data, presets


def load_config(defaults_path: str | Path, argv: Sequence[str] | None = None) -> dict:
    """Build the resolved configuration from a params file and command-line arguments.

    Parameters
    ----------
    defaults_path : path of the params YAML (``params_contrastive.yml`` or ``params_generative.yml``).
    argv : command-line arguments: ``--preset NAME``, ``--config FILE``, ``key=value`` and
        ``section.key=value``; ``-h``/``--help`` prints every key with its default and exits.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults, presets = load_defaults(defaults_path)
    config = copy.deepcopy(defaults)
    preset, files, pairs = None, [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(describe(defaults, presets, defaults_path))
            raise SystemExit(0)
        if arg in ("--preset", "--config"):
            if i + 1 >= len(argv):
                raise ConfigError(f"{arg} needs a value")
            if arg == "--config":
                files.append(argv[i + 1])
            else:
                preset = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--preset="):
            preset = arg.split("=", 1)[1]
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
        elif "=" in arg and not arg.startswith("-"):
            key, raw = arg.split("=", 1)
            pairs.append((key.strip(), raw))
        else:
            raise ConfigError(f"unrecognised argument '{arg}': expected key=value, --preset NAME or --config FILE")
        i += 1

    if preset is not None:
        if preset not in presets:
            raise ConfigError(f"unknown preset '{preset}': expected one of {', '.join(sorted(presets)) or '(none defined)'}")
        apply_overrides(config, flatten(presets[preset]), defaults, f"preset {preset}")
    for name in files:
        apply_overrides(config, flatten(_read_yaml(Path(name))), defaults, f"file {name}")
    for key, raw in pairs:
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        apply_overrides(config, {key: value}, defaults, "command line")
    for path, value in flatten(config).items():
        check_choice(path, value)
        check_range(path, value)
    check_consistency(config)
    config["preset"] = preset
    return config


def describe(defaults: dict, presets: dict, path: str | Path) -> str:
    """Human-readable list of keys, defaults and presets (for ``--help``)."""
    lines = [f"usage: python {Path(sys.argv[0]).name} [--preset NAME] [--config FILE] [section.key=value ...]",
             f"defaults from {path}:"]
    for key, value in flatten(defaults).items():
        allowed = choices().get(key)
        extra = f"   (one of {', '.join(map(str, allowed))})" if allowed else ""
        lines.append(f"  {key} = {value!r}{extra}")
    lines.append(f"presets: {', '.join(sorted(presets)) or '(none)'}")
    return "\n".join(lines)


def save_config(config: dict, path: str | Path) -> None:
    """Write the resolved configuration as YAML."""
    with open(path, "w") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)


def cli(main: Callable[[Sequence[str]], Any]) -> None:
    """Run ``main(argv)``; report a :class:`UserError` as one line and exit with its code."""
    logging.basicConfig(force=True,level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        main(sys.argv[1:])
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which says more: utils.training.run_training)
        print("\nerror: interrupted", file=sys.stderr)
        raise SystemExit(Interrupted.exit_code) from None


def _print_resolved(argv: Sequence[str]) -> None:
    """``python -m utils.config PARAMS.yml [args]``: print the resolved configuration."""
    if not argv:
        raise ConfigError("usage: python -m utils.config PARAMS.yml [--preset NAME] [--config FILE] [key=value ...]")
    print(yaml.safe_dump(load_config(argv[0], argv[1:]), sort_keys=False), end="")


if __name__ == "__main__":
    cli(_print_resolved)

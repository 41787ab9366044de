"""Configuration: the schema's defaults (utils.schema), presets, ``--config FILE`` overlays and
``key=value`` overrides, every value checked.

Every value is checked against the type of its default, keys with a closed set of values against
that set, and numbers against their range. A bad key or value raises :class:`ConfigError`, which
the entry scripts turn into a one-line message and exit code 2 (:func:`utils.errors.cli`).

Precedence, lowest first: the schema's defaults, the preset (``--preset NAME`` from
``presets.yml``), ``--config FILE`` overlays (in order), then ``key=value`` /
``section.key=value`` overrides.

    python -m utils.config generative --preset quick     # print a resolved configuration
    python -m utils.config --reference > docs/configuration.md
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from utils.errors import ConfigError, cli
from utils.schema import KINDS, WHY, Key, check_kind, defaults, keys

ROOT = Path(__file__).resolve().parents[1]
#: the presets of all three scripts (--preset NAME)
PRESETS_FILE = ROOT / "presets.yml"


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
        return "a path (string) or null"
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


def check_value(path: str, key: Key, value: Any) -> None:
    """Raise :class:`ConfigError` when ``value`` is not one of the key's allowed values, or a
    number (or an item of a list) outside its range."""
    allowed = key.allowed()
    if allowed is not None and value not in allowed:
        raise ConfigError(f"config key '{path}': got {value!r}, expected one of {', '.join(map(repr, allowed))}")
    if value is None or not key.range_text():
        return
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, (int, float)) and not isinstance(item, bool) and not key.in_range(item):
            raise ConfigError(f"config key '{path}': got {value!r}, expected {key.range_text()}")


def _set(tree: dict, path: str, value: Any) -> None:
    section, name = path.split(".")
    tree[section][name] = value


def resolve_key(key: str, schema: dict[str, Key]) -> str:
    """The dotted path of ``key``: itself, or the one path whose last part it is."""
    if key in schema:
        return key
    matches = [p for p in schema if p.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"config key '{key}' is ambiguous: write one of {', '.join(sorted(matches))}")
    raise ConfigError(f"unknown config key '{key}' (see --help for the list of keys)")


def apply_overrides(config: dict, overrides: dict[str, Any], kind: str, source: str) -> None:
    """Apply flat ``{dotted_or_leaf_key: value}`` overrides to ``config`` in place, checked."""
    schema = keys(kind)
    for key, value in overrides.items():
        path = resolve_key(key, schema)
        default = schema[path].default
        if isinstance(value, dict):
            raise ConfigError(f"config key '{path}' ({source}): got a mapping, expected {_type_name(default)}")
        coerced = _coerce(path, value, default)
        check_value(path, schema[path], coerced)
        _set(config, path, coerced)


def check_consistency(config: dict) -> None:
    """Checks that involve several keys."""
    s = config.get("sampling", {})
    if "top_k" in s and s["top_k"] > s["n_samples"]:
        raise ConfigError(f"config key 'sampling.top_k': got {s['top_k']}, expected at most sampling.n_samples "
                          f"({s['n_samples']})")
    if "low_keep" in s and s["low_keep"] > s["low_samples"]:
        raise ConfigError(f"config key 'sampling.low_keep': got {s['low_keep']}, expected at most "
                          f"sampling.low_samples ({s['low_samples']})")
    if s.get("calibration_objects") and s.get("split") == "val" and not s.get("catalog"):
        raise ConfigError(f"config key 'sampling.calibration_objects': got {s['calibration_objects']}, expected 0 "
                          f"when sampling.split is 'val' (the calibration is fitted on validation galaxies, so they "
                          f"cannot also judge it)")
    m = config["model"]
    if "mults" not in m:
        return
    levels = len(m["mults"]) - 1  # the last multiplier is the bottleneck's (models.unet)
    if levels < 1:
        raise ConfigError(f"config key 'model.mults': got {m['mults']}, expected at least 2 entries")
    if any(a > levels for a in m["attn_levels"]):
        raise ConfigError(f"config key 'model.attn_levels': got {m['attn_levels']}, expected levels in 1..{levels} "
                          f"(model.mults {m['mults']} has {levels} levels; its last entry is the bottleneck's)")


def _read_yaml(path: Path, what: str = "config file") -> dict:
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' does not exist")
    try:
        with open(path) as handle:
            data = yaml.safe_load(handle)
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} '{path}' is not valid YAML: {err}".splitlines()[0]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} '{path}': expected a mapping of sections at the top level")
    return data


def load_presets(path: Path = PRESETS_FILE) -> dict[str, dict]:
    """``{name: preset}`` from the presets file. A preset holds sections that apply to every
    script that has them and, under ``contrastive:`` / ``generative:``, sections for one kind."""
    return _read_yaml(path, "presets file")


def preset_overrides(preset: dict, kind: str) -> dict[str, Any]:
    """The flat overrides a preset makes for ``kind``: its shared sections (the keys ``kind``'s
    schema has), then its ``kind`` block."""
    schema = keys(kind)
    shared = {k: v for k, v in preset.items() if k not in KINDS}
    flat = {path: value for path, value in flatten(shared).items() if path in schema}
    return flat | flatten(preset.get(kind) or {})


def load_config(kind: str, argv: Sequence[str] | None = None, presets_file: Path = PRESETS_FILE) -> dict:
    """Build the resolved configuration of ``kind`` ('contrastive' or 'generative', which
    generate.py reads) from the command-line arguments ``argv``: ``--preset NAME``,
    ``--config FILE``, ``key=value`` and ``section.key=value``; ``-h``/``--help`` prints every key
    with its default and meaning, then exits."""
    check_kind(kind)
    argv = list(sys.argv[1:] if argv is None else argv)
    config = copy.deepcopy(defaults(kind))
    preset, files, pairs = None, [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(describe(kind, presets_file))
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
        presets = load_presets(presets_file)
        if preset not in presets:
            raise ConfigError(f"unknown preset '{preset}': expected one of {', '.join(sorted(presets)) or '(none)'}")
        apply_overrides(config, preset_overrides(presets[preset] or {}, kind), kind, f"preset {preset}")
    for name in files:
        apply_overrides(config, flatten(_read_yaml(Path(name))), kind, f"file {name}")
    for key, raw in pairs:
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        apply_overrides(config, {key: value}, kind, "command line")
    check_consistency(config)
    config["preset"] = preset
    return config


def _shown(value: Any) -> str:
    return ("null" if value is None
            else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip())


def describe(kind: str, presets_file: Path = PRESETS_FILE) -> str:
    """Every key with its default and meaning (``--help``)."""
    lines = [f"usage: python {Path(sys.argv[0]).name} [--preset NAME] [--config FILE] [section.key=value ...]",
             f"keys of the {kind} configuration (default; meaning; allowed values). Reference: docs/configuration.md"]
    for path, key in keys(kind).items():
        allowed = key.allowed()
        if allowed:
            extra = f" (one of {', '.join(map(str, allowed))})"
        else:
            extra = f" ({key.range_text()})" if key.range_text() else ""
        lines.append(f"  {path} = {_shown(key.default)}   {key.help}{extra}")
    try:
        names = ", ".join(sorted(load_presets(presets_file)))
    except ConfigError:
        names = "(presets file unreadable)"
    lines.append(f"presets: {names}")
    return "\n".join(lines)


def reference() -> str:
    """The configuration reference in Markdown: every key of both schemas, its meaning, its
    defaults and its allowed values (docs/configuration.md is this text)."""
    by_path: dict[str, dict[str, Key]] = {}
    for kind in KINDS:
        for path, key in keys(kind).items():
            by_path.setdefault(path, {})[kind] = key
    sections = list(dict.fromkeys(path.split(".")[0] for path in by_path))  # first appearance
    by_path = dict(sorted(by_path.items(), key=lambda item: sections.index(item[0].split(".")[0])))
    out = ["# Configuration reference", "",
           "Every key of the three scripts: what it means, its default in each trainer's configuration (generate.py "
           "reads the generative one) and its allowed values. `--help` of each script prints the same. This page is "
           "written by `python -m utils.config --reference > docs/configuration.md` from `utils/schema.py`; "
           "`tests/test_docs.py` fails when it is stale.", "",
           "Precedence, lowest first: these defaults, the preset (`--preset NAME`, from `presets.yml`), `--config "
           "FILE` overlays, then `key=value` overrides (a key may be written in full or by its last part where that "
           "is unique). A bad key or value stops the script with one line naming it (exit code 2).", ""]
    section = None
    for path, by_kind in by_path.items():
        name = path.split(".")[0]
        if name != section:
            section = name
            out += ["", f"## `{section}`", "", WHY[section], "", "| key | meaning | default | allowed |",
                    "|---|---|---|---|"]
        first = next(iter(by_kind.values()))
        shown = {kind: _shown(key.default) for kind, key in by_kind.items()}
        if len(by_kind) > 1 and len(set(shown.values())) > 1:
            default = "; ".join(f"{kind}: `{value}`" for kind, value in shown.items())
        else:
            default = f"`{next(iter(shown.values()))}`" + ("" if len(by_kind) > 1 else f" ({next(iter(by_kind))})")
        allowed = first.allowed()
        allowed_text = ", ".join(f"`{v}`" for v in allowed) if allowed else (first.range_text() or "")
        if first.default is None:
            allowed_text = allowed_text or "a path, or null"
        out.append(f"| `{path}` | {first.help} | {default} | {allowed_text} |")
    return "\n".join(out).replace("\n\n\n", "\n\n") + "\n"


def save_config(config: dict, path: str | Path) -> None:
    """Write the resolved configuration as YAML."""
    with open(path, "w") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)


def _main(argv: Sequence[str]) -> None:
    """``python -m utils.config KIND [args]``: print a resolved configuration;
    ``python -m utils.config --reference``: print the configuration reference."""
    if list(argv[:1]) == ["--reference"]:
        print(reference(), end="")
        return
    if not argv or argv[0] not in KINDS:
        raise ConfigError(f"usage: python -m utils.config {{{','.join(KINDS)}}} [--preset NAME] [--config FILE] "
                          f"[key=value ...] | --reference")
    print(yaml.safe_dump(load_config(argv[0], argv[1:]), sort_keys=False), end="")


if __name__ == "__main__":
    cli(_main)

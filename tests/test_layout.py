"""The code's layering: entry scripts are run, never imported; each layer imports only the layers
below it (utils.astro: pure physics, nothing of ours; utils.data: no evaluation and no run wiring;
utils.eval: no run wiring; models: no utils); no cycles; bench/ and tests/ import the project as an
installed package, with no path edits, and tests import no bench script."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

ENTRY_SCRIPTS = {"train_contrastive", "train_generative", "generate"}
#: the run wiring at the top of utils/: it may import every layer, and no layer below may import it
WIRING = {"utils.config", "utils.schema", "utils.runtime", "utils.builders", "utils.training", "utils.checkpoints",
          "utils.generation", "utils.trained", "utils.split_run", "utils.catalog_run", "utils.generate_run",
          "utils.sdss", "utils.prepare", "utils.mock"}
#: what modules of each layer may import of ours, besides their own layer (utils.errors and
#: utils.plotting depend on nothing of ours and serve every layer)
FOUNDATION = {"utils.errors", "utils.plotting"}
ALLOWED = {
    "models": set(),
    "utils.astro": set(),
    "utils.data": {"utils.astro", *FOUNDATION},
    "utils.eval": {"utils.astro", "utils.data", *FOUNDATION},
}


def modules() -> dict[str, Path]:
    """Every module of models/ and utils/ by dotted name."""
    out = {}
    for path in sorted((ROOT / "models").rglob("*.py")) + sorted((ROOT / "utils").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(path: Path) -> set[str]:
    """The modules of ours that ``path`` imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}  # from utils.data import mock
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return {n for n in names if n.split(".")[0] in ("utils", "models")}


def layer(name: str) -> str | None:
    """The layer of a module: 'models', 'utils.astro', 'utils.data', 'utils.eval', or None for the
    wiring and the foundation."""
    for prefix in ALLOWED:
        if name == prefix or name.startswith(prefix + "."):
            return prefix
    return None


def known(names: set[str], everything: dict[str, Path]) -> set[str]:
    return {n for n in names if n in everything}


def forbidden(own: str, deps: set[str]) -> list[str]:
    """The modules of ``deps`` that a module of layer ``own`` may not import."""
    allowed = ALLOWED[own]
    return sorted(d for d in deps if layer(d) != own and layer(d) not in allowed and d not in allowed)


def test_no_module_imports_an_entry_script():
    files = [p for folder in ("models", "utils", "bench", "tests") for p in sorted((ROOT / folder).rglob("*.py"))]
    files += [ROOT / f"{name}.py" for name in sorted(ENTRY_SCRIPTS)]
    offenders = {}
    for path in files:
        roots = {node.module.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.ImportFrom) and node.module}
        roots |= {alias.name.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                  if isinstance(node, ast.Import) for alias in node.names}
        if roots & ENTRY_SCRIPTS:
            offenders[str(path.relative_to(ROOT))] = sorted(roots & ENTRY_SCRIPTS)
    assert len(files) > 30
    assert offenders == {}


def test_every_utils_module_belongs_to_a_layer():
    everything = modules()
    homeless = [name for name in everything if name.startswith("utils.") and layer(name) is None
                and name not in WIRING | FOUNDATION]
    assert homeless == []


def test_each_layer_imports_only_the_layers_below_it():
    everything = modules()
    offenders = {}
    for name, path in everything.items():
        own = layer(name)
        if own is None:
            continue
        bad = forbidden(own, known(imports_of(path), everything))
        if bad:
            offenders[name] = bad
    assert offenders == {}


def test_the_layer_check_can_fail(tmp_path, monkeypatch):
    """A data module that imported the evaluation layer would be caught."""
    fake = tmp_path / "offender.py"
    fake.write_text("from utils.eval.metrics import nmad\nfrom utils.astro.spectra import preprocess\n")
    assert forbidden("utils.data", known(imports_of(fake), modules())) == ["utils.eval.metrics"]


def test_no_import_cycles_and_the_foundation_depends_on_nothing_of_ours():
    everything = modules()
    graph = {name: known(imports_of(path), everything) - {name} for name, path in everything.items()}

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for dep in graph.get(todo.pop(), ()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    assert len(graph) > 30
    cyclic = [m for m in graph if m in reachable(m) and not m.endswith(("utils", "models")) and "." in m]
    assert cyclic == []
    for name in FOUNDATION:
        assert graph[name] == set(), name


def edits_sys_path(source: str) -> bool:
    """Whether Python ``source`` calls a method of ``sys.path`` (insert, append, extend)."""
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "path"
                and isinstance(node.func.value.value, ast.Name) and node.func.value.value.id == "sys"):
            return True
    return False


@pytest.mark.parametrize("folder", ["bench", "tests"])
def test_bench_and_tests_import_the_installed_project(folder):
    """No sys.path edits: the project is installed (pyproject.toml, the README's set-up command)."""
    edits = [str(p.relative_to(ROOT)) for p in sorted((ROOT / folder).rglob("*.py")) if edits_sys_path(p.read_text())]
    edits += [str(p.relative_to(ROOT)) for p in sorted((ROOT / folder).rglob("*.sh")) if "sys.path" in p.read_text()]
    assert edits == []
    assert edits_sys_path("import sys\nsys.path.insert(0, '.')\n")  # the check itself can fail


def test_tests_import_no_bench_script():
    offenders = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").glob("*.py"))
                 if any(n == "bench" or n.startswith("bench.") for n in imports_of_any(p))]
    assert offenders == []


def imports_of_any(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return names

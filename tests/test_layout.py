"""The code's layering: entry scripts are run, never imported."""
from __future__ import annotations

import ast

from conftest import ROOT

ENTRY_SCRIPTS = {"train_contrastive", "train_generative", "generate"}


def imported_modules(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_module_imports_an_entry_script():
    files = [p for folder in ("models", "utils", "bench", "tests") for p in sorted((ROOT / folder).glob("*.py"))]
    files += [ROOT / f"{name}.py" for name in sorted(ENTRY_SCRIPTS)]
    offenders = {str(p.relative_to(ROOT)): sorted(imported_modules(p) & ENTRY_SCRIPTS) for p in files}
    assert len(files) > 20 and {k: v for k, v in offenders.items() if v} == {}


def test_no_import_cycles_and_plotting_depends_on_nothing_of_ours():
    """Every import between modules of models/ and utils/ (function-local ones too) runs in one
    direction: download -> prepare -> dataset -> models -> training -> generation."""
    graph = {}
    for path in sorted((ROOT / "utils").glob("*.py")) + sorted((ROOT / "models").glob("*.py")):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("utils", "models"):
                deps.add(node.module)
        graph[f"{path.parent.name}.{path.stem}"] = deps

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for dep in graph.get(todo.pop(), ()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    assert len(graph) > 15
    assert [m for m in graph if m in reachable(m)] == []
    assert graph["utils.plotting"] == set()

"""The manual matches the code: the configuration reference is the schema's, every relative link
and anchor in README.md and docs/ resolves, the README stays a front page, and no page, module or
script narrates history (issue numbers)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\*|_(?=\W)|(?<=\W)_", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings (outside code blocks), with GitHub's -1, -2 for repeats."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if fenced or not re.match(r"#{1,6} ", line):
            continue
        base = slug(line.lstrip("#"))
        count = seen.get(base, 0)
        out.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return out


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    text = re.sub(r"`[^`\n]*`", "", text)
    return [a or b for a, b in LINK.findall(text)]


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    return broken


def test_the_configuration_reference_is_the_schemas():
    """docs/configuration.md is what `python -m utils.config --reference` writes: regenerate it
    with that command when a key changes."""
    from utils.config import reference

    page = ROOT / "docs" / "configuration.md"
    assert page.is_file(), "write it: python -m utils.config --reference > docs/configuration.md"
    assert page.read_text() == reference(), "stale: python -m utils.config --reference > docs/configuration.md"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_and_anchor_resolves(page):
    assert broken_links(page) == []


def test_the_link_checker_finds_a_broken_link_and_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## Two words, here\n\nsee [b](b.md), [x](#two-words-here), "
                                   "[y](#missing), [c](a.md#title), `[not](a-link.md)`\n")
    assert slug("Two words, here") == "two-words-here"
    assert slug("`model.stage` and **bold**") == "modelstage-and-bold"
    assert broken_links(tmp_path / "a.md") == [f"b.md (no {tmp_path / 'b.md'})",
                                               "#missing (no heading #missing in a.md)"]


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; the manual lives in docs/"


def test_no_page_or_module_narrates_history():
    """Issue numbers belong to the tracker, not to pages, code, comments or output."""
    pattern = re.compile(r"\bissues? ?#?\d+", re.I)
    code = [p for folder in ("models", "utils", "bench", "tests", ".ci") for p in (ROOT / folder).rglob("*")
            if p.suffix in {".py", ".yml", ".sh", ""} and p.is_file() and "__pycache__" not in p.parts]
    files = PAGES + code + list(ROOT.glob("*.py")) + list(ROOT.glob("*.yml")) + list(ROOT.glob("*.toml"))
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in files
                 for i, line in enumerate(p.read_text(errors="ignore").splitlines(), 1) if pattern.search(line)]
    assert offenders == []

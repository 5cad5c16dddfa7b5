"""The documentation points at files that exist."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _prose(path: Path) -> str:
    """The page without its fenced code blocks (their brackets are code, not links)."""
    return re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files(page: Path) -> None:
    """Markdown links (inline and reference-style) relative to the page, and `.md` files quoted
    as paths (relative to the page or to the repository root)."""
    text = _prose(page)
    links = re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    links += re.findall(r"^\s*\[[^\]]+\]:\s*(\S+)", text, flags=re.M)
    broken = [t for t in links if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)
              and not (page.parent / t.split("#")[0]).exists()]
    broken += [t for t in re.findall(r"`([\w./-]+\.md)`", text)
               if not ((page.parent / t).exists() or (ROOT / t).exists())]
    assert not broken, f"{page.relative_to(ROOT)} points to missing files: {broken}"


def test_docs_cited_by_the_code_exist() -> None:
    missing = [f"{path.relative_to(ROOT)}: {name}"
               for path in [*sorted((ROOT / "diffcoder").rglob("*.py")), *sorted((ROOT / "tests").glob("*.py"))]
               if path != Path(__file__).resolve()
               for name in re.findall(r"\bdocs/[\w./-]+\.md\b", path.read_text(encoding="utf-8"))
               if not (ROOT / name).exists()]
    assert not missing, "cited files that do not exist: " + "; ".join(missing)


def test_readme_tree_matches_the_package() -> None:
    """The README's annotated tree names every top-level module and folder of the package and every
    engine module, and every file or folder it names exists."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    tree = re.search(r"^## Files\n\n```\n(.*?)^```", readme, flags=re.S | re.M).group(1)
    files = set(re.findall(r"\b([\w-]+\.(?:py|cpp|sh))\b", tree))
    folders = set(re.findall(r"(?:^|\s)([\w-]+)/(?=[\s,]|$)", tree, flags=re.M))
    package = ROOT / "diffcoder"
    expected = {p.name for p in [*package.glob("*.py"), *(package / "engine").glob("*.py")]
                if p.stem not in ("__init__", "__main__")}
    unnamed = sorted(expected - files)
    unnamed += sorted(p.name for p in package.iterdir() if p.is_dir() and not p.name.startswith("__")
                      and p.name not in folders)
    everything = set()
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in (".venv", ".git", ".cache", "__pycache__")]
        everything.update(dirs, names)
    absent = sorted(n for n in files | folders if n not in everything)
    assert not unnamed and not absent, f"README tree: not named {unnamed}; named but absent {absent}"

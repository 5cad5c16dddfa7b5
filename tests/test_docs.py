"""The documentation points at files that exist."""
from __future__ import annotations

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

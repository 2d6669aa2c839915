"""The READMEs as a set of pages: a front page within its size, one link away from each folder README, every
relative link (and its #anchor) pointing at something that exists, and no table shown on two pages.

Pure file reads, well under a second."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FRONT = ROOT / "README.md"
FOLDER_READMES = [ROOT / folder / "README.md" for folder in ("configs", "benchmarks", "fmaml", "tests")]
READMES = [FRONT, *FOLDER_READMES]
FRONT_PAGE_LIMIT = 12_000  # bytes: issue 23's target for the front page

# A markdown link or image: [text](target) or ![alt](target); the target ends at the first space or ")".
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _name(readme: Path) -> str:
    return str(readme.relative_to(ROOT))


def _prose(text: str) -> str:
    """The text outside fenced code blocks, where a `# comment` is no heading and `[x](y)` no link."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    headings = re.findall(r"^#{1,6} (.+)$", _prose(page.read_text()), flags=re.M)
    anchors: set[str] = set()
    for heading in headings:  # a repeated heading gets -1, -2, ... as on GitHub
        anchor, n = _anchor(heading), 1
        while anchor in anchors:
            anchor, n = f"{_anchor(heading)}-{n}", n + 1
        anchors.add(anchor)
    return anchors


def _relative_links(readme: Path) -> list[str]:
    return [t for t in LINK.findall(_prose(readme.read_text())) if not re.match(r"[a-z]+:", t)]


def test_the_front_page_stays_within_its_size():
    size = len(FRONT.read_bytes())
    assert size <= FRONT_PAGE_LIMIT, f"README.md is {size:,} bytes, over {FRONT_PAGE_LIMIT:,}: move depth out"


def test_the_front_page_links_each_folder_readme():
    targets = {(FRONT.parent / t.split("#")[0]).resolve() for t in _relative_links(FRONT)}
    missing = [_name(r) for r in FOLDER_READMES if r.resolve() not in targets]
    assert not missing, f"README.md does not link {missing}"


@pytest.mark.parametrize("readme", READMES, ids=_name)
def test_every_relative_link_resolves(readme):
    """Each relative link's file exists, and where it names an #anchor, a heading of that file makes it."""
    broken = []
    for target in _relative_links(readme):
        path, _, anchor = target.partition("#")
        page = (readme.parent / path).resolve() if path else readme
        if not page.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and (page.suffix != ".md" or anchor not in _anchors(page)):
            broken.append(f"{target} (no heading makes #{anchor})")
    assert not broken, f"{_name(readme)}: broken links {broken}"


def _table_rows(readme: Path) -> set[str]:
    """Every table row but the separators, whitespace normalised."""
    lines = (" ".join(line.split()) for line in _prose(readme.read_text()).splitlines())
    return {line for line in lines if line.startswith("|") and not re.fullmatch(r"[|\-: ]+", line)}


def test_no_table_row_is_shown_on_two_pages():
    rows = {readme: _table_rows(readme) for readme in READMES}
    shared = [
        (_name(a), _name(b), row)
        for i, a in enumerate(READMES)
        for b in READMES[i + 1 :]
        for row in sorted(rows[a] & rows[b])
    ]
    assert not shared, f"a table row on two pages (keep each table in one place): {shared}"

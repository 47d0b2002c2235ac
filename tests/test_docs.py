"""The README is a landing page whose links all resolve, and nothing cites files a user of the package does not
have (the developers' notes outside the repository)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Exemptions while a change is in flight (a doc linked before it lands, a file whose citations are being replaced):
# empty now that every guide and citation has landed.
PENDING_DOCS: set[str] = set()
PENDING_CITATIONS: set[str] = set()
SOURCES = ("fdistill", "tests", "docs", "configs", "benchmarks", "train", "eval")


def _links(md: Path) -> list[str]:
    return [t for t in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", md.read_text()) if "://" not in t]


def test_readme_is_a_landing_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 300
    for heading in ("## Commands", "## Layout", "## Adding a task"):
        assert heading in text


def test_every_linked_doc_exists():
    missing = []
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in _links(md):
            path = (md.parent / target).resolve()
            rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
            if not path.exists() and rel not in PENDING_DOCS:
                missing.append(f"{md.relative_to(ROOT)} -> {target}")
    assert missing == []


def test_no_citation_of_files_outside_the_repository():
    cited = []
    files = [ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml"]
    files += [p for d in SOURCES for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".md", ".yaml", ".sh")]
    for p in files:
        rel = p.relative_to(ROOT).as_posix()
        if rel in PENDING_CITATIONS or p == Path(__file__):
            continue
        for name in ("REFERENCE" + ".md", "DESIGN" + ".md"):
            if name in p.read_text(errors="ignore"):
                cited.append(f"{rel}: {name}")
    assert cited == []

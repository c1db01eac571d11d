"""The README is a front door, and what the documentation and the code cite exists in a fresh clone."""
import re

from tests.conftest import REPO

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")          # markdown link targets, without the #fragment
CITED_MD = re.compile(r"[A-Za-z0-9_./-]*[A-Za-z0-9_-]\.md\b")


def _pages():
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_readme_is_short_and_links_every_docs_page():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    pages = sorted((REPO / "docs").glob("*.md"))
    assert pages
    for page in pages:
        assert f"(docs/{page.name})" in text, page.name


def test_relative_links_resolve():
    for page in _pages():
        for target in LINK.findall(page.read_text()):
            if "://" not in target and not target.startswith("mailto:"):
                assert (page.parent / target).exists(), f"{page.relative_to(REPO)}: broken link {target}"


def test_code_cites_only_files_a_clone_has():
    """Comments once cited PROTOCOL.md and ../shared/reference/layers.tsv, which are not in the repository."""
    sources = [*REPO.glob("voiceprint/**/*.py"), *REPO.glob("stages/*.py"), *REPO.glob("bench/*.py"),
               REPO / "dvc.yaml", *REPO.glob("params*.yaml")]
    for path in sources:
        text = path.read_text()
        assert "shared/reference" not in text, path
        for cited in CITED_MD.findall(text):
            assert (REPO / cited).exists() or (path.parent / cited).exists(), f"{path.relative_to(REPO)}: {cited}"

"""What the code cites exists in a fresh clone."""
import re

from tests.conftest import REPO

CITED_MD = re.compile(r"[A-Za-z0-9_./-]*[A-Za-z0-9_-]\.md\b")


def test_code_cites_only_files_a_clone_has():
    """Comments once cited PROTOCOL.md and ../shared/reference/layers.tsv, which are not in the repository."""
    sources = [*REPO.glob("voiceprint/**/*.py"), *REPO.glob("stages/*.py"), *REPO.glob("bench/*.py"),
               REPO / "dvc.yaml", *REPO.glob("params*.yaml")]
    for path in sources:
        text = path.read_text()
        assert "shared/reference" not in text, path
        for cited in CITED_MD.findall(text):
            assert (REPO / cited).exists() or (path.parent / cited).exists(), f"{path.relative_to(REPO)}: {cited}"

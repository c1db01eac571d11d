import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VOICEPRINT_SHARED", REPO.parent / "shared"))


@pytest.fixture
def shared_dir() -> Path:
    """../shared (read-only material); tests that need it skip cleanly where it is absent."""
    if not (SHARED / "reference").is_dir():
        pytest.skip(f"{SHARED} not present (shared reference material)")
    return SHARED

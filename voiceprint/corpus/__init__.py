"""Corpus sources by name (``data.source``). Each writes audio under a directory and returns the manifest:
one row per utterance with columns path (relative to that directory), speaker, utterance, duration, sample_rate.
"""
from __future__ import annotations

MANIFEST_COLUMNS = ["path", "speaker", "utterance", "duration", "sample_rate"]
SOURCES = ("synthetic", "librispeech", "folder")
PLANNED = {"folder": "a folder or CSV manifest of recordings (data.folder)"}


def check_source(source: str) -> None:
    """Fail clearly for sources whose parameter names are reserved but which this version does not build yet."""
    if source in PLANNED:
        raise NotImplementedError(
            f"data.source={source!r} ({PLANNED[source]}) is not available in this version; "
            f"use one of: {', '.join(s for s in SOURCES if s not in PLANNED)}")

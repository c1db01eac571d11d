"""Corpus sources by name (``data.source``). Each returns the manifest: one row per utterance with columns path
(relative to the stage's raw directory, or absolute for recordings left where they are), speaker, utterance,
duration, sample_rate (plus source-specific columns such as a content hash).
"""
from __future__ import annotations

MANIFEST_COLUMNS = ["path", "speaker", "utterance", "duration", "sample_rate"]
SOURCES = ("synthetic", "librispeech", "folder")


# A run may add a second source to the one it is named after (``data.add_synthetic_speakers``). The added source's
# speakers and utterances are namespaced "<source>:<id>", so ids never collide, and they are training-only:
# evaluation speakers always come from ``data.source`` itself.
ADDED_SEPARATOR = ":"


def from_added_source(speaker: str) -> bool:
    """Is ``speaker`` namespaced as coming from an added (training-only) source?"""
    prefix, sep, _ = str(speaker).partition(ADDED_SEPARATOR)
    return bool(sep) and prefix in SOURCES

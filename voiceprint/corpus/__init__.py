"""Corpus sources by name (``data.source``). Each returns the manifest: one row per utterance with columns path
(relative to the stage's raw directory, or absolute for recordings left where they are), speaker, utterance,
duration, sample_rate (plus source-specific columns such as a content hash).
"""
from __future__ import annotations

MANIFEST_COLUMNS = ["path", "speaker", "utterance", "duration", "sample_rate"]
SOURCES = ("synthetic", "librispeech", "folder")

"""A cross-corpus evaluation set: a folder of recordings from a corpus never trained on, scored all-pairs.

The in-domain trials come from held-out speakers of the training corpus; a claim that the model works on voices
in general needs speakers from another corpus too (another language, channel and recording style). This module
turns such a folder (any layout ``data.source: folder`` accepts, e.g. a LibriSpeech tree) into features made
exactly as the training store's, and a trial list of every pair of its utterances.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from voiceprint.data.audio import AUDIO_EXTENSIONS
from voiceprint.data.corpus import folder
from voiceprint.core.errors import DataError
from voiceprint.features import featurize_many
from voiceprint.data.splits import make_trials


@dataclass
class EvalSet:
    utterances: np.ndarray      # ids, in feature order
    speakers: np.ndarray
    features: list              # (frames, bands) float32 per utterance
    baseline: np.ndarray        # (utterances, 40) MFCC statistics for the no-training baseline
    trials: pd.DataFrame        # as splits.make_trials: label, enroll, test, enroll_speaker, test_speaker
    rejected: pd.DataFrame      # path, speaker, reason, message: every file found but not used


def has_recordings(source: str | Path) -> bool:
    """False for an empty setting or a folder without a single audio file (the offline default placeholder)."""
    if not str(source):
        return False
    path = Path(source)
    if path.is_file():
        return path.suffix.lower() == ".csv"
    return path.is_dir() and any(p.suffix.lower() in AUDIO_EXTENSIONS for p in path.rglob("*") if p.is_file())


def load_eval_set(source: str | Path, *, kind: str, vad: str, sample_rate: int, min_seconds: float, workers: int,
                  max_nontarget: int = 10_000_000, seed: int = 0) -> EvalSet:
    """Scan ``source``, featurize every usable recording as the store was made, and list all trials.

    Files that cannot be used are listed in ``rejected`` with their reason, never dropped silently; speakers left
    with one utterance give no target trial but still give non-target ones."""
    manifest, rejected = folder.scan(source)
    rejected = rejected[["path", "speaker", "reason", "message"]].copy()
    feats, base, keep = [], [], []
    for i, f, b, reason, message in featurize_many(manifest.path, kind, workers=workers, sample_rate=sample_rate,
                                                   min_seconds=min_seconds, vad=vad, progress=False):
        if reason is not None:
            row = manifest.iloc[i]
            rejected.loc[len(rejected)] = [row.path, row.speaker, reason, message]
            continue
        feats.append(np.asarray(f, np.float32))
        base.append(b)
        keep.append(i)
    used = manifest.iloc[keep].reset_index(drop=True)
    if used.speaker.nunique() < 2:
        raise DataError(f"{source}: cross-corpus set needs recordings of at least 2 speakers; "
                         f"found {used.speaker.nunique()} ({len(rejected)} file(s) left out)")
    table = pd.DataFrame({"utterance": used.utterance, "speaker": used.speaker, "role": "evaluation"})
    trials = make_trials(table, max_nontarget=max_nontarget, seed=seed)
    return EvalSet(used.utterance.to_numpy(), used.speaker.to_numpy(), feats, np.stack(base).astype(np.float32),
                   trials, rejected)

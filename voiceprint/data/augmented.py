"""Augmented copies of the training utterances, featurized into a store of their own (the ``augment`` stage).

Only utterances with role ``train`` are augmented, and babble is mixed only from training utterances, so nothing
of an evaluation speaker (or a validation utterance) reaches training. Speed-perturbed copies (0.9x, 1.1x) are new
speakers with labels of their own, as in the Kaldi and WeSpeaker recipes; noise, babble and reverb copies keep
their speaker's label. Every copy is a deterministic function of ``augment.seed`` and its id (augment.rng_for),
whatever the number of workers.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd

from voiceprint.data.audio import AudioError, load_audio
from voiceprint.data.augment import AugmentSettings, augment_utterance, rng_for, speed_perturb
from voiceprint.features import FEATURE_KINDS, MIN_FRAMES, NoSpeechError, apply_vad, mfcc_stats, num_frames

BABBLE_POOL = 200        # training utterances babble is drawn from (a bounded sample, not the whole corpus)


@dataclass(frozen=True)
class Copy:
    utterance: str        # the copy's id: "<variant>:<source id>"
    speaker: str
    label: int
    source: str           # the training utterance it is made from
    factor: float         # speed factor (1.0 = none)
    augmented: bool       # noise / babble / reverb on top


def plan(split: pd.DataFrame, settings: AugmentSettings) -> list[Copy]:
    """Every copy of every training utterance the settings ask for, in a fixed order."""
    train = split[split.role == "train"].sort_values("utterance")
    classes = int(split.label.max()) + 1 if (split.label >= 0).any() else 0
    copies = []
    for row in train.itertuples():
        variants = [(1.0, "", row.speaker, int(row.label))]
        variants += [(f, f"speed{f}:", f"speed{f}:{row.speaker}", int(row.label) + (k + 1) * classes)
                     for k, f in enumerate(settings.speed_factors)]
        for factor, prefix, speaker, label in variants:
            if factor != 1.0:
                copies.append(Copy(f"{prefix}{row.utterance}", speaker, label, row.utterance, factor, False))
            copies += [Copy(f"aug{c}:{prefix}{row.utterance}", speaker, label, row.utterance, factor, True)
                       for c in range(1, settings.copies + 1)]
    return copies


def babble_pool(paths: list[str], seed: int, sample_rate: int = 16000) -> list[np.ndarray]:
    """A seeded sample of at most BABBLE_POOL training recordings, decoded (unreadable ones are skipped: they
    are rejected, and reported, by the mfcc stage already)."""
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(paths), size=min(BABBLE_POOL, len(paths)), replace=False))
    pool = []
    for i in chosen:
        try:
            pool.append(load_audio(paths[i], sample_rate))
        except AudioError:
            continue
    return pool


_POOL: list[np.ndarray] = []     # the babble pool, inherited by forked workers


def _featurize(wav, kind, vad, sample_rate):
    speech = apply_vad(wav, vad, sample_rate)
    if num_frames(len(speech)) < MIN_FRAMES:
        raise NoSpeechError("too short after the VAD")
    return FEATURE_KINDS[kind](speech, sample_rate=sample_rate).astype(np.float32), mfcc_stats(speech, sample_rate)


def _make(task):
    """Worker: all copies of one source utterance -> [(copy, features, baseline, error)]; never raises."""
    path, copies, settings, kind, vad, sample_rate = task
    try:
        original = load_audio(path, sample_rate)
    except Exception as exc:  # noqa: BLE001 -- reported per copy, never kills the stage
        return [(c, None, None, f"{path}: {type(exc).__name__}: {exc}") for c in copies]
    out, speeds = [], {}
    for c in copies:
        try:
            if c.factor not in speeds:
                speeds[c.factor] = speed_perturb(original, c.factor, sample_rate)
            wav = speeds[c.factor]
            if c.augmented:
                wav = augment_utterance(wav, settings, rng_for(settings.seed, c.utterance), _POOL, sample_rate)
            out.append((c, *_featurize(wav, kind, vad, sample_rate), None))
        except Exception as exc:  # noqa: BLE001
            out.append((c, None, None, f"{path} ({c.utterance}): {type(exc).__name__}: {exc}"))
    return out


def make_copies(copies: list[Copy], paths: dict[str, str], settings: AugmentSettings, *, kind: str, vad: str,
                sample_rate: int, workers: int) -> Iterator[tuple[Copy, np.ndarray | None, np.ndarray | None,
                                                                  str | None]]:
    """(copy, features, baseline, error) for every copy, in plan order; ``paths``: source utterance -> file."""
    global _POOL
    by_source: dict[str, list[Copy]] = {}
    for c in copies:
        by_source.setdefault(c.source, []).append(c)
    if "babble" in settings.kinds and settings.copies:
        _POOL = babble_pool([paths[s] for s in sorted(by_source)], settings.seed, sample_rate)
    tasks = [(paths[s], cs, settings, kind, vad, sample_rate) for s, cs in by_source.items()]
    if workers <= 1 or len(tasks) < 2:
        for task in tasks:
            yield from _make(task)
        return
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import multiprocessing
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        for result in pool.map(_make, tasks, chunksize=4):
            yield from result

"""Training batches from the feature store: random crops, deterministic for a seed.

Each batch draws from its own generator seeded by (seed, epoch, batch), so a run is reproducible whatever the
order Keras asks for batches in, and a resumed run sees the batches an uninterrupted one would.
"""
from __future__ import annotations

import numpy as np
import keras

from voiceprint.store import FeatureStore


def _crops(store: FeatureStore, positions, frames: int, rng) -> np.ndarray:
    return np.stack([store.crop(int(p), frames, rng) for p in positions])[..., None]


class ClassificationBatches(keras.utils.PyDataset):
    """Every utterance once per epoch (shuffled), one random crop each; label = speaker class.

    With ``shuffle=False`` crops are centred and the order fixed: a stable validation set.
    """

    def __init__(self, store: FeatureStore, positions, labels, *, batch_size: int, frames: int, seed: int,
                 shuffle: bool = True):
        super().__init__(workers=1, use_multiprocessing=False)
        self.store, self.positions, self.labels = store, np.asarray(positions), np.asarray(labels)
        self.batch_size, self.frames, self.seed, self.shuffle = batch_size, frames, seed, shuffle
        self.epoch = 0

    def __len__(self):
        return int(np.ceil(len(self.positions) / self.batch_size))

    def _order(self):
        if not self.shuffle:
            return np.arange(len(self.positions))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.positions))

    def __getitem__(self, i):
        take = self._order()[i * self.batch_size:(i + 1) * self.batch_size]
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.shuffle else None
        return _crops(self.store, self.positions[take], self.frames, rng), self.labels[take]

    def on_epoch_end(self):
        self.epoch += 1


class SpeakerBatches(keras.utils.PyDataset):
    """P speakers x K utterances per batch (K drawn without replacement when a speaker has enough), random crops.
    Label = speaker class, used by the in-batch triplet mining."""

    def __init__(self, store: FeatureStore, positions, labels, *, speakers_per_batch: int,
                 utterances_per_speaker: int, steps: int, frames: int, seed: int):
        super().__init__(workers=1, use_multiprocessing=False)
        self.store, self.frames, self.seed, self.steps = store, frames, seed, steps
        self.p, self.k = speakers_per_batch, utterances_per_speaker
        positions, labels = np.asarray(positions), np.asarray(labels)
        self.by_speaker = {int(c): positions[labels == c] for c in np.unique(labels)}
        self.classes = np.array(sorted(self.by_speaker))
        if len(self.classes) < 2:
            raise ValueError("triplet batches need at least 2 training speakers")
        self.p = min(self.p, len(self.classes))
        self.epoch = 0

    def __len__(self):
        return self.steps

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, self.epoch, i])
        speakers = rng.choice(self.classes, size=self.p, replace=False)
        take, labels = [], []
        for s in speakers:
            pool = self.by_speaker[int(s)]
            take.append(rng.choice(pool, size=self.k, replace=len(pool) < self.k))
            labels += [int(s)] * self.k
        return _crops(self.store, np.concatenate(take), self.frames, rng), np.asarray(labels)

    def on_epoch_end(self):
        self.epoch += 1


class VectorSpeakerBatches(keras.utils.PyDataset):
    """P x K batches over precomputed vectors (for training a head on a frozen embedding model)."""

    def __init__(self, vectors, labels, *, speakers_per_batch: int, utterances_per_speaker: int, steps: int,
                 seed: int):
        super().__init__(workers=1, use_multiprocessing=False)
        self.vectors, self.seed, self.steps = np.asarray(vectors), seed, steps
        self.p, self.k = speakers_per_batch, utterances_per_speaker
        labels = np.asarray(labels)
        self.by_speaker = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
        self.classes = np.array(sorted(self.by_speaker))
        self.p = min(self.p, len(self.classes))
        self.epoch = 0

    def __len__(self):
        return self.steps

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, self.epoch, i])
        speakers = rng.choice(self.classes, size=self.p, replace=False)
        rows = np.concatenate([rng.choice(self.by_speaker[int(s)], size=self.k,
                                          replace=len(self.by_speaker[int(s)]) < self.k) for s in speakers])
        return self.vectors[rows], np.repeat(speakers, self.k)

    def on_epoch_end(self):
        self.epoch += 1

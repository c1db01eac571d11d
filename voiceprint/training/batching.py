"""Training batches from the feature store: random crops, deterministic for a seed.

Each batch draws from its own generator seeded by (seed, epoch, batch), so a run is reproducible whatever the
order Keras asks for batches in, and a resumed run sees the batches an uninterrupted one would.
"""
from __future__ import annotations

import numpy as np
import keras

from voiceprint.core.errors import DataError
from voiceprint.data.store import FeatureStore


def _crops(store: FeatureStore, positions, frames: int, rng) -> np.ndarray:
    # float16 as stored: the model's float32 input layer converts exactly (the same values, bit for bit), on
    # the device, and the batch crosses to it at half the size.
    return np.stack([store.crop(int(p), frames, rng, dtype=np.float16) for p in positions])[..., None]


class ClassificationBatches(keras.utils.PyDataset):
    """Every utterance once per epoch (shuffled), one random crop each; label = speaker class.

    With ``shuffle=False`` crops are centred and the order fixed: a stable validation set.
    ``transform(crops, rng)``, if given, changes each training batch (e.g. spectrogram masking); drawn from the
    batch's own generator after the crops, so batches stay reproducible.
    """

    def __init__(self, store: FeatureStore, positions, labels, *, batch_size: int, frames: int, seed: int,
                 shuffle: bool = True, transform=None):
        super().__init__(workers=1, use_multiprocessing=False)
        self.store, self.positions, self.labels = store, np.asarray(positions), np.asarray(labels)
        self.transform = transform
        self.batch_size, self.frames, self.seed, self.shuffle = batch_size, frames, seed, shuffle
        self.epoch = 0
        self._cached = (None, None)     # (epoch, permutation): one permutation per epoch, not per batch

    def __len__(self):
        return int(np.ceil(len(self.positions) / self.batch_size))

    def _order(self):
        if not self.shuffle:
            return np.arange(len(self.positions))
        if self._cached[0] != self.epoch:
            self._cached = (self.epoch,
                            np.random.default_rng([self.seed, self.epoch]).permutation(len(self.positions)))
        return self._cached[1]

    def __getitem__(self, i):
        take = self._order()[i * self.batch_size:(i + 1) * self.batch_size]
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.shuffle else None
        crops = _crops(self.store, self.positions[take], self.frames, rng)
        if self.transform is not None and rng is not None:
            crops = self.transform(crops, rng)
        return crops, self.labels[take]

    def on_epoch_end(self):
        self.epoch += 1


class _SpeakerBatches(keras.utils.PyDataset):
    """P speakers x K items per batch (K drawn without replacement when a speaker has enough); ``items[j]`` is
    the store position or vector row of the j-th labelled example. Subclasses turn items into inputs.

    Batch i of an epoch is drawn from (seed, epoch, i). With ``shuffle=False`` it is drawn from (seed, i) alone:
    the same batches every epoch, a stable validation set."""

    def __init__(self, items, labels, *, speakers_per_batch: int, utterances_per_speaker: int, steps: int,
                 seed: int, shuffle: bool = True):
        super().__init__(workers=1, use_multiprocessing=False)
        self.seed, self.steps, self.k, self.shuffle = seed, steps, utterances_per_speaker, shuffle
        items, labels = np.asarray(items), np.asarray(labels)
        self.by_speaker = {int(c): items[labels == c] for c in np.unique(labels)}
        self.classes = np.array(sorted(self.by_speaker))
        if len(self.classes) < 2:
            raise DataError("speaker batches need at least 2 training speakers")
        self.p = min(speakers_per_batch, len(self.classes))
        self.epoch = 0

    def __len__(self):
        return self.steps

    def _draw(self, i):
        rng = np.random.default_rng([self.seed, self.epoch, i] if self.shuffle else [self.seed, i])
        speakers = rng.choice(self.classes, size=self.p, replace=False)
        items = np.concatenate([rng.choice(self.by_speaker[int(s)], size=self.k,
                                           replace=len(self.by_speaker[int(s)]) < self.k) for s in speakers])
        return rng, items, np.repeat(speakers, self.k)

    def on_epoch_end(self):
        self.epoch += 1


class SpeakerBatches(_SpeakerBatches):
    """P x K utterances per batch, random crops; label = speaker class, used by in-batch triplet mining."""

    def __init__(self, store: FeatureStore, positions, labels, *, frames: int, **kwargs):
        super().__init__(positions, labels, **kwargs)
        self.store, self.frames = store, frames

    def __getitem__(self, i):
        rng, positions, labels = self._draw(i)
        return _crops(self.store, positions, self.frames, rng), labels


class VectorSpeakerBatches(_SpeakerBatches):
    """P x K batches over precomputed vectors (for training a head on a frozen embedding model)."""

    def __init__(self, vectors, labels, **kwargs):
        super().__init__(np.arange(len(vectors)), labels, **kwargs)
        self.vectors = np.asarray(vectors)

    def __getitem__(self, i):
        _, rows, labels = self._draw(i)
        return self.vectors[rows], labels


class ArrayBatches(keras.utils.PyDataset):
    """Shuffled minibatches over in-memory arrays (a new order every epoch); ``shuffle=False``: fixed order."""

    def __init__(self, x, y, *, batch_size: int, seed: int, shuffle: bool = True):
        super().__init__(workers=1, use_multiprocessing=False)
        self.x, self.y = np.asarray(x), np.asarray(y)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.epoch = 0
        self._cached = (None, None)

    def __len__(self):
        return int(np.ceil(len(self.x) / self.batch_size))

    def __getitem__(self, i):
        if self._cached[0] != self.epoch:
            n = len(self.x)
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._cached = (self.epoch, order)
        take = self._cached[1][i * self.batch_size:(i + 1) * self.batch_size]
        return self.x[take], self.y[take]

    def on_epoch_end(self):
        self.epoch += 1

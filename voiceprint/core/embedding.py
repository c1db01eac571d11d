"""Embedding utterances with a trained model: whole utterances, or the mean over sliding windows."""
from __future__ import annotations

import contextlib
import weakref
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:   # only an annotation: the runtime (ONNX) path must not import pandas through the store
    from voiceprint.data.store import FeatureStore


def tqdm(*args, disable: bool = False, **kwargs):
    """tqdm, imported only when a bar is shown (its import is ~5% of a cold ``voiceprint verify``)."""
    if not disable:
        from tqdm import tqdm as real

        return real(*args, **kwargs)
    return _NoBar(args[0] if args else ())


class _NoBar(contextlib.nullcontext):
    def __init__(self, iterable=()):
        super().__init__(self)
        self._iterable = iterable

    def __iter__(self):
        return iter(self._iterable)

    def update(self, n: int = 1) -> None:
        pass


# model -> {num_bands: traced function}: a new tf.function per call would trace the model again every call
# (~1-2 s even for a tiny model), which a long-lived process (voiceprint serve) pays on every request.
_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _compiled(model, num_bands: int):
    from voiceprint.serving.export import Embedder

    if isinstance(model, Embedder):   # an exported model (ONNX Runtime): already (B, T, bands, 1) -> (B, D)
        return model
    import tensorflow as tf

    per_model = _COMPILED.setdefault(model, {})
    if num_bands not in per_model:
        # One trace for every utterance length (a Keras predict would retrace per new length).
        spec = tf.TensorSpec([None, None, num_bands, 1], tf.float32)
        ref = weakref.ref(model)    # the cache entry must not keep its own key alive
        per_model[num_bands] = tf.function(lambda x: ref()(x, training=False), input_signature=[spec],
                                           reduce_retracing=True)
    return per_model[num_bands]


def unit_rows(x, dtype=None) -> np.ndarray:
    """The rows of ``x`` (2-D; a 1-D vector is one row), each divided by its L2 norm; a zero row stays zero.
    ``dtype``: convert first (e.g. float64 for scoring)."""
    x = np.atleast_2d(np.asarray(x, dtype=dtype))
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def windows(features: np.ndarray, window: int, hop: int) -> np.ndarray:
    """(n_windows, window, bands): windows every ``hop`` frames covering the utterance (the last one flush with
    the end); an utterance shorter than ``window`` is one window of its own length."""
    n = len(features)
    if n <= window:
        return features[None]
    starts = list(range(0, n - window + 1, hop))
    if starts[-1] != n - window:
        starts.append(n - window)
    return np.stack([features[s:s + window] for s in starts])


def embed_utterances(model, store: FeatureStore, positions, *, window_frames: int = 0, hop_frames: int = 0,
                     progress: bool = False, desc: str = "embed") -> np.ndarray:
    """One L2-normalised embedding per utterance. ``window_frames=0``: the whole utterance in one pass;
    otherwise the re-normalised mean of window embeddings."""
    fn = _compiled(model, store.num_bands)
    out = []
    for p in tqdm(positions, desc=desc, disable=not progress, mininterval=2):
        feats = store[int(p)]
        batch = feats[None] if window_frames <= 0 else windows(feats, window_frames, hop_frames or window_frames)
        emb = np.asarray(fn(batch[..., None].astype(np.float32))).mean(axis=0)
        out.append(emb / max(np.linalg.norm(emb), 1e-12))
    return np.stack(out).astype(np.float32)


def embed_arrays(model, crops: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Embeddings of equal-length crops (n, frames, bands[, 1])."""
    if crops.ndim == 3:
        crops = crops[..., None]
    return np.asarray(model.predict(crops, batch_size=batch_size, verbose=0), dtype=np.float32)


def embed_features(model, features, *, window_frames: int = 0, hop_frames: int = 0, batch_frames: int = 20000,
                   progress: bool = False, desc: str = "embed") -> np.ndarray:
    """Like :func:`embed_utterances`, for in-memory ``(frames, bands)`` arrays of any lengths: one L2-normalised
    float32 embedding per array, in input order.

    Inputs (whole utterances, or their windows when ``window_frames > 0``) of the SAME frame count are run
    together, up to ``batch_frames`` frames per batch (at least one input); lengths are never padded or cut,
    because either would change the time average and so the embedding. An input alone in its batch gives
    bit-identical results to :func:`embed_utterances`; batched ones agree within float32 round-off (~1e-7: the
    convolution kernels sum in another order for another batch size).
    """
    features = list(features)
    if not features:
        raise ValueError("embed_features: no feature arrays given")
    num_bands = int(model.input_shape[2])
    pieces: list[tuple[int, np.ndarray]] = []         # (utterance index, (frames, bands) crop)
    for i, feats in enumerate(features):
        feats = np.asarray(feats, dtype=np.float32)
        if feats.ndim != 2 or feats.shape[0] < 1 or feats.shape[1] != num_bands:
            raise ValueError(f"embed_features: array {i} has shape {feats.shape}, "
                             f"expected (frames >= 1, {num_bands})")
        crops = feats[None] if window_frames <= 0 else windows(feats, window_frames, hop_frames or window_frames)
        pieces.extend((i, crop) for crop in crops)

    fn = _compiled(model, num_bands)
    by_length: dict[int, list[int]] = {}
    rows_of: dict[int, list[int]] = {}
    for k, (i, crop) in enumerate(pieces):
        by_length.setdefault(len(crop), []).append(k)
        rows_of.setdefault(i, []).append(k)
    piece_embeddings: list[np.ndarray | None] = [None] * len(pieces)
    pending = {i: len(rows) for i, rows in rows_of.items()}   # windows still to embed, per utterance
    with tqdm(total=len(features), desc=desc, disable=not progress, mininterval=2) as bar:
        for length in sorted(by_length):
            members = by_length[length]
            step = max(1, batch_frames // length)
            for start in range(0, len(members), step):
                chunk = members[start:start + step]
                batch = np.stack([pieces[k][1] for k in chunk])[..., None]
                for k, emb in zip(chunk, np.asarray(fn(batch))):
                    piece_embeddings[k] = emb
                    pending[pieces[k][0]] -= 1
                    bar.update(int(pending[pieces[k][0]] == 0))

    out = []
    for i in range(len(features)):
        # The same ops, in the same order, as embed_utterances: mean over the windows, then re-normalise.
        emb = np.stack([piece_embeddings[k] for k in rows_of[i]]).mean(axis=0)
        out.append(emb / max(np.linalg.norm(emb), 1e-12))
    return np.stack(out).astype(np.float32)

"""Embedding utterances with a trained model: whole utterances, or the mean over sliding windows."""
from __future__ import annotations

import numpy as np
from tqdm import tqdm

from voiceprint.store import FeatureStore


def _compiled(model, num_bands: int):
    import tensorflow as tf

    # One trace for every utterance length (a Keras predict would retrace per new length).
    spec = tf.TensorSpec([None, None, num_bands, 1], tf.float32)
    return tf.function(lambda x: model(x, training=False), input_signature=[spec], reduce_retracing=True)


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

"""A trained back-end on the utterance MFCC statistics, fused with the network's embedding.

The 40-dim MFCC statistics (``features.mfcc_stats``: 20 means and 20 standard deviations) are the project's
no-training baseline. Projected by linear discriminant analysis (LDA) fitted on the training speakers, they become a
small trained speaker model of their own: on 50 held-out speechocean762 speakers they alone reach about 6.4% EER with
AS-norm (z-normalised, untrained: 10.3%), and they fail differently from a network trained on 150 speakers, so the
two combine well (docs/real-speech.md has the numbers and commands).

The fusion is a concatenation of unit vectors::

    joint = [sqrt(1 - w) * unit(embedding), sqrt(w) * unit(W^T (stats - mean))]

so ``cosine(joint_a, joint_b) = (1 - w) * cosine(emb_a, emb_b) + w * cosine(lda_a, lda_b)``: the joint vector is
itself an L2-normalised embedding, and everything downstream (cosine, AS-norm, the registry, clustering) works on it
unchanged. Fitting needs scipy; applying a fitted :class:`StatsLda` needs numpy only.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from voiceprint.core.embedding import unit_rows
from voiceprint.core.errors import VoiceprintError

STATS_BRANCHES = ("none", "lda")
_RIDGE = 1e-6   # relative to the within-class scatter's mean variance: keeps it positive definite


class StatsLdaError(VoiceprintError, ValueError):
    """A statistics back-end that cannot be fitted or used (too few speakers, wrong shapes, bad file)."""


@dataclass(frozen=True)
class StatsLda:
    """A fitted LDA projection of statistics vectors and the weight of that branch in the joint embedding."""

    mean: np.ndarray        # (d,) training mean of the statistics
    projection: np.ndarray  # (d, k): columns are discriminant directions, whitened within-class (W^T S_w W = I)
    weight: float           # share of the statistics branch in the joint cosine, in [0, 1]

    @property
    def input_dim(self) -> int:
        return self.projection.shape[0]

    @property
    def output_dim(self) -> int:
        return self.projection.shape[1]

    def project(self, stats: np.ndarray) -> np.ndarray:
        """(n, d) statistics -> (n, k) L2-normalised LDA vectors."""
        stats = np.atleast_2d(np.asarray(stats, dtype=np.float64))
        if stats.shape[1] != self.input_dim:
            raise StatsLdaError(f"statistics are {stats.shape[1]}-d, the LDA projection takes {self.input_dim}-d")
        return unit_rows((stats - self.mean) @ self.projection, np.float64)

    def joint(self, embeddings: np.ndarray, stats: np.ndarray) -> np.ndarray:
        """(n, D) embeddings and (n, d) statistics -> (n, D + k) float32 unit vectors (see the module docstring)."""
        embeddings = np.atleast_2d(embeddings)
        if len(embeddings) != len(np.atleast_2d(stats)):
            raise StatsLdaError(f"{len(embeddings)} embeddings but {len(np.atleast_2d(stats))} statistics vectors")
        return np.hstack([np.sqrt(1.0 - self.weight) * unit_rows(embeddings, np.float64),
                          np.sqrt(self.weight) * self.project(stats)]).astype(np.float32)

    def save(self, path: str | Path) -> None:
        """A plain .npz (no pickled objects): mean, projection, weight."""
        with open(path, "wb") as fh:
            np.savez(fh, mean=self.mean.astype("<f8"), projection=self.projection.astype("<f8"),
                     weight=np.float64(self.weight))

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for array in (self.mean, self.projection, np.float64(self.weight)):
            digest.update(np.ascontiguousarray(array, dtype="<f8").tobytes())
        return digest.hexdigest()


def load_stats_lda(path: str | Path) -> StatsLda:
    """Read :meth:`StatsLda.save`'s file; StatsLdaError naming the file for anything else."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in ("mean", "projection", "weight")}
    except (OSError, ValueError, KeyError) as exc:
        raise StatsLdaError(f"{path}: not a statistics LDA file (mean, projection, weight): {exc}") from None
    mean, projection, weight = arrays["mean"], arrays["projection"], float(arrays["weight"])
    if mean.ndim != 1 or projection.ndim != 2 or projection.shape[0] != mean.shape[0] or projection.shape[1] < 1:
        raise StatsLdaError(f"{path}: shapes mean {mean.shape} and projection {projection.shape} do not fit")
    if not (np.isfinite(mean).all() and np.isfinite(projection).all() and 0.0 <= weight <= 1.0):
        raise StatsLdaError(f"{path}: non-finite values or a weight outside [0, 1]")
    return StatsLda(mean.astype(np.float64), projection.astype(np.float64), weight)


def fit_stats_lda(stats: np.ndarray, speakers, *, weight: float, dim: int = 0) -> StatsLda:
    """LDA of ``stats`` (n, d) by speaker: the ``dim`` leading directions (0: all, min(d, speakers - 1)) of the
    generalised eigenproblem S_b v = lambda S_w v, scaled so that W^T S_w W = I (within-class whitening).

    S_w is the pooled within-speaker covariance, S_b the covariance of the speaker means (each weighted by its
    utterance count), both about the overall mean; the same solution as scikit-learn's ``solver="eigen"``.
    """
    from scipy.linalg import eigh

    stats = np.asarray(stats, dtype=np.float64)
    speakers = np.asarray(speakers)
    if stats.ndim != 2 or len(stats) != len(speakers):
        raise StatsLdaError(f"expected (n, d) statistics and n speaker labels, got {stats.shape} and "
                            f"{speakers.shape}")
    if not 0.0 <= weight <= 1.0:
        raise StatsLdaError(f"evaluate.stats_weight: expected a number in [0, 1], got {weight!r}")
    names, inverse = np.unique(speakers, return_inverse=True)
    if len(names) < 2 or len(names) == len(stats):
        raise StatsLdaError(f"LDA needs >= 2 speakers with >= 2 utterances among them; got {len(names)} speakers, "
                            f"{len(stats)} utterances")
    k_max = min(stats.shape[1], len(names) - 1)
    dim = k_max if dim == 0 else dim
    if not 1 <= dim <= k_max:
        raise StatsLdaError(f"LDA dimension {dim}: at most min(d={stats.shape[1]}, speakers - 1={len(names) - 1})")
    mean = stats.mean(axis=0)
    counts = np.bincount(inverse)
    class_means = np.stack([stats[inverse == c].mean(axis=0) for c in range(len(names))])
    within = stats - class_means[inverse]
    s_w = within.T @ within / len(stats)
    between = (class_means - mean) * np.sqrt(counts / len(stats))[:, None]
    s_b = between.T @ between
    s_w += _RIDGE * np.trace(s_w) / len(s_w) * np.eye(len(s_w))
    values, vectors = eigh(s_b, s_w)
    order = np.argsort(values)[::-1][:dim]
    projection = vectors[:, order]
    projection *= np.sign(projection[np.argmax(np.abs(projection), axis=0), np.arange(dim)])  # fixed signs
    return StatsLda(mean, projection, float(weight))

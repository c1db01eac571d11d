"""Scoring trial lists and reporting systems side by side (the logic behind the ``evaluate`` stage)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from voiceprint import metrics


def cosine_scores(embeddings: np.ndarray, utterances, trials: pd.DataFrame) -> np.ndarray:
    """Cosine similarity of each trial's two utterances; ``embeddings[i]`` belongs to ``utterances[i]``."""
    row = pd.Series(np.arange(len(utterances)), index=list(utterances))
    emb = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    a = emb[row.loc[trials.enroll].to_numpy()]
    b = emb[row.loc[trials.test].to_numpy()]
    return np.einsum("ij,ij->i", a, b)


def znorm_baseline(vectors: np.ndarray, train_rows: np.ndarray) -> np.ndarray:
    """The no-training baseline: z-normalise each dimension with the training speakers' statistics.

    Raw cosine of MFCC statistics is useless: the shared c0 term puts every pair near 1.
    """
    mean = vectors[train_rows].mean(axis=0)
    std = vectors[train_rows].std(axis=0)
    return (vectors - mean) / np.maximum(std, 1e-8)


def report_system(scores: np.ndarray, trials: pd.DataFrame, embeddings: np.ndarray, speakers, *,
                  p_target: float, bootstrap: int, seed: int) -> dict:
    """Headline numbers (EER, minDCF, trial counts, 95% CI of EER by speaker bootstrap) and, under
    ``original_protocol``, the original recipe's F/TPR/accuracy for comparison only."""
    labels = trials.label.to_numpy()
    summary = metrics.score_summary(scores, labels, p_target=p_target)
    if bootstrap > 0:
        low, high = metrics.bootstrap_eer_ci(scores, labels, trials.enroll_speaker.to_numpy(),
                                             trials.test_speaker.to_numpy(), n_boot=bootstrap, seed=seed)
        summary.update(eer_ci95_low=low, eer_ci95_high=high)
    summary["original_protocol"] = metrics.original_protocol(embeddings, list(speakers), seed=seed)
    return summary

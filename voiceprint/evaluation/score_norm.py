"""Adaptive symmetric score normalisation (AS-norm; Matejka et al., Interspeech 2017), numpy only.

A raw cosine score means different things for different utterances: some voices (or recordings) sit close to many
speakers and score high against everyone. AS-norm measures that per utterance against a *cohort* of impostor
speakers and removes it from each trial score::

    s' = 0.5 * ((s - mu_e) / sd_e + (s - mu_t) / sd_t)

``mu_e``, ``sd_e``: mean and (population) standard deviation of the enrolment embedding's ``top_n`` highest cosine
scores against the cohort; ``mu_t``, ``sd_t`` likewise for the test embedding. Only the closest cohort speakers
count ("adaptive"): they are the impostors a threshold has to reject. Same definition as WeSpeaker's
``score_norm.py`` (``np.std``, L2-normalised embeddings and cohort). With ``top_n`` = the cohort size it is
the symmetric S-norm.

Normalised scores are no longer cosines in [-1, 1]: thresholds must be calibrated on normalised scores.
"""
from __future__ import annotations

import numpy as np

from voiceprint.core.embedding import unit_rows

SCORE_NORMS = ("none", "as_norm")
MIN_TOP_N = 2              # one cohort score has no spread
_MIN_STD = 1e-8            # a zero spread only comes from identical cohort scores; this keeps scores finite
_ROWS_PER_CHUNK = 4096     # bounds the (rows, cohort) score matrix (4096 x 5000 float64 = 160 MB)


def check_score_norm(name: str) -> str:
    """``name`` if it is one of :data:`SCORE_NORMS`, else ValueError naming ``evaluate.score_norm``."""
    if name not in SCORE_NORMS:
        raise ValueError(f"evaluate.score_norm: unknown score normalisation {name!r}; valid: {', '.join(SCORE_NORMS)}")
    return name


def check_top_n(top_n: int, cohort_size: int) -> int:
    """``top_n`` if the cohort can supply it, else ValueError naming ``evaluate.cohort_top_n`` and the cohort size."""
    if isinstance(top_n, bool) or not isinstance(top_n, (int, np.integer)) or top_n < MIN_TOP_N:
        raise ValueError(f"evaluate.cohort_top_n: expected an integer >= {MIN_TOP_N}, got {top_n!r}")
    if top_n > cohort_size:
        raise ValueError(f"evaluate.cohort_top_n: {top_n} exceeds the cohort size {cohort_size} (one embedding per "
                         f"training speaker): lower it to at most {cohort_size} or train on more speakers")
    return int(top_n)


def top_n_stats(cohort_scores: np.ndarray, top_n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population std of each row's ``top_n`` highest scores: ((rows,), (rows,)).

    ``np.partition`` finds the top ``top_n`` in O(cohort) per row; their order does not matter to mean and std.
    """
    scores = np.atleast_2d(np.asarray(cohort_scores, dtype=np.float64))
    top_n = check_top_n(top_n, scores.shape[1])
    top = np.partition(scores, scores.shape[1] - top_n, axis=1)[:, scores.shape[1] - top_n:]
    return top.mean(axis=1), np.maximum(top.std(axis=1), _MIN_STD)


def cohort_stats(embeddings: np.ndarray, cohort: np.ndarray, top_n: int) -> tuple[np.ndarray, np.ndarray]:
    """Each embedding's top-``top_n`` cohort statistics (cosine = dot product of L2-normalised rows)."""
    emb, coh = unit_rows(embeddings, np.float64), unit_rows(cohort, np.float64)
    if emb.shape[1] != coh.shape[1]:
        raise ValueError(f"embeddings are {emb.shape[1]}-d but the cohort is {coh.shape[1]}-d")
    check_top_n(top_n, len(coh))
    means, stds = [], []
    for start in range(0, len(emb), _ROWS_PER_CHUNK):
        mean, std = top_n_stats(emb[start:start + _ROWS_PER_CHUNK] @ coh.T, top_n)
        means.append(mean)
        stds.append(std)
    return np.concatenate(means), np.concatenate(stds)


def normalise(scores, enroll_stats: tuple, test_stats: tuple) -> np.ndarray:
    """The AS-norm formula on raw scores, given each side's (mean, std); broadcasts like numpy."""
    s = np.asarray(scores, dtype=np.float64)
    (mu_e, sd_e), (mu_t, sd_t) = enroll_stats, test_stats
    return 0.5 * ((s - mu_e) / sd_e + (s - mu_t) / sd_t)


def as_norm(scores, enroll_emb: np.ndarray, test_emb: np.ndarray, cohort: np.ndarray, top_n: int) -> np.ndarray:
    """AS-norm of trial scores: ``scores[i]`` is the raw cosine of ``enroll_emb[i]`` with ``test_emb[i]`` (either side
    may be one row, shared by all trials). Each row's cohort statistics are computed once, so pass each distinct
    utterance once and index (see :func:`as_norm_matrix`, ``evaluation.as_norm_scores``) when rows repeat."""
    return normalise(scores, cohort_stats(enroll_emb, cohort, top_n), cohort_stats(test_emb, cohort, top_n))


def as_norm_matrix(enroll_emb: np.ndarray, test_emb: np.ndarray, cohort: np.ndarray, top_n: int) -> np.ndarray:
    """(len(enroll), len(test)) AS-normalised cosine scores of every enrolment row with every test row."""
    e, t = unit_rows(enroll_emb, np.float64), unit_rows(test_emb, np.float64)
    mu_e, sd_e = cohort_stats(e, cohort, top_n)
    mu_t, sd_t = cohort_stats(t, cohort, top_n)
    return normalise(e @ t.T, (mu_e[:, None], sd_e[:, None]), (mu_t[None, :], sd_t[None, :]))


def speaker_cohort(embeddings: np.ndarray, speakers) -> np.ndarray:
    """The cohort: one L2-normalised mean embedding per speaker (rows in sorted speaker order), float32.

    Speaker-level rather than utterance-level: a speaker with many utterances would otherwise fill the top-N
    with near-duplicates of one voice, and the statistics would measure that speaker rather than the impostor
    population; the mean also averages away the utterances' channel and content.
    """
    emb = unit_rows(embeddings, np.float64)
    names, inverse = np.unique(np.asarray(speakers).ravel(), return_inverse=True)
    if len(inverse) != len(emb):
        raise ValueError(f"speakers must have one entry per embedding, got {len(inverse)} and {len(emb)}")
    sums = np.zeros((len(names), emb.shape[1]))
    np.add.at(sums, inverse.ravel(), emb)
    return unit_rows(sums, np.float64).astype(np.float32)


def pick_cohort_utterances(utterances, per_speaker: int, seed: int):
    """At most ``per_speaker`` training utterances (role ``train``) of each training speaker, a seeded draw, in
    utterance order: the cohort costs a few embeddings per speaker, not the whole training set."""
    train = utterances[utterances.role == "train"].sort_values("utterance")
    rng = np.random.default_rng(seed)
    keep = []
    for _, group in train.groupby("speaker", sort=True):
        idx = group.index.to_numpy()
        keep.extend(idx if len(idx) <= per_speaker else rng.choice(idx, size=per_speaker, replace=False))
    return train[train.index.isin(keep)]

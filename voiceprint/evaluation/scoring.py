"""Scoring trial lists and reporting systems side by side (the logic behind the ``evaluate`` stage)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from voiceprint.evaluation import metrics
from voiceprint.core.embedding import unit_rows
from voiceprint.core.errors import DataError


def cosine_scores(embeddings: np.ndarray, utterances, trials: pd.DataFrame) -> np.ndarray:
    """Cosine similarity of each trial's two utterances; ``embeddings[i]`` belongs to ``utterances[i]``."""
    row = pd.Series(np.arange(len(utterances)), index=list(utterances))
    emb = unit_rows(embeddings)
    a = emb[row.loc[trials.enroll].to_numpy()]
    b = emb[row.loc[trials.test].to_numpy()]
    return np.einsum("ij,ij->i", a, b)


def znorm_baseline(vectors: np.ndarray, train_rows: np.ndarray, apply_to: np.ndarray | None = None) -> np.ndarray:
    """The no-training baseline: z-normalise each dimension with the training speakers' statistics
    (of ``vectors[train_rows]``), applied to ``vectors`` or to ``apply_to`` (e.g. another corpus' vectors).

    Raw cosine of MFCC statistics is useless: the shared c0 term puts every pair near 1.
    """
    mean = vectors[train_rows].mean(axis=0)
    std = vectors[train_rows].std(axis=0)
    return ((vectors if apply_to is None else apply_to) - mean) / np.maximum(std, 1e-8)


def report_system(scores: np.ndarray, trials: pd.DataFrame, embeddings: np.ndarray, speakers, *,
                  p_target: float, bootstrap: int, seed: int) -> dict:
    """Headline numbers (EER, minDCF, trial counts, 95% CI of EER by speaker bootstrap) and, under
    ``original_protocol``, the original recipe's F/TPR/accuracy for comparison only (left out when ``embeddings``
    is None: that protocol scores raw cosines, so a normalised system would only repeat its raw one)."""
    labels = trials.label.to_numpy()
    summary = metrics.score_summary(scores, labels, p_target=p_target)
    if bootstrap > 0:
        low, high = metrics.bootstrap_eer_ci(scores, labels, trials.enroll_speaker.to_numpy(),
                                             trials.test_speaker.to_numpy(), n_boot=bootstrap, seed=seed)
        summary.update(eer_ci95_low=low, eer_ci95_high=high)
    if embeddings is not None:
        summary["original_protocol"] = metrics.original_protocol(embeddings, list(speakers), seed=seed)
    return summary


FUSIONS = ("none", "concat", "score")


def fusion_base_weight(fusion: str, weight: float = 0.5) -> float | None:
    """The weight of the base score in ``fusion`` (``concat``: 0.5; ``score``: ``weight``; ``none``: None)."""
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; valid: {', '.join(FUSIONS)}")
    if fusion == "none":
        return None
    w = 0.5 if fusion == "concat" else weight
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"fusion weight must be in [0, 1], got {w}")
    return w


def fuse(base: np.ndarray, head: np.ndarray, fusion: str, weight: float = 0.5) -> np.ndarray | None:
    """Fused embeddings (one row per utterance), built so that their cosine *is* the fused score.

    With unit-norm ``b`` and ``h``: ``concat`` = [b, h] / sqrt(2), whose cosine is (cos_b + cos_h) / 2;
    ``score`` = [sqrt(w) b, sqrt(1 - w) h], whose cosine is w cos_b + (1 - w) cos_h. So ``concat`` equals ``score``
    at w = 0.5, and either one can be stored and searched like any other embedding. ``none`` -> None.
    """
    w = fusion_base_weight(fusion, weight)
    if w is None:
        return None
    unit = [unit_rows(e) for e in (base, head)]
    return np.concatenate([np.sqrt(w) * unit[0], np.sqrt(1.0 - w) * unit[1]], axis=1).astype(np.float32)


def paired_eer_difference_ci(scores: np.ndarray, base_scores: np.ndarray, trials: pd.DataFrame, *, n_boot: int,
                             seed: int, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile interval of EER(system) - EER(base) on the same trials, resampling speakers (as
    ``metrics.bootstrap_eer_ci``) with the SAME draw for both systems: the pairing removes the variation both
    share, so a real difference can show even where the two systems' own intervals overlap."""
    labels = trials.label.to_numpy()
    _, inverse = np.unique(np.concatenate([trials.enroll_speaker.to_numpy(), trials.test_speaker.to_numpy()]),
                           return_inverse=True)
    a, b = inverse[:len(trials)], inverse[len(trials):]
    n_speakers = int(inverse.max()) + 1
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(10 * n_boot):
        if len(differences) == n_boot:
            break
        multiplicity = np.bincount(rng.integers(0, n_speakers, n_speakers), minlength=n_speakers).astype(float)
        weights = multiplicity[a] * multiplicity[b]
        if not (weights[labels == 1].any() and weights[labels == 0].any()):
            continue
        differences.append(metrics.eer(scores, labels, weights)[0] - metrics.eer(base_scores, labels, weights)[0])
    if len(differences) < n_boot:       # as metrics.bootstrap_eer_ci: never an interval from fewer replicates
        raise DataError(f"paired bootstrap: only {len(differences)} of {n_boot} replicates in {10 * n_boot} draws had "
                        "both target and non-target trials; too few speakers for a speaker-level bootstrap of the "
                        "EER difference")
    low, high = np.quantile(differences, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def guard_against_base(report: dict, systems=("head", "fused"), *, scores: dict | None = None,
                       trials: pd.DataFrame | None = None, bootstrap: int = 0,
                       seed: int = 0) -> tuple[dict, list[str]]:
    """``<system>_minus_base_eer`` for each system present (with its paired 95% interval when ``scores``,
    ``trials`` and ``bootstrap`` are given), and a loud warning for each system worse than the base: the failure
    the original TDNN head hid, because it was never scored beside the model it was put on.
    Returns (numbers for metrics, lines to print)."""
    deltas, lines = {}, []
    base = report["base"]
    for name in systems:
        if name not in report:
            continue
        delta = report[name]["eer"] - base["eer"]
        key = f"{name}_minus_base_eer"
        deltas[key] = delta
        interval = ""
        if scores is not None and bootstrap > 0:
            low, high = paired_eer_difference_ci(scores[name], scores["base"], trials, n_boot=bootstrap, seed=seed)
            deltas[f"{key}_ci95_low"], deltas[f"{key}_ci95_high"] = low, high
            verdict = ("significantly worse" if low > 0 else "significantly better" if high < 0
                       else "no significant difference")
            interval = f" (paired 95% CI {100 * low:+.2f} to {100 * high:+.2f} points: {verdict})"
        if delta > 0:
            lines.append(
                f"WARNING: {name} is WORSE than the base model: EER {100 * report[name]['eer']:.2f}% vs "
                f"{100 * base['eer']:.2f}%, {100 * delta:+.2f} points{interval}. A head must never cost "
                "recognition: check tdnn.* before using it.")
        else:
            lines.append(f"{name} vs base: EER {100 * delta:+.2f} points{interval}")
    return deltas, lines


def as_norm_scores(embeddings: np.ndarray, utterances, trials: pd.DataFrame, cohort: np.ndarray,
                   top_n: int) -> np.ndarray:
    """:func:`cosine_scores` normalised by AS-norm (``voiceprint.evaluation.score_norm``): each utterance's cohort
    statistics
    are computed once, then looked up per trial (an utterance takes part in many trials)."""
    from voiceprint.evaluation.score_norm import cohort_stats, normalise

    row = pd.Series(np.arange(len(utterances)), index=list(utterances))
    a, b = row.loc[trials.enroll].to_numpy(), row.loc[trials.test].to_numpy()
    mean, std = cohort_stats(embeddings, cohort, top_n)
    return normalise(cosine_scores(embeddings, utterances, trials), (mean[a], std[a]), (mean[b], std[b]))

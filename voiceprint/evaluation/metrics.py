"""Speaker-verification metrics (numpy only).

Conventions used throughout this module
---------------------------------------
* A trial is a ``(score, label)`` pair; ``label`` is 1 for a *target* trial (same speaker) and 0 for a
  *non-target* trial. Higher scores mean "more likely the same speaker".
* Decision rule: a trial is **accepted iff ``score >= threshold``**.
* ``fpr`` (false-alarm rate) = non-target weight accepted / total non-target weight;
  ``fnr`` (miss rate) = target weight rejected / total target weight.
* Operating points are evaluated at every distinct score (ties form ONE threshold, because no threshold can
  separate equal scores) plus one "reject all" point. The reject-all threshold is the smallest float above
  the largest score (``np.nextafter(max, inf)``), so it stays finite (JSON-friendly) and still obeys the
  ``score >= threshold`` rule exactly. The accept-all point is simply the smallest score.

The headline metrics are :func:`eer` and :func:`min_dcf`; :func:`original_protocol` reproduces the Deep
Speaker reference evaluation only so that numbers can be compared with the published ones.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from voiceprint.core.errors import DataError

__all__ = [
    "roc_curve",
    "eer",
    "min_dcf",
    "det_points",
    "score_summary",
    "bootstrap_eer_ci",
    "original_protocol",
]


# ----------------------------------------------------------------------------------------------------------
# input validation
# ----------------------------------------------------------------------------------------------------------
def _check_trials(scores, labels, weights=None):
    """Return (scores float64, labels bool, weights float64 | None) or raise ValueError."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    lab = np.asarray(labels).ravel()
    if s.shape != lab.shape:
        raise ValueError(f"scores and labels must have equal lengths, got {s.size} and {lab.size}")
    if s.size == 0:
        raise ValueError("no trials: scores and labels are empty")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must all be finite (found NaN or inf)")
    if lab.dtype == bool:
        y = lab
    else:
        try:
            labf = lab.astype(np.float64)
        except (TypeError, ValueError):
            raise ValueError("labels must be 0/1 (or booleans)") from None
        if not np.all((labf == 0) | (labf == 1)):
            raise ValueError("labels must be 0/1 (or booleans); found other values")
        y = labf == 1
    w = None
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64).ravel()
        if w.shape != s.shape:
            raise ValueError(f"weights must have the same length as scores, got {w.size} and {s.size}")
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError("weights must be finite and non-negative")
        tw, nw = w[y].sum(), w[~y].sum()
    else:
        tw, nw = np.count_nonzero(y), np.count_nonzero(~y)
    if tw <= 0:
        raise ValueError("need at least one target trial (label 1) with positive weight")
    if nw <= 0:
        raise ValueError("need at least one non-target trial (label 0) with positive weight")
    return s, y, w


# ----------------------------------------------------------------------------------------------------------
# ROC core: shared by roc_curve and the bootstrap (which sorts once and re-weights many times)
# ----------------------------------------------------------------------------------------------------------
def _sort_trials(s, stable=True):
    """Sort once; return (order, group starts in sorted order, thresholds incl. the reject-all point).

    The order within a group of equal scores only matters to float prefix sums of weights; integer counts
    (unweighted trials) are exact in any order, so those may use numpy's faster unstable (SIMD) sort.
    """
    order = np.argsort(s, kind="stable" if stable else None)
    ss = s[order]
    # index of the first trial of each group of equal scores: equal scores must share one threshold
    starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]])
    thresholds = np.r_[ss[starts], np.nextafter(ss[-1], np.inf)]
    return order, starts, thresholds


def _rates_sorted(y_sorted, w_sorted, starts):
    """fpr/fnr at each group start plus the reject-all point, for trials already sorted by score.

    At threshold = score of group k every trial before ``starts[k]`` (strictly lower score) is rejected,
    so a prefix sum gives the rejected weight of each class in O(n).
    """
    if w_sorted is None:
        # integer counts keep the unweighted rates exact (ratios of integers)
        tgt = y_sorted.astype(np.int64)
        non = 1 - tgt
    else:
        tgt = np.where(y_sorted, w_sorted, 0.0)
        non = np.where(y_sorted, 0.0, w_sorted)
    ct = np.cumsum(tgt)
    cn = np.cumsum(non)
    t_total, n_total = ct[-1], cn[-1]
    # rejected weight before each group start (0 for the first group)
    rej_t = np.r_[0, ct[starts[1:] - 1]]
    rej_n = np.r_[0, cn[starts[1:] - 1]]
    fnr = np.r_[rej_t / t_total, 1.0]
    fpr = np.r_[(n_total - rej_n) / n_total, 0.0]
    # pin the end points exactly (float prefix sums could leave 1 - 1e-16 etc.)
    fnr[0], fpr[0] = 0.0, 1.0
    return fpr, fnr


def roc_curve(scores, labels, weights=None):
    """Full ROC/DET operating-point curve.

    Returns ``(fpr, fnr, thresholds)`` as float64 arrays of equal length ``n_distinct_scores + 1``, ordered by
    increasing threshold: ``thresholds[0]`` is the smallest score (accept all: fpr=1, fnr=0) and
    ``thresholds[-1]`` is ``nextafter(max score, +inf)`` (reject all: fpr=0, fnr=1). ``fpr`` is non-increasing
    and ``fnr`` non-decreasing. Decision: accept iff ``score >= threshold``. Negative scores are ordinary
    scores. ``weights`` (optional, non-negative) weights each trial, e.g. for bootstrap resampling.
    """
    s, y, w = _check_trials(scores, labels, weights)
    order, starts, thresholds = _sort_trials(s, stable=w is not None)
    fpr, fnr = _rates_sorted(y[order], None if w is None else w[order], starts)
    return fpr, fnr, thresholds


def _eer_from_curve(fpr, fnr, thresholds):
    """Linear-interpolated crossing of the FNR and FPR curves (see :func:`eer`)."""
    d = fnr - fpr  # goes from -1 (accept all) to +1 (reject all), non-decreasing
    i = int(np.argmax(d >= 0))  # first operating point at or past the crossing; i >= 1 since d[0] = -1
    if d[i] == 0:
        # an operating point sits exactly on the crossing: no interpolation needed
        return float(fnr[i]), float(thresholds[i])
    # d[i-1] < 0 < d[i]: intersect the segment between the two neighbouring operating points with fnr = fpr
    a = -d[i - 1] / (d[i] - d[i - 1])
    e = fnr[i - 1] + a * (fnr[i] - fnr[i - 1])
    t = thresholds[i - 1] + a * (thresholds[i] - thresholds[i - 1])
    return float(e), float(t)


def eer(scores, labels, weights=None):
    """Equal error rate and the threshold where it is reached: ``(eer, threshold)``.

    The FNR and FPR curves are evaluated at all operating points of :func:`roc_curve`. If an operating point
    has ``fnr == fpr`` exactly, the first such point is returned (its threshold is the lowest one reaching
    it). Otherwise, with ``i`` the first point where ``fnr > fpr``, the segment between points ``i-1`` and
    ``i`` is intersected with the line ``fnr == fpr``:
    ``a = (fpr[i-1] - fnr[i-1]) / ((fnr[i] - fpr[i]) - (fnr[i-1] - fpr[i-1]))``,
    ``eer = fnr[i-1] + a * (fnr[i] - fnr[i-1])`` (which equals the interpolated fpr), and the returned threshold
    is interpolated with the same ``a`` between ``thresholds[i-1]`` and ``thresholds[i]``. (No ROC convex hull
    is taken.) Perfect separation gives 0.0, perfect inversion 1.0.
    """
    return _eer_from_curve(*roc_curve(scores, labels, weights))


def threshold_at_far(scores, labels, far: float) -> float:
    """The lowest threshold whose false-alarm rate is at most ``far`` (a low-false-accept operating point)."""
    fpr, _, thresholds = roc_curve(scores, labels)
    return float(thresholds[np.flatnonzero(fpr <= far)[0]])


def min_dcf(scores, labels, p_target=0.01, c_miss=1.0, c_fa=1.0, weights=None):
    """Normalised minimum detection cost (NIST): ``(min_dcf, threshold)``.

    ``DCF(t) = c_miss * p_target * fnr(t) + c_fa * (1 - p_target) * fpr(t)``, divided by the cost of the
    best trivial system ``min(c_miss * p_target, c_fa * (1 - p_target))``. The minimum runs over all
    operating points including accept-all and reject-all, one of which costs exactly 1 after normalisation,
    so the result is always in [0, 1]. Ties go to the lowest threshold.
    """
    _check_costs(p_target, c_miss, c_fa)
    return _min_dcf_from_curve(*roc_curve(scores, labels, weights), p_target, c_miss, c_fa)


def _check_costs(p_target, c_miss, c_fa):
    if not 0.0 < p_target < 1.0:
        raise ValueError(f"p_target must be in (0, 1), got {p_target}")
    if not (c_miss > 0 and c_fa > 0):
        raise ValueError("c_miss and c_fa must be positive")


def _min_dcf_from_curve(fpr, fnr, thr, p_target, c_miss=1.0, c_fa=1.0):
    """:func:`min_dcf` on a curve from :func:`roc_curve`."""
    dcf = c_miss * p_target * fnr + c_fa * (1.0 - p_target) * fpr
    dcf /= min(c_miss * p_target, c_fa * (1.0 - p_target))
    k = int(np.argmin(dcf))
    return float(dcf[k]), float(thr[k])


def det_points(scores, labels, max_points=200):
    """Downsampled DET curve as a DataFrame with columns ``threshold, fpr, fnr, tpr`` (tpr = 1 - fnr).

    At most ``max_points`` rows, sorted by increasing threshold (so fpr non-increasing, fnr non-decreasing).
    The first (accept-all) and last (reject-all) points and the two operating points around the EER crossing
    are always kept; the rest are spread evenly along the curve's L1 length ``(1 - fpr) + fnr`` rather than by
    index, so both the low-FPR and low-FNR tails get points even when one class dominates.
    """
    if int(max_points) < 4:
        raise ValueError("max_points must be >= 4 (end points + EER neighbourhood)")
    max_points = int(max_points)
    fpr, fnr, thr = roc_curve(scores, labels)
    n = thr.size
    if n <= max_points:
        keep = np.arange(n)
    else:
        d = fnr - fpr
        i = int(np.argmax(d >= 0))
        required = np.unique([0, n - 1, i - 1, i])
        budget = max_points - required.size
        pos = (1.0 - fpr) + fnr  # non-decreasing from 0 to 2
        targets = np.linspace(0.0, 2.0, budget + 2)[1:-1]
        picked = np.clip(np.searchsorted(pos, targets, side="left"), 0, n - 1)
        keep = np.union1d(required, picked)  # duplicates collapse, so never more than max_points
    return pd.DataFrame(
        {
            "threshold": thr[keep],
            "fpr": fpr[keep],
            "fnr": fnr[keep],
            "tpr": 1.0 - fnr[keep],
        }
    )


def score_summary(scores, labels, p_target=0.01):
    """EER and minDCF with trial counts, as plain Python numbers (``json.dumps``-able); one sort for both."""
    s, y, _ = _check_trials(scores, labels)
    _check_costs(p_target, 1.0, 1.0)
    curve = roc_curve(s, y)
    e, et = _eer_from_curve(*curve)
    c, ct = _min_dcf_from_curve(*curve, p_target)
    return {
        "eer": float(e),
        "eer_threshold": float(et),
        "min_dcf": float(c),
        "min_dcf_threshold": float(ct),
        "p_target": float(p_target),
        "target_trials": int(np.count_nonzero(y)),
        "nontarget_trials": int(np.count_nonzero(~y)),
    }


def bootstrap_eer_ci(scores, labels, groups_a, groups_b, *, n_boot=200, seed=0, alpha=0.05):
    """Percentile bootstrap confidence interval ``(low, high)`` of the EER, resampling SPEAKERS.

    Trials are not independent (every speaker appears in many trials), so resampling trials would give too
    narrow an interval. Instead each replicate draws the set of speakers with replacement; a trial whose two
    speakers (``groups_a[j]``, ``groups_b[j]``) have multiplicities ``m_a`` and ``m_b`` in the draw gets weight
    ``m_a * m_b`` (0 if either is missing), and the weighted EER is computed. Replicates without any
    weighted target or non-target trial are redrawn (up to ``10 * n_boot`` draws in total).

    The trials are sorted once; each replicate is then O(n) (weights, prefix sums), which keeps 200
    replicates on 200k trials at a few seconds.
    """
    s, y, _ = _check_trials(scores, labels)
    ga = np.asarray(groups_a).ravel()
    gb = np.asarray(groups_b).ravel()
    if ga.shape != s.shape or gb.shape != s.shape:
        raise ValueError("groups_a and groups_b must have one entry per trial")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if int(n_boot) < 1:
        raise ValueError("n_boot must be >= 1")
    # map speaker ids (any type) to 0..K-1 over both sides, so a speaker on either side is the same unit
    _, inv = np.unique(np.concatenate([ga, gb]), return_inverse=True)
    inv = inv.ravel()
    n_spk = int(inv.max()) + 1
    order, starts, thr = _sort_trials(s)
    a_sorted = inv[: s.size][order]
    b_sorted = inv[s.size :][order]
    y_sorted = y[order]

    rng = np.random.default_rng(seed)
    eers = []
    draws = 0
    while len(eers) < n_boot:
        draws += 1
        if draws > 10 * int(n_boot):
            raise DataError("bootstrap keeps drawing samples without target or non-target trials; "
                            "too few speakers for a speaker-level bootstrap")
        mult = np.bincount(rng.integers(0, n_spk, size=n_spk), minlength=n_spk).astype(np.float64)
        w = mult[a_sorted] * mult[b_sorted]
        if not (np.any(w[y_sorted] > 0) and np.any(w[~y_sorted] > 0)):
            continue
        fpr, fnr = _rates_sorted(y_sorted, w, starts)
        eers.append(_eer_from_curve(fpr, fnr, thr)[0])
    lo, hi = np.quantile(np.asarray(eers), [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def original_protocol(embeddings, speakers, *, seed=123, num_negatives=99, thresholds=None):
    """The original Deep Speaker recipe's evaluation (its ``test.py`` and ``eval_metrics.py``) — for comparison ONLY.

    For every speaker with at least 2 utterances, in sorted speaker order: anchor and positive are 2 different
    random utterances of that speaker; ``num_negatives`` negatives are one random utterance each of speakers
    drawn WITH replacement from all the other speakers. Scores are ``dot(anchor, x)`` on L2-normalised rows
    (normalised here defensively). Labels: 1 for the positive, 0 for the negatives. On the threshold grid
    (default ``np.arange(0, 1, 0.001)``; decision ``score > threshold``, note the strict inequality, unlike
    the rest of this module) compute TPR, FPR, precision (0 when nothing is accepted), ``F = 2PR/(P+R+1e-12)``
    and accuracy. Reported: ``f_measure`` = max F (first threshold on ties), ``tpr``/``accuracy`` at that
    F-optimal ``threshold``, and ``eer_grid`` = (FRR+FAR)/2 at the first grid threshold minimising |FRR-FAR|.

    Caveats (why this is NOT the headline metric): with 1 positive per 99 negatives, accuracy is dominated by
    the negatives — a system that rejects everything already scores 0.99, and a weak system with ~20% EER
    still reports ~0.98 — and the grid EER is quantised to the grid and to 1/num_speakers on the FRR side.
    (For a chance-level system the F-optimal threshold falls near 0, where F ~ 0.02 and accuracy ~0.5.) Use :func:`eer`/:func:`min_dcf` on a proper trial list.
    Sampling uses ``numpy.random.default_rng(seed)``, so it is deterministic but NOT the same random draw
    as the reference (which used the global numpy/python RNGs); accuracy uses ``/n`` rather than the
    reference's ``/(n + 1e-12)`` so that a perfect system reports exactly 1.0.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (n, dim), got shape {x.shape}")
    spk = np.asarray(speakers).ravel()
    if spk.size != x.shape[0]:
        raise ValueError(f"speakers must have one entry per embedding, got {spk.size} and {x.shape[0]}")
    if not np.all(np.isfinite(x)):
        raise ValueError("embeddings must be finite")
    if int(num_negatives) < 1:
        raise ValueError("num_negatives must be >= 1")
    num_negatives = int(num_negatives)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.maximum(norms, 1e-12)

    # group utterance indices by speaker (np.unique sorts the speaker ids, giving the sorted order)
    uniq, inv = np.unique(spk, return_inverse=True)
    inv = inv.ravel()
    n_spk = uniq.size
    if n_spk < 2:
        raise ValueError("need at least 2 speakers (negatives come from other speakers)")
    by_spk = np.argsort(inv, kind="stable")
    counts = np.bincount(inv, minlength=n_spk)
    offsets = np.r_[0, np.cumsum(counts)[:-1]]
    eligible = np.flatnonzero(counts >= 2)
    if eligible.size == 0:
        raise ValueError("no speaker has >= 2 utterances; cannot form anchor/positive pairs")

    rng = np.random.default_rng(seed)
    sims = np.empty((eligible.size, 1 + num_negatives))
    for row, k in enumerate(eligible):
        anchor_pos = by_spk[offsets[k] + rng.choice(counts[k], size=2, replace=False)]
        # other speakers with replacement: draw from n_spk-1 slots and skip over k
        neg_spk = rng.integers(0, n_spk - 1, size=num_negatives)
        neg_spk += neg_spk >= k
        neg_utt = by_spk[offsets[neg_spk] + rng.integers(0, counts[neg_spk])]
        a = x[anchor_pos[0]]
        sims[row, 0] = a @ x[anchor_pos[1]]
        sims[row, 1:] = x[neg_utt] @ a

    grid = np.arange(0.0, 1.0, 0.001) if thresholds is None else np.asarray(thresholds, dtype=np.float64).ravel()
    if grid.size == 0:
        raise ValueError("thresholds must not be empty")
    out = _original_grid_metrics(sims[:, 0], sims[:, 1:].ravel(), grid)
    out.update(speakers=int(eligible.size), positives=int(eligible.size), negatives=int(sims[:, 1:].size))
    return out


def _original_grid_metrics(pos_scores, neg_scores, grid):
    """Reference eval_metrics on a threshold grid (decision ``score > t``), vectorised with sorted scores."""
    pos = np.sort(np.asarray(pos_scores, dtype=np.float64))
    neg = np.sort(np.asarray(neg_scores, dtype=np.float64))
    n_pos, n_neg = pos.size, neg.size
    # number of scores strictly above each grid threshold, for all thresholds at once
    tp = n_pos - np.searchsorted(pos, grid, side="right")
    fp = n_neg - np.searchsorted(neg, grid, side="right")
    fn = n_pos - tp
    tn = n_neg - fp
    tpr = tp / n_pos
    far = fp / n_neg
    accepted = tp + fp
    precision = np.divide(tp, accepted, out=np.zeros(grid.size), where=accepted > 0)
    f = 2.0 * precision * tpr / (precision + tpr + 1e-12)
    acc = (tp + tn) / (n_pos + n_neg)
    best = int(np.argmax(f))  # argmax returns the first maximum, as in the reference
    frr = fn / n_pos
    e = int(np.argmin(np.abs(frr - far)))  # first minimum, as the reference's strict "<" scan
    return {
        "f_measure": float(f[best]),
        "tpr": float(tpr[best]),
        "accuracy": float(acc[best]),
        "eer_grid": float((frr[e] + far[e]) / 2.0),
        "threshold": float(grid[best]),
    }

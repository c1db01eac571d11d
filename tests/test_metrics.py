"""Tests for voiceprint.evaluation.metrics (hand-computed cases + cross-checks against brute force / sklearn)."""

import json
import time

import numpy as np
import pandas as pd
import pytest

from voiceprint.evaluation import metrics as M
from voiceprint.evaluation.metrics import (
    bootstrap_eer_ci,
    det_points,
    eer,
    min_dcf,
    original_protocol,
    roc_curve,
    score_summary,
)


# --------------------------------------------------------------------------------------------------------
# hand-computed EER cases. Rule: accept iff score >= t. fpr = accepted non-targets / N,
# fnr = rejected targets / T. The last threshold is nextafter(max score) (reject all).
# --------------------------------------------------------------------------------------------------------
def test_eer_hand_alternating():
    # scores 0.1 0.2 0.3 0.4 / labels 0 1 0 1   (T = {0.2, 0.4}, N = {0.1, 0.3})
    #   t      fpr   fnr   fnr-fpr
    #   0.1    1     0     -1
    #   0.2    1/2   0     -1/2
    #   0.3    1/2   1/2    0      <- exact crossing, EER = 0.5 at t = 0.3
    #   0.4    0     1/2   +1/2
    #   0.4+   0     1     +1
    fpr, fnr, thr = roc_curve([0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1])
    np.testing.assert_array_equal(fpr, [1, 0.5, 0.5, 0, 0])
    np.testing.assert_array_equal(fnr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_array_equal(thr[:4], [0.1, 0.2, 0.3, 0.4])
    assert thr[4] == np.nextafter(0.4, np.inf)
    assert eer([0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1]) == (0.5, 0.3)


def test_eer_hand_interpolated_symmetric():
    # scores 1..5 / labels 0 1 0 0 1   (T = {2, 5}, N = {1, 3, 4})
    #   t   fpr   fnr   fnr-fpr
    #   1   1     0     -1
    #   2   2/3   0     -2/3
    #   3   2/3   1/2   -1/6
    #   4   1/3   1/2   +1/6     crossing between t=3 and t=4: a = (1/6)/(1/3) = 1/2
    #   5   1/3   1     +2/3     EER = 1/2 + a*0 = 2/3 + a*(-1/3) = 1/2, threshold = 3 + a = 3.5
    e, t = eer([1, 2, 3, 4, 5], [0, 1, 0, 0, 1])
    assert e == pytest.approx(0.5, abs=1e-15)
    assert t == pytest.approx(3.5, abs=1e-15)


def test_eer_hand_interpolated_asymmetric():
    # scores 1..5 / labels 0 0 1 0 1   (T = {3, 5}, N = {1, 2, 4})
    #   t   fpr   fnr   fnr-fpr
    #   1   1     0     -1
    #   2   2/3   0     -2/3
    #   3   1/3   0     -1/3
    #   4   1/3   1/2   +1/6     a = (1/3) / (1/3 + 1/6) = 2/3
    #   5   0     1/2   +1/2     EER = 0 + a*1/2 = 1/3 (= fpr 1/3 + a*0), threshold = 3 + 2/3
    e, t = eer([1, 2, 3, 4, 5], [0, 0, 1, 0, 1])
    assert e == pytest.approx(1 / 3, abs=1e-15)
    assert t == pytest.approx(3 + 2 / 3, abs=1e-15)


def test_eer_hand_exact_point_non_half():
    # scores 1..6 / labels 0 0 1 0 1 1   (T = {3, 5, 6}, N = {1, 2, 4})
    #   t   fpr   fnr
    #   1   1     0
    #   2   2/3   0
    #   3   1/3   0
    #   4   1/3   1/3   <- exact crossing: EER = 1/3 at t = 4
    e, t = eer([1, 2, 3, 4, 5, 6], [0, 0, 1, 0, 1, 1])
    assert e == pytest.approx(1 / 3, abs=1e-15)
    assert t == 4.0


def test_eer_perfect_and_inverted():
    # perfectly separated: at t = 0.3 fpr = fnr = 0 -> EER 0, lowest threshold achieving it
    assert eer([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == (0.0, 0.3)
    # perfectly inverted: scores 0.1 (target) 0.2 (non-target)
    #   t     fpr  fnr
    #   0.1   1    0
    #   0.2   1    1    <- fnr == fpr: EER = 1
    #   0.2+  0    1
    assert eer([0.1, 0.2], [1, 0]) == (1.0, 0.2)
    assert eer([0.1, 0.2, 0.3, 0.4], [1, 1, 0, 0])[0] == 1.0


def test_eer_ties_form_one_threshold():
    # scores 1 2 2 3 / labels 0 1 0 1: the tie at 2 is one operating point
    #   t    fpr  fnr   fnr-fpr
    #   1    1    0     -1
    #   2    1/2  0     -1/2
    #   3    0    1/2   +1/2     a = 1/2 -> EER 1/4, threshold 2.5
    #   3+   0    1
    fpr, fnr, thr = roc_curve([1, 2, 2, 3], [0, 1, 0, 1])
    assert thr.size == 4
    np.testing.assert_array_equal(fpr, [1, 0.5, 0, 0])
    np.testing.assert_array_equal(fnr, [0, 0, 0.5, 1])
    e, t = eer([1, 2, 2, 3], [0, 1, 0, 1])
    assert e == pytest.approx(0.25, abs=1e-15)
    assert t == pytest.approx(2.5, abs=1e-15)
    # all scores tied: only accept-all and reject-all exist, crossing halfway
    e, t = eer([0.7, 0.7, 0.7], [1, 0, 0])
    assert e == pytest.approx(0.5)
    assert t == pytest.approx(0.7)


def test_negative_scores_are_ordinary_scores():
    # same ordering as the alternating case, shifted below zero
    assert eer([-3.0, -2.0, -1.0, 0.5], [0, 1, 0, 1]) == (0.5, -1.0)
    fpr, fnr, thr = roc_curve([-3.0, -2.0, -1.0, 0.5], [0, 1, 0, 1])
    assert thr[0] == -3.0 and fpr[0] == 1.0 and fnr[0] == 0.0


def _random_trials(rng, n=400, tie_decimals=None):
    y = (rng.random(n) < 0.3).astype(int)
    y[:2] = [0, 1]
    s = rng.normal(size=n) + 1.5 * y - 0.5
    if tie_decimals is not None:
        s = np.round(s, tie_decimals)
    return s, y


@pytest.mark.parametrize("decimals", [None, 1])
def test_threshold_semantics_brute_force(decimals):
    rng = np.random.default_rng(1)
    s, y = _random_trials(rng, tie_decimals=decimals)
    fpr, fnr, thr = roc_curve(s, y)
    assert np.all(np.diff(thr) > 0)
    assert np.all(np.diff(fpr) <= 0) and np.all(np.diff(fnr) >= 0)
    assert (fpr[0], fnr[0], fpr[-1], fnr[-1]) == (1.0, 0.0, 0.0, 1.0)
    assert thr.size == np.unique(s).size + 1
    for f, m, t in zip(fpr, fnr, thr):
        assert f == pytest.approx(np.mean(s[y == 0] >= t), abs=1e-12)
        assert m == pytest.approx(np.mean(s[y == 1] < t), abs=1e-12)


def _interp_eer(fpr, fnr, thr):
    """Independent re-implementation of the documented interpolation (on any ascending-threshold curve)."""
    d = fnr - fpr
    i = np.flatnonzero(d >= 0)[0]
    if d[i] == 0:
        return fnr[i], thr[i]
    j = i - 1
    a = (fpr[j] - fnr[j]) / ((fnr[i] - fpr[i]) - (fnr[j] - fpr[j]))
    return fnr[j] + a * (fnr[i] - fnr[j]), thr[j] + a * (thr[i] - thr[j])


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_sklearn_roc(seed):
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    s, y = _random_trials(rng, n=2000, tie_decimals=2 if seed % 2 else None)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(y, s, drop_intermediate=False)
    # sklearn: descending thresholds with a leading +inf (reject all); ours: ascending, finite reject-all
    sk_fpr, sk_fnr, sk_thr = sk_fpr[::-1], 1.0 - sk_tpr[::-1], sk_thr[::-1]
    fpr, fnr, thr = roc_curve(s, y)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(fnr, sk_fnr, atol=1e-12)
    np.testing.assert_array_equal(thr[:-1], sk_thr[:-1])
    e_ref, _ = _interp_eer(sk_fpr, sk_fnr, sk_thr)
    e, t = eer(s, y)
    assert abs(e - e_ref) < 1e-9
    # the returned threshold's operating point really is near the EER
    assert np.mean(s[y == 0] >= t) == pytest.approx(e, abs=0.02)


def test_weights_equal_repetition_and_zero_weight_equals_removal():
    rng = np.random.default_rng(3)
    s, y = _random_trials(rng, n=300, tie_decimals=1)
    w = rng.integers(0, 4, size=s.size)
    w[:2] = 1  # keep one target and one non-target
    rep_s, rep_y = np.repeat(s, w), np.repeat(y, w)
    assert eer(s, y, weights=w)[0] == pytest.approx(eer(rep_s, rep_y)[0], abs=1e-12)
    assert min_dcf(s, y, weights=w)[0] == pytest.approx(min_dcf(rep_s, rep_y)[0], abs=1e-12)
    with pytest.raises(ValueError, match="weights"):
        roc_curve(s, y, weights=-w)


# --------------------------------------------------------------------------------------------------------
# minDCF
# --------------------------------------------------------------------------------------------------------
def test_min_dcf_hand():
    s, y = [0.1, 0.2, 0.3, 0.4], [0, 1, 0, 1]
    # operating points (t: fpr, fnr): 0.1:(1,0) 0.2:(.5,0) 0.3:(.5,.5) 0.4:(0,.5) 0.4+:(0,1)
    # p_target 0.5: norm 0.5, DCF = fnr + fpr -> 1, .5, 1, .5, 1 -> 0.5, first at t = 0.2
    assert min_dcf(s, y, p_target=0.5) == (0.5, 0.2)
    # p_target 0.01: norm 0.01, DCF = fnr + 99 fpr -> 99, 49.5, 50, 0.5, 1 -> 0.5 at t = 0.4
    v, t = min_dcf(s, y, p_target=0.01)
    assert v == pytest.approx(0.5) and t == 0.4
    # c_miss 10, p 0.5: norm min(5, .5) = .5, DCF = 10 fnr + fpr -> 1, .5, 5.5, 5, 10 -> 0.5 at t = 0.2
    v, t = min_dcf(s, y, p_target=0.5, c_miss=10.0)
    assert v == pytest.approx(0.5) and t == 0.2


def test_min_dcf_bounds():
    # perfect system costs 0; an inverted one can do no better than a trivial system, which costs exactly 1
    assert min_dcf([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1])[0] == 0.0
    for p in (0.001, 0.01, 0.5, 0.9):
        assert min_dcf([0.1, 0.2, 0.3, 0.4], [1, 1, 0, 0], p_target=p)[0] == pytest.approx(1.0)
    rng = np.random.default_rng(7)
    for _ in range(20):
        s, y = _random_trials(rng, n=200)
        s = s * rng.choice([-1, 1])  # sometimes worse than chance
        for p in (0.01, 0.05, 0.5):
            v, _ = min_dcf(s, y, p_target=p)
            assert 0.0 <= v <= 1.0 + 1e-12
    with pytest.raises(ValueError):
        min_dcf([0, 1], [0, 1], p_target=0.0)


# --------------------------------------------------------------------------------------------------------
# DET points, summary
# --------------------------------------------------------------------------------------------------------
def test_det_points_downsampled_monotone_keeps_key_points():
    rng = np.random.default_rng(11)
    s, y = _random_trials(rng, n=5000)
    df = det_points(s, y, max_points=50)
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == ["threshold", "fpr", "fnr", "tpr"]
    assert 4 <= len(df) <= 50
    assert np.all(np.diff(df["threshold"]) > 0)
    assert np.all(np.diff(df["fpr"]) <= 0) and np.all(np.diff(df["fnr"]) >= 0)
    np.testing.assert_allclose(df["tpr"], 1 - df["fnr"])
    fpr, fnr, thr = roc_curve(s, y)
    assert df.iloc[0][["fpr", "fnr"]].tolist() == [1.0, 0.0]
    assert df.iloc[-1][["fpr", "fnr"]].tolist() == [0.0, 1.0]
    i = int(np.argmax(fnr - fpr >= 0))
    assert thr[i - 1] in set(df["threshold"]) and thr[i] in set(df["threshold"])
    # small curves are returned whole
    assert len(det_points([0.1, 0.2, 0.3], [0, 1, 1], max_points=50)) == 4
    with pytest.raises(ValueError):
        det_points(s, y, max_points=3)


def test_unweighted_curve_with_ties_equals_the_stable_weighted_one():
    # unweighted trials take numpy's unstable sort; counts before each group of equal scores cannot depend on the
    # order inside the group, so the curve is the one the stable (weighted) path gives with unit weights
    rng = np.random.default_rng(3)
    s, y = _random_trials(rng, n=20000)
    s = np.round(s, 1)  # ~100 distinct scores: big groups of ties
    for got, expected in zip(roc_curve(s, y), roc_curve(s, y, weights=np.ones(s.size))):
        np.testing.assert_array_equal(got, expected)


def test_score_summary_sorts_once(monkeypatch):
    calls = []
    sort = M._sort_trials
    monkeypatch.setattr(M, "_sort_trials", lambda *a, **k: calls.append(1) or sort(*a, **k))
    s, y = _random_trials(np.random.default_rng(1), n=500)
    M.score_summary(s, y)
    assert len(calls) == 1


def test_score_summary_json_and_counts():
    rng = np.random.default_rng(5)
    s, y = _random_trials(rng, n=1000)
    summ = score_summary(s, y, p_target=0.05)
    json.loads(json.dumps(summ, allow_nan=False))
    assert set(summ) == {"eer", "eer_threshold", "min_dcf", "min_dcf_threshold", "p_target",
                         "target_trials", "nontarget_trials"}
    for k, v in summ.items():
        assert type(v) is (int if k.endswith("_trials") else float), k
    assert summ["target_trials"] == int(y.sum())
    assert summ["nontarget_trials"] == int((1 - y).sum())
    assert (summ["eer"], summ["eer_threshold"]) == eer(s, y)
    assert (summ["min_dcf"], summ["min_dcf_threshold"]) == min_dcf(s, y, p_target=0.05)
    # perfectly separated: the reject-all threshold is finite, so strict JSON still works
    json.dumps(score_summary([0.0, 1.0], [0, 1]), allow_nan=False)


# --------------------------------------------------------------------------------------------------------
# speaker bootstrap
# --------------------------------------------------------------------------------------------------------
def _speaker_trials(n_spk, seed, tgt_per_spk=10, non_per_spk=40):
    """Synthetic trials with per-speaker score offsets (so trials of one speaker are correlated)."""
    rng = np.random.default_rng(seed)
    off = rng.normal(0, 0.7, n_spk)
    ta = np.repeat(np.arange(n_spk), tgt_per_spk)
    t_scores = 2.0 + off[ta] + rng.normal(size=ta.size)
    na = np.repeat(np.arange(n_spk), non_per_spk)
    nb = (na + rng.integers(1, n_spk, size=na.size)) % n_spk  # a different speaker
    n_scores = 0.5 * (off[na] + off[nb]) + rng.normal(size=na.size)
    s = np.r_[t_scores, n_scores]
    y = np.r_[np.ones(ta.size, int), np.zeros(na.size, int)]
    # speaker ids as strings: any hashable id must work
    names = np.array([f"spk{i:04d}" for i in range(n_spk)])
    return s, y, names[np.r_[ta, na]], names[np.r_[ta, nb]]


def test_bootstrap_ci_contains_estimate_and_narrows():
    s, y, a, b = _speaker_trials(20, seed=0)
    lo, hi = bootstrap_eer_ci(s, y, a, b, n_boot=200, seed=0)
    e, _ = eer(s, y)
    assert lo <= e <= hi and lo < hi
    assert (lo, hi) == bootstrap_eer_ci(s, y, a, b, n_boot=200, seed=0)  # deterministic
    s2, y2, a2, b2 = _speaker_trials(300, seed=0)
    lo2, hi2 = bootstrap_eer_ci(s2, y2, a2, b2, n_boot=200, seed=0)
    assert lo2 <= eer(s2, y2)[0] <= hi2
    assert hi2 - lo2 < 0.6 * (hi - lo)
    # wider than alpha=0.5 interval
    lo3, hi3 = bootstrap_eer_ci(s2, y2, a2, b2, n_boot=200, seed=0, alpha=0.5)
    assert lo2 <= lo3 <= hi3 <= hi2


def test_bootstrap_is_fast_on_200k_trials():
    rng = np.random.default_rng(0)
    n, k = 200_000, 1000
    a = rng.integers(0, k, n)
    b = np.where(rng.random(n) < 0.1, a, rng.integers(0, k, n))
    y = (a == b).astype(int)
    s = rng.normal(size=n) + 2 * y
    t0 = time.perf_counter()
    lo, hi = bootstrap_eer_ci(s, y, a, b, n_boot=50, seed=1)
    assert time.perf_counter() - t0 < 8.0  # ~0.3 s on 2 cores; generous for a busy machine
    assert lo <= eer(s, y)[0] <= hi


def test_bootstrap_input_checks():
    with pytest.raises(ValueError, match="one entry per trial"):
        bootstrap_eer_ci([0.1, 0.2], [0, 1], ["a"], ["a", "b"])


# --------------------------------------------------------------------------------------------------------
# original Deep Speaker protocol
# --------------------------------------------------------------------------------------------------------
def _reference_loop(pos, neg, grid):
    """Loop transcription of the reference eval_metrics semantics (score > t, 0 when undefined)."""
    sims = np.r_[pos, neg]
    lab = np.r_[np.ones(pos.size, bool), np.zeros(neg.size, bool)]
    rows = []
    for t in grid:
        pred = sims > t
        tp = np.sum(pred & lab); fp = np.sum(pred & ~lab)
        tn = np.sum(~pred & ~lab); fn = np.sum(~pred & lab)
        tpr = tp / (tp + fn) if tp + fn else 0.0
        prec = tp / (tp + fp) if tp + fp else 0.0
        f = 2 * prec * tpr / (prec + tpr + 1e-12)
        frr, far = 1 - tp / lab.sum(), fp / (~lab).sum()
        rows.append((f, tpr, (tp + tn) / sims.size, frr, far))
    r = np.array(rows)
    best = int(np.argmax(r[:, 0]))
    e = int(np.argmin(np.abs(r[:, 3] - r[:, 4])))
    return dict(f_measure=r[best, 0], tpr=r[best, 1], accuracy=r[best, 2],
                eer_grid=(r[e, 3] + r[e, 4]) / 2, threshold=grid[best])


def test_original_grid_matches_reference_loop():
    rng = np.random.default_rng(2)
    pos = np.clip(rng.normal(0.6, 0.2, 50), -1, 1)
    neg = np.clip(rng.normal(0.1, 0.2, 50 * 99), -1, 1)
    grid = np.arange(0, 1, 0.001)
    ours = M._original_grid_metrics(pos, neg, grid)
    ref = _reference_loop(pos, neg, grid)
    for k in ref:
        assert ours[k] == pytest.approx(ref[k], abs=1e-12), k


def test_original_protocol_perfect_embeddings():
    rng = np.random.default_rng(0)
    n_spk, per = 30, 4
    spk = np.repeat([f"s{i:02d}" for i in range(n_spk)], per)
    emb = np.eye(n_spk)[np.repeat(np.arange(n_spk), per)] * rng.uniform(0.5, 3, (n_spk * per, 1))  # unnormalised
    res = original_protocol(emb, spk)
    assert res["f_measure"] == pytest.approx(1.0, abs=1e-9)
    assert res["tpr"] == 1.0 and res["accuracy"] == 1.0 and res["eer_grid"] == 0.0
    assert (res["speakers"], res["positives"], res["negatives"]) == (30, 30, 30 * 99)
    json.dumps(res)


def test_original_protocol_random_embeddings_deterministic():
    rng = np.random.default_rng(4)
    n_spk, per, dim = 200, 3, 64
    spk = np.repeat(np.arange(n_spk), per)
    emb = rng.normal(size=(n_spk * per, dim))
    # one extra speaker with a single utterance: skipped as anchor, still usable as a negative
    emb = np.vstack([emb, rng.normal(size=(1, dim))])
    spk = np.r_[spk, n_spk]
    res = original_protocol(emb, spk, seed=123)
    assert res == original_protocol(emb, spk, seed=123)
    assert res != original_protocol(emb, spk, seed=124)
    assert res["speakers"] == n_spk and res["negatives"] == n_spk * 99
    assert all(type(v) in (int, float) for v in res.values())
    # chance-level system: precision ~1% everywhere, so max F ~ 2 * 0.01 * R / (0.01 + R) ~ 0.02 is reached at
    # the lowest grid thresholds (accepting ~half of everything) -> accuracy there is ~0.5, NOT ~0.99
    assert res["f_measure"] < 0.05
    assert res["threshold"] < 0.15
    assert 0.3 < res["accuracy"] < 0.9
    assert 0.4 < res["eer_grid"] < 0.6


def test_original_protocol_accuracy_dominated_by_negatives():
    # always-reject (every score below the grid): F = 0 everywhere, yet accuracy = 99/100
    out = M._original_grid_metrics(np.full(10, -0.5), np.full(990, -0.5), np.arange(0, 1, 0.001))
    assert out["f_measure"] == 0.0 and out["tpr"] == 0.0
    assert out["accuracy"] == pytest.approx(0.99)
    # weakly informative embeddings (speaker centre + heavy noise): EER ~20%, yet accuracy ~0.98
    rng = np.random.default_rng(0)
    n_spk, per, dim = 200, 3, 64
    spk = np.repeat(np.arange(n_spk), per)
    emb = rng.normal(size=(n_spk, dim))[spk] + 2.0 * rng.normal(size=(n_spk * per, dim))
    res = original_protocol(emb, spk)
    assert 0.1 < res["eer_grid"] < 0.35
    assert res["f_measure"] < 0.5
    assert 0.97 < res["accuracy"] < 1.0


def test_original_protocol_input_checks():
    with pytest.raises(ValueError, match="2 speakers"):
        original_protocol(np.ones((3, 4)), [0, 0, 0])
    with pytest.raises(ValueError, match=">= 2 utterances"):
        original_protocol(np.eye(3), [0, 1, 2])
    with pytest.raises(ValueError, match="one entry per embedding"):
        original_protocol(np.eye(3), [0, 1])


# --------------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "scores,labels,match",
    [
        ([0.1, 0.2], [0, 1, 1], "equal lengths"),
        ([0.1, 0.2], [0, 2], "0/1"),
        ([0.1, 0.2], [1, 1], "non-target"),
        ([0.1, 0.2], [0, 0], "target"),
        ([0.1, np.nan], [0, 1], "finite"),
        ([0.1, np.inf], [0, 1], "finite"),
        ([], [], "empty"),
    ],
)
def test_validation(scores, labels, match):
    for fn in (roc_curve, eer, min_dcf, score_summary, det_points):
        with pytest.raises(ValueError, match=match):
            fn(scores, labels)


def test_boolean_labels_accepted():
    assert eer([0.1, 0.2, 0.3, 0.4], np.array([False, True, False, True])) == (0.5, 0.3)


def test_threshold_at_far_known_values():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    labels = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 0])        # 8 non-targets
    # accept iff score >= t: down to t=0.7 only the non-target at 0.8 passes (1 of 8 = 12.5%)
    assert M.threshold_at_far(scores, labels, 0.125) == pytest.approx(0.7)
    assert M.threshold_at_far(scores, labels, 0.1) == pytest.approx(0.9)     # no false accepts
    assert M.threshold_at_far(scores, labels, 1.0) == pytest.approx(0.0)

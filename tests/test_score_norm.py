"""AS-norm: a hand-computed case, the properties that make it useful, the cohort, and its errors."""
import numpy as np
import pandas as pd
import pytest

from voiceprint.core.embedding import unit_rows
from voiceprint.evaluation import score_norm as N
from voiceprint.evaluation.scoring import as_norm_scores, cosine_scores

# Four cohort speakers on the axes of the plane.
COHORT = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], dtype=np.float64)


def test_hand_computed_case():
    # enrol (1, 0): cohort scores 1, 0, -1, 0; top 2 = {1, 0}: mean 0.5, std 0.5.
    # enrol (0, 1): cohort scores 0, 1, 0, -1; top 2 = {1, 0}: mean 0.5, std 0.5.
    # test (0.6, 0.8): cohort scores 0.6, 0.8, -0.6, -0.8; top 2 = {0.8, 0.6}: mean 0.7, std 0.1.
    # trial 1: s = 0.6 -> 0.5 * ((0.6 - 0.5) / 0.5 + (0.6 - 0.7) / 0.1) = 0.5 * (0.2 - 1.0) = -0.4
    # trial 2: s = 0.8 -> 0.5 * ((0.8 - 0.5) / 0.5 + (0.8 - 0.7) / 0.1) = 0.5 * (0.6 + 1.0) = 0.8
    enroll = np.array([[2.0, 0.0], [0.0, 0.5]])     # not unit length: AS-norm works on the directions
    test = np.array([[0.6, 0.8]])                   # one row, shared by both trials
    np.testing.assert_allclose(N.as_norm([0.6, 0.8], enroll, test, COHORT, 2), [-0.4, 0.8], atol=1e-12)
    mean, std = N.cohort_stats(test, COHORT, 2)
    np.testing.assert_allclose((mean, std), ([0.7], [0.1]), atol=1e-12)
    np.testing.assert_allclose(N.as_norm_matrix(enroll, test, COHORT, 2), [[-0.4], [0.8]], atol=1e-12)


@pytest.fixture
def random_case():
    rng = np.random.default_rng(0)
    e, t, cohort = rng.normal(size=(5, 8)), rng.normal(size=(5, 8)), rng.normal(size=(30, 8))
    s = np.einsum("ij,ij->i", unit_rows(e, np.float64), unit_rows(t, np.float64))
    return s, e, t, cohort


def test_symmetric_in_enrolment_and_test(random_case):
    s, e, t, cohort = random_case
    np.testing.assert_allclose(N.as_norm(s, e, t, cohort, 7), N.as_norm(s, t, e, cohort, 7), atol=1e-12)
    m = N.as_norm_matrix(e, e, cohort, 7)
    np.testing.assert_allclose(m, m.T, atol=1e-12)


def test_invariant_to_shift_and_scale_of_all_scores():
    # A drift shared by every score (s -> a s + b, a > 0), e.g. another training run's score scale, cancels out:
    # this is why one threshold on normalised scores transfers where a cosine threshold does not.
    rng = np.random.default_rng(1)
    s, ce, ct = rng.normal(size=6), rng.normal(size=(6, 20)), rng.normal(size=(6, 20))
    ref = N.normalise(s, N.top_n_stats(ce, 5), N.top_n_stats(ct, 5))
    moved = N.normalise(3 * s - 0.4, N.top_n_stats(3 * ce - 0.4, 5), N.top_n_stats(3 * ct - 0.4, 5))
    np.testing.assert_allclose(moved, ref, atol=1e-10)


def test_only_the_nearest_cohort_speakers_count(random_case):
    s, e, t, cohort = random_case
    ref = N.as_norm(s, e, t, cohort, 7)
    np.testing.assert_allclose(N.as_norm(s, e, t, cohort[::-1], 7), ref, atol=1e-12)   # order is irrelevant
    # An impostor far from everyone (below each row's 7th-best cohort score) changes nothing: the normalisation
    # adapts to the speakers a threshold has to reject, not to the whole population.
    rows = unit_rows(np.vstack([e, t]), np.float64)
    far = -rows.sum(axis=0, keepdims=True)
    seventh = np.sort(rows @ unit_rows(cohort, np.float64).T, axis=1)[:, -7]
    assert ((rows @ unit_rows(far, np.float64).T)[:, 0] < seventh).all()
    np.testing.assert_allclose(N.as_norm(s, e, t, np.vstack([cohort, far]), 7), ref, atol=1e-12)
    # ... while a near one does.
    assert not np.allclose(N.as_norm(s, e, t, np.vstack([cohort, e[:1]]), 7), ref)
    # With top_n = the cohort size it is the symmetric S-norm: statistics over the whole cohort.
    full = unit_rows(e, np.float64) @ unit_rows(cohort, np.float64).T
    np.testing.assert_allclose(N.cohort_stats(e, cohort, 30), (full.mean(axis=1), full.std(axis=1)), atol=1e-12)


def test_trial_scores_look_up_each_utterances_statistics():
    rng = np.random.default_rng(2)
    emb, cohort = rng.normal(size=(6, 8)), rng.normal(size=(12, 8))
    utts = np.array([f"u{i}" for i in range(6)])
    trials = pd.DataFrame({"enroll": ["u0", "u0", "u3", "u5"], "test": ["u1", "u4", "u2", "u0"]})
    a, b = [int(u[1]) for u in trials.enroll], [int(u[1]) for u in trials.test]
    expected = N.as_norm(cosine_scores(emb, utts, trials), emb[a], emb[b], cohort, 4)
    np.testing.assert_allclose(as_norm_scores(emb, utts, trials, cohort, 4), expected, atol=1e-12)
    np.testing.assert_allclose(N.as_norm_matrix(emb, emb, cohort, 4)[a, b], expected, atol=1e-12)


def test_speaker_cohort_is_one_unit_mean_per_speaker():
    emb = np.array([[2, 0], [0, 1], [0, 3], [1, 1]], dtype=np.float64)
    cohort = N.speaker_cohort(emb, ["b", "a", "b", "a"])
    # a: (0, 1) + (1, 1)/sqrt(2) -> normalised; b: (1, 0) + (0, 1) -> (1, 1)/sqrt(2)
    a = np.array([1 / np.sqrt(2), 1 + 1 / np.sqrt(2)])
    np.testing.assert_allclose(cohort, [a / np.linalg.norm(a), [2 ** -0.5, 2 ** -0.5]], atol=1e-7)
    assert cohort.dtype == np.float32


def test_pick_cohort_utterances_caps_each_training_speaker():
    split = pd.DataFrame({"utterance": [f"u{i:02d}" for i in range(12)],
                          "speaker": ["a"] * 5 + ["b"] * 2 + ["c"] * 3 + ["d"] * 2,
                          "role": ["train"] * 4 + ["validation"] + ["train"] * 5 + ["evaluation"] * 2})
    picked = N.pick_cohort_utterances(split, 3, seed=0)
    assert picked.groupby("speaker").size().to_dict() == {"a": 3, "b": 2, "c": 3}
    assert (picked.role == "train").all() and list(picked.utterance) == sorted(picked.utterance)
    assert picked.equals(N.pick_cohort_utterances(split, 3, seed=0))


def test_errors_name_the_params():
    with pytest.raises(ValueError, match=r"evaluate.score_norm: unknown score normalisation 'snorm'; "
                                         r"valid: none, as_norm"):
        N.check_score_norm("snorm")
    assert N.check_score_norm("as_norm") == "as_norm"
    with pytest.raises(ValueError, match=r"evaluate.cohort_top_n: 5 exceeds the cohort size 4"):
        N.as_norm([0.1], COHORT[:1], COHORT[1:2], COHORT, 5)
    with pytest.raises(ValueError, match=r"evaluate.cohort_top_n: expected an integer >= 2, got 1"):
        N.cohort_stats(COHORT, COHORT, 1)
    with pytest.raises(ValueError, match="embeddings are 3-d but the cohort is 2-d"):
        N.cohort_stats(np.ones((1, 3)), COHORT, 2)

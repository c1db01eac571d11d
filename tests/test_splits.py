import numpy as np
import pandas as pd
import pytest

from voiceprint.data.splits import SplitError, make_trials, split_utterances


def index(speakers=10, per=5, extra=None):
    rows = [(f"s{s:02d}-{u}", f"s{s:02d}") for s in range(speakers) for u in range(per)]
    rows += extra or []
    return pd.DataFrame(rows, columns=["utterance", "speaker"])


def test_split_is_speaker_disjoint_and_deterministic():
    a = split_utterances(index(), eval_speakers=3, validation_fraction=0.2, seed=1)
    b = split_utterances(index(), eval_speakers=3, validation_fraction=0.2, seed=1)
    pd.testing.assert_frame_equal(a, b)
    ev = set(a[a.role == "evaluation"].speaker)
    tr = set(a[a.role.isin(["train", "validation"])].speaker)
    assert len(ev) == 3 and not ev & tr and len(tr) == 7
    # 20% of 5 utterances = 1 held out per training speaker, labels dense 0..6 in sorted speaker order
    assert (a[a.role == "validation"].groupby("speaker").size() == 1).all()
    assert sorted(a[a.role == "train"].label.unique()) == list(range(7))
    assert (a[a.role == "evaluation"].label == -1).all()
    c = split_utterances(index(), eval_speakers=3, validation_fraction=0.2, seed=2)
    assert set(c[c.role == "evaluation"].speaker) != ev or not c.equals(a)


def test_speakers_with_one_utterance_are_reported_not_dropped():
    split = split_utterances(index(extra=[("lonely-0", "lonely")]), eval_speakers=2,
                             validation_fraction=0.1, seed=0)
    row = split[split.speaker == "lonely"].iloc[0]
    assert row.role == "excluded" and "1 utterance" in row.reason


def test_too_few_speakers_is_a_clear_error():
    with pytest.raises(SplitError, match="found 3 among 3 speakers"):
        split_utterances(index(speakers=3), eval_speakers=2, validation_fraction=0.1, seed=0)


def test_trials_counts_and_labels():
    split = split_utterances(index(speakers=6, per=4), eval_speakers=3, validation_fraction=0.0, seed=0)
    trials = make_trials(split, max_nontarget=10_000, seed=0)
    # 3 speakers x C(4,2) targets; C(12,2) - 18 non-targets
    assert trials.label.sum() == 18 and (trials.label == 0).sum() == 66 - 18
    assert (trials.enroll_speaker == trials.test_speaker).eq(trials.label == 1).all()
    small = make_trials(split, max_nontarget=5, seed=0)
    assert (small.label == 0).sum() == 5 and small.label.sum() == 18
    pd.testing.assert_frame_equal(small, make_trials(split, max_nontarget=5, seed=0))


def _all_pairs_trials(utterances, max_nontarget, seed):
    """The trial list by listing every pair (the definition make_trials follows without the memory)."""
    ev = utterances[utterances.role == "evaluation"].sort_values("utterance").reset_index(drop=True)
    utt, spk = ev["utterance"].to_numpy(), ev["speaker"].to_numpy()
    i, j = np.triu_indices(len(ev), k=1)
    same = spk[i] == spk[j]
    ni, nj = i[~same], j[~same]
    if len(ni) > max_nontarget:
        keep = np.sort(np.random.default_rng(seed).choice(len(ni), size=max_nontarget, replace=False))
        ni, nj = ni[keep], nj[keep]
    a, b = np.concatenate([i[same], ni]), np.concatenate([j[same], nj])
    return pd.DataFrame({"label": np.r_[np.ones(same.sum(), int), np.zeros(len(ni), int)],
                         "enroll": utt[a], "test": utt[b], "enroll_speaker": spk[a], "test_speaker": spk[b]})


def test_trials_equal_the_all_pairs_definition():
    rng = np.random.default_rng(0)
    for trial in range(60):
        # interleaved ids: a speaker's utterances are not contiguous once sorted; some speakers have one
        rows = [(f"{rng.integers(10**6):06d}-{s}-{u}", f"s{s}", "evaluation")
                for s in range(int(rng.integers(2, 9))) for u in range(int(rng.integers(1, 8)) + (s == 0))]
        split = pd.DataFrame(rows, columns=["utterance", "speaker", "role"]).drop_duplicates("utterance")
        cap = int(rng.integers(1, 40))
        pd.testing.assert_frame_equal(make_trials(split, max_nontarget=cap, seed=trial),
                                      _all_pairs_trials(split, cap, trial))


def test_trials_memory_follows_the_trials_not_the_pairs():
    import tracemalloc

    # 20,000 evaluation utterances: 200 million pairs (3.2 GB of int64 pair indices if listed)
    rows = pd.DataFrame({"utterance": [f"u{k:05d}" for k in range(20000)],
                         "speaker": [f"s{k % 400:03d}" for k in range(20000)], "role": "evaluation"})
    tracemalloc.start()
    trials = make_trials(rows, max_nontarget=1000, seed=0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert trials.label.sum() == 400 * (50 * 49 // 2) and (trials.label == 0).sum() == 1000
    assert (trials.enroll_speaker != trials.test_speaker).eq(trials.label == 0).all()
    assert peak < 150e6


def test_trials_need_targets_and_nontargets():
    one_each = pd.DataFrame({"utterance": ["a", "b", "c"], "speaker": ["x", "y", "z"], "role": "evaluation"})
    with pytest.raises(SplitError, match="gives 0 target and 3 non-target trials"):
        make_trials(one_each, max_nontarget=10, seed=0)
    one_speaker = one_each.assign(speaker="x")
    with pytest.raises(SplitError, match="gives 3 target and 0 non-target trials"):
        make_trials(one_speaker, max_nontarget=10, seed=0)
    with pytest.raises(SplitError, match="gives 0 target and 0 non-target"):
        make_trials(one_each.assign(role="train"), max_nontarget=10, seed=0)

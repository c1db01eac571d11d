import pandas as pd
import pytest

from voiceprint.splits import SplitError, make_trials, split_utterances


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

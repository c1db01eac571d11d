"""Speaker-disjoint splits and the evaluation trial list, all deterministic from one seed.

Evaluation speakers never appear in training; a share of each training speaker's utterances is held out for
softmax validation (closed-set accuracy). Trials pair utterances of evaluation speakers only.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from voiceprint.core.errors import VoiceprintError

class SplitError(VoiceprintError, ValueError):
    """The corpus cannot be split as asked (too few speakers or utterances); the message says what was found."""


def split_utterances(index: pd.DataFrame, *, eval_speakers: int, validation_fraction: float,
                     seed: int, min_utterances: int = 2) -> pd.DataFrame:
    """Assign every utterance a role. Returns columns utterance, speaker, role, label, reason.

    ``label`` is the class index of a training speaker (sorted speaker order) and -1 for others. Speakers with
    fewer than ``min_utterances`` utterances can give no target trial and no held-out utterance: they are kept in
    the table with role ``excluded`` and the reason, never dropped silently. Speakers of an added source
    (``corpus.from_added_source``) are never evaluation speakers.
    """
    from voiceprint.data.corpus import from_added_source

    counts = index.groupby("speaker")["utterance"].count()
    eligible = sorted(counts[counts >= min_utterances].index)
    candidates = [s for s in eligible if not from_added_source(s)]
    if len(candidates) < eval_speakers or len(eligible) < eval_speakers + 2:
        raise SplitError(
            f"need at least {eval_speakers + 2} speakers with >= {min_utterances} utterances "
            f"({eval_speakers} for evaluation, 2 for training); found {len(eligible)} "
            f"among {len(counts)} speakers and {len(index)} utterances"
            + (f", {len(candidates)} of them evaluable (not from an added source)"
               if len(candidates) < len(eligible) else ""))
    rng = np.random.default_rng(seed)
    evaluation = set(rng.choice(candidates, size=eval_speakers, replace=False).tolist())
    train_speakers = [s for s in eligible if s not in evaluation]
    labels = {s: i for i, s in enumerate(train_speakers)}

    rows = []
    for speaker, group in index.sort_values(["speaker", "utterance"]).groupby("speaker", sort=True):
        utts = group["utterance"].tolist()
        if speaker not in labels and speaker not in evaluation:
            rows += [(u, speaker, "excluded", -1, f"speaker has {len(utts)} utterance(s) < {min_utterances}")
                     for u in utts]
            continue
        if speaker in evaluation:
            rows += [(u, speaker, "evaluation", -1, "") for u in utts]
            continue
        # Hold out a share for validation but always keep at least one utterance for training.
        n_val = min(int(round(validation_fraction * len(utts))), len(utts) - 1)
        held = set(rng.choice(utts, size=n_val, replace=False).tolist()) if n_val > 0 else set()
        rows += [(u, speaker, "validation" if u in held else "train", labels[speaker], "") for u in utts]
    return pd.DataFrame(rows, columns=["utterance", "speaker", "role", "label", "reason"])


def make_trials(utterances: pd.DataFrame, *, max_nontarget: int, seed: int) -> pd.DataFrame:
    """Every target pair of evaluation utterances, and all non-target pairs (or a seeded sample of
    ``max_nontarget`` of them). Columns: label (1 target / 0 non-target), enroll, test, enroll_speaker,
    test_speaker.

    Pairs (i, j), i < j, of the evaluation utterances sorted by id, in row-major order; the sample is
    ``rng.choice(number of non-target pairs, max_nontarget, replace=False)``, sorted: positions in that order.
    Non-target pairs are counted, not listed, so memory follows the trials returned, not the pairs possible
    (10,000 evaluation utterances make 50 million pairs).
    """
    ev = utterances[utterances.role == "evaluation"].sort_values("utterance").reset_index(drop=True)
    utt, spk = ev["utterance"].to_numpy(), ev["speaker"].to_numpy()
    n = len(ev)
    codes = pd.factorize(spk)[0]
    grouped = np.argsort(codes, kind="stable")  # utterance numbers by speaker, ascending within a speaker
    counts = np.bincount(codes)
    place = np.empty(n, np.int64)  # position of each utterance in `grouped`
    place[grouped] = np.arange(n)
    later_same = (np.cumsum(counts) - 1)[codes] - place  # same-speaker utterances after each one

    # targets: each utterance with the later ones of its speaker, then sorted into row-major order
    x = np.repeat(np.arange(n), later_same[grouped])  # positions in `grouped` of the first utterance of a pair
    partner = x + 1 + np.arange(len(x)) - np.repeat(np.cumsum(later_same[grouped]) - later_same[grouped],
                                                    later_same[grouped])
    ti, tj = grouped[x], grouped[partner]
    order = np.argsort(ti * n + tj)
    ti, tj = ti[order], tj[order]

    nontargets_after = (n - 1 - np.arange(n)) - later_same  # non-target pairs in row i
    total = int(nontargets_after.sum())
    if len(ti) == 0 or total == 0:
        raise SplitError(f"evaluation set gives {len(ti)} target and {total} non-target trials; need both")
    if total > max_nontarget:
        keep = np.sort(np.random.default_rng(seed).choice(total, size=max_nontarget, replace=False))
    else:
        keep = np.arange(total)
    ni, nj = _nontarget_pairs(keep, nontargets_after, codes, grouped, place)
    a = np.concatenate([ti, ni])
    b = np.concatenate([tj, nj])
    return pd.DataFrame({
        "label": np.concatenate([np.ones(len(ti), int), np.zeros(len(ni), int)]),
        "enroll": utt[a], "test": utt[b], "enroll_speaker": spk[a], "test_speaker": spk[b],
    })


def _nontarget_pairs(positions, per_row, codes, grouped, place):
    """(i, j) of the non-target pairs at ``positions`` in row-major order, without listing the others.

    Row i = the pairs (i, j > i) whose speakers differ: ``per_row[i]`` of them.  The q-th of them is
    j = i + 1 + q + c, c = the same-speaker utterances skipped, i.e. those s > i of i's speaker with fewer than
    q + 1 other-speaker utterances between i and s.  Within a speaker's run of `grouped` (positions x), the
    other-speaker utterances between the first member and member x number grouped[x] - x - (the same for the
    first): key[x] = grouped[x] - x is non-decreasing in a run, so c is a binary search.
    """
    n = len(codes)
    row_start = np.cumsum(per_row) - per_row
    i = np.searchsorted(row_start, positions, side="right") - 1  # rows without pairs share the next row's start
    q = positions - row_start[i]
    offset = 3 * n + 1  # > the spread of grouped[x] - x: keeps every speaker's keys above the previous ones'
    key = grouped - np.arange(n) + codes[grouped] * offset
    g = place[i]
    skipped = np.searchsorted(key, q + key[g], side="right") - (g + 1)
    return i, i + 1 + q + skipped


def read_split(directory) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(utterances, trials) as written by the model_inputs stage."""
    from pathlib import Path

    directory = Path(directory)
    text = {"utterance": str, "speaker": str, "enroll": str, "test": str, "enroll_speaker": str,
            "test_speaker": str, "reason": str}
    return (pd.read_csv(directory / "utterances.csv", dtype=text, keep_default_na=False),
            pd.read_csv(directory / "trials.csv", dtype=text))


def existing(*paths) -> list:
    """The given paths that exist (optional inputs of a training stage's resume fingerprint)."""
    from pathlib import Path

    return [p for p in paths if Path(p).exists()]


def training_inputs(features_dir, inputs_dir, augmented_dir=None):
    """(store, utterances) the training stages read: the corpus' feature store and split, joined by the augmented
    copies of the training utterances when ``augmented_dir`` holds any (the augment stage's output)."""
    from pathlib import Path

    from voiceprint.data.store import FeatureStore

    store = FeatureStore.open(features_dir)
    split, _ = read_split(inputs_dir)
    if augmented_dir is None or not (Path(augmented_dir) / "utterances.csv").exists():
        return store, split
    extra = pd.read_csv(Path(augmented_dir) / "utterances.csv", dtype={"utterance": str, "speaker": str,
                                                                       "reason": str}, keep_default_na=False)
    if extra.empty:
        return store, split
    return FeatureStore.union(store, FeatureStore.open(augmented_dir)), pd.concat([split, extra], ignore_index=True)

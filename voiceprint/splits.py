"""Speaker-disjoint splits and the evaluation trial list, all deterministic from one seed.

Evaluation speakers never appear in training; a share of each training speaker's utterances is held out for
softmax validation (closed-set accuracy). Trials pair utterances of evaluation speakers only.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

ROLES = ("train", "validation", "evaluation", "excluded")


class SplitError(ValueError):
    """The corpus cannot be split as asked (too few speakers or utterances); the message says what was found."""


def split_utterances(index: pd.DataFrame, *, eval_speakers: int, validation_fraction: float,
                     seed: int, min_utterances: int = 2) -> pd.DataFrame:
    """Assign every utterance a role. Returns columns utterance, speaker, role, label, reason.

    ``label`` is the class index of a training speaker (sorted speaker order) and -1 for others. Speakers with
    fewer than ``min_utterances`` utterances can give no target trial and no held-out utterance: they are kept in
    the table with role ``excluded`` and the reason, never dropped silently.
    """
    counts = index.groupby("speaker")["utterance"].count()
    eligible = sorted(counts[counts >= min_utterances].index)
    if len(eligible) < eval_speakers + 2:
        raise SplitError(
            f"need at least {eval_speakers + 2} speakers with >= {min_utterances} utterances "
            f"({eval_speakers} for evaluation, 2 for training); found {len(eligible)} "
            f"among {len(counts)} speakers and {len(index)} utterances")
    rng = np.random.default_rng(seed)
    evaluation = set(rng.choice(eligible, size=eval_speakers, replace=False).tolist())
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
    test_speaker."""
    ev = utterances[utterances.role == "evaluation"].sort_values("utterance").reset_index(drop=True)
    utt, spk = ev["utterance"].to_numpy(), ev["speaker"].to_numpy()
    i, j = np.triu_indices(len(ev), k=1)
    same = spk[i] == spk[j]
    ti, tj = i[same], j[same]
    ni, nj = i[~same], j[~same]
    if len(ti) == 0 or len(ni) == 0:
        raise SplitError(f"evaluation set gives {len(ti)} target and {len(ni)} non-target trials; need both")
    if len(ni) > max_nontarget:
        keep = np.sort(np.random.default_rng(seed).choice(len(ni), size=max_nontarget, replace=False))
        ni, nj = ni[keep], nj[keep]
    a = np.concatenate([ti, ni])
    b = np.concatenate([tj, nj])
    return pd.DataFrame({
        "label": np.concatenate([np.ones(len(ti), int), np.zeros(len(ni), int)]),
        "enroll": utt[a], "test": utt[b], "enroll_speaker": spk[a], "test_speaker": spk[b],
    })


def read_split(directory) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(utterances, trials) as written by the model_inputs stage."""
    from pathlib import Path

    directory = Path(directory)
    text = {"utterance": str, "speaker": str, "enroll": str, "test": str, "enroll_speaker": str,
            "test_speaker": str, "reason": str}
    return (pd.read_csv(directory / "utterances.csv", dtype=text, keep_default_na=False),
            pd.read_csv(directory / "trials.csv", dtype=text))

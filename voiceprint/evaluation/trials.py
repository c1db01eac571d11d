"""Standard trial lists: read Kaldi and VoxCeleb lists, resolve their entries, score them with a bundle.

Two formats, one trial per line, fields separated by white space (blank lines are skipped):

* Kaldi ``trials``:  ``<enroll> <test> target|nontarget``
* VoxCeleb (``veri_test2.txt``):  ``1|0 <enroll> <test>`` (1 = same speaker)

The format is recognised from the first trial line (a last field ``target``/``nontarget``: Kaldi; a first field
``1``/``0``: VoxCeleb) and every other line must follow it; a line that does not is an error naming the file and
the line number.

Entries are resolved in one of two ways (:func:`resolve`):

* ``voiceprint score --trials FILE --audio-root DIR``: an entry is an audio path relative to ``DIR`` (VoxCeleb's
  ``id10270/5r0dWxy17C8/00001.wav``; an absolute path is used as it is);
* the ``evaluate`` stage (``evaluate.trials``): an entry is an utterance id of the pipeline's feature store
  (``data/features/index.csv``), or its ``path`` there (relative to ``data/raw``); only evaluation utterances
  (``data/model_inputs``, role ``evaluation``) can be scored, since the others' speakers were trained on.

A trial whose entry cannot be resolved (a missing file, an unknown id, an unusable recording) is never dropped
silently: it is counted in the summary (``missing_trials``, ``missing_entries``), listed with its reason in the
``--out`` table and the ``evaluate`` log, and the scores cover the rest.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pandas as pd

from voiceprint.core.errors import DataError

FORMATS = ("kaldi", "voxceleb")
KALDI_LABELS = {"target": 1, "nontarget": 0}
VOXCELEB_LABELS = {"1": 1, "0": 0}
COLUMNS = ["line", "label", "enroll", "test"]


class TrialListError(DataError):
    """A trial list that cannot be read; the message names the file and line."""


def _format_of(fields: list[str], where: str) -> str:
    if len(fields) == 3 and fields[2] in KALDI_LABELS:
        return "kaldi"
    if len(fields) == 3 and fields[0] in VOXCELEB_LABELS:
        return "voxceleb"
    raise TrialListError(f"{where}: not a trial line in Kaldi ('<enroll> <test> target|nontarget') or VoxCeleb "
                         f"('1|0 <enroll> <test>') format: {' '.join(fields)!r}")


def read_trials(path: str | Path) -> tuple[pd.DataFrame, str]:
    """(trials, format): columns ``line`` (1-based line number in the file), ``label`` (1 target, 0 non-target),
    ``enroll``, ``test``, in file order. Raises TrialListError for a missing, empty or malformed file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrialListError(f"{path}: trial list not found") from None
    except UnicodeDecodeError as exc:
        raise TrialListError(f"{path}: not a text file ({exc.reason} at byte {exc.start})") from None
    except IsADirectoryError:
        raise TrialListError(f"{path}: is a directory, not a trial list") from None
    rows, fmt = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{number}"
        if fmt is None:
            fmt = _format_of(fields, where)
        if len(fields) != 3:
            raise TrialListError(f"{where}: expected 3 fields ({_layout(fmt)}), got {len(fields)}: {line.strip()!r}")
        if fmt == "kaldi":
            enroll, test, label = fields
            if label not in KALDI_LABELS:
                raise TrialListError(f"{where}: expected target or nontarget as the third field (Kaldi format, "
                                     f"from line 1), got {label!r}")
            rows.append((number, KALDI_LABELS[label], enroll, test))
        else:
            label, enroll, test = fields
            if label not in VOXCELEB_LABELS:
                raise TrialListError(f"{where}: expected 1 or 0 as the first field (VoxCeleb format, from the "
                                     f"first line), got {label!r}")
            rows.append((number, VOXCELEB_LABELS[label], enroll, test))
    if not rows:
        raise TrialListError(f"{path}: no trials (the file is empty)")
    return pd.DataFrame(rows, columns=COLUMNS), fmt


def _layout(fmt: str) -> str:
    return "<enroll> <test> target|nontarget" if fmt == "kaldi" else "1|0 <enroll> <test>"


@dataclass
class ResolvedTrials:
    """A trial list split into what can be scored and what cannot.

    ``trials``: the scorable trials (``line``, ``label``, ``enroll``, ``test``, ``enroll_key``, ``test_key``:
    the resolved keys: file paths or utterance ids). ``missing``: the other trials, with ``reason``.
    ``missing_entries``: each unresolvable entry once, with its reason (entry, reason)."""

    trials: pd.DataFrame
    missing: pd.DataFrame
    missing_entries: pd.DataFrame

    def counts(self) -> dict:
        """Numbers for metrics and the summary line."""
        return {"listed_trials": len(self.trials) + len(self.missing), "scored_trials": len(self.trials),
                "missing_trials": len(self.missing), "missing_entries": len(self.missing_entries)}

    def drop_entries(self, reasons: Mapping[str, str]) -> "ResolvedTrials":
        """The same list with the trials of the given keys (key -> reason, e.g. unusable audio) moved to
        ``missing``."""
        if not reasons:
            return self
        bad = self.trials.enroll_key.isin(reasons) | self.trials.test_key.isin(reasons)
        moved = self.trials[bad].copy()
        moved["reason"] = [reasons.get(a) or reasons.get(b) for a, b in zip(moved.enroll_key, moved.test_key)]
        key_to_entry = dict(zip(self.trials.enroll_key, self.trials.enroll)) | dict(zip(self.trials.test_key,
                                                                                        self.trials.test))
        entries = pd.DataFrame({"entry": [key_to_entry[k] for k in reasons], "reason": list(reasons.values())})
        return ResolvedTrials(self.trials[~bad].reset_index(drop=True),
                              pd.concat([self.missing, moved[self.missing.columns]], ignore_index=True)
                              .sort_values("line", kind="stable").reset_index(drop=True),
                              pd.concat([self.missing_entries, entries], ignore_index=True))


def resolve(trials: pd.DataFrame, lookup: Callable[[str], tuple[str | None, str]]) -> ResolvedTrials:
    """Resolve every distinct entry once with ``lookup(entry) -> (key or None, reason if None)``."""
    entries = pd.unique(pd.concat([trials.enroll, trials.test], ignore_index=True))
    keys, reasons = {}, {}
    for entry in entries:
        key, reason = lookup(entry)
        if key is None:
            reasons[entry] = reason
        else:
            keys[entry] = key
    table = trials.assign(enroll_key=trials.enroll.map(keys), test_key=trials.test.map(keys))
    bad = table.enroll_key.isna() | table.test_key.isna()
    missing = table.loc[bad, COLUMNS].copy()
    missing["reason"] = [reasons.get(a) or reasons.get(b) for a, b in zip(missing.enroll, missing.test)]
    return ResolvedTrials(table[~bad].reset_index(drop=True), missing.reset_index(drop=True),
                          pd.DataFrame({"entry": list(reasons), "reason": list(reasons.values())}))


def resolve_audio(trials: pd.DataFrame, root: str | Path) -> ResolvedTrials:
    """Entries as audio paths relative to ``root`` (absolute ones as they are); a path that is not a file is
    missing."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: audio root is not a folder")

    def lookup(entry):
        path = root / entry
        return (str(path), "") if path.is_file() else (None, f"no such file under {root}")

    return resolve(trials, lookup)


def resolve_utterances(trials: pd.DataFrame, index: pd.DataFrame, usable) -> ResolvedTrials:
    """Entries as utterance ids of a feature store's ``index`` (or its ``path`` column); only the utterances in
    ``usable`` (e.g. the evaluation utterances) can be scored, the others are missing with the reason."""
    by_id = dict(zip(index.utterance, index.utterance))
    by_path = dict(zip(index.path, index.utterance)) if "path" in index else {}
    usable = set(usable)

    def lookup(entry):
        utterance = by_id.get(entry) or by_path.get(entry)
        if utterance is None:
            return None, "not in the feature store"
        if utterance not in usable:
            return None, "not an evaluation utterance (its speaker was trained on, or it was excluded)"
        return utterance, ""

    return resolve(trials, lookup)


# ------------------------------------------------------------------------------------------------ scoring

@dataclass
class ScoredTrials:
    """The result of :func:`score_trial_list`: ``table`` holds every listed trial (``line``, ``label``,
    ``enroll``, ``test``, ``score``, [``llr``,] ``status`` ``scored`` or the reason it could not be), ``summary``
    the numbers (counts; on the scored trials EER, minDCF, Cllr, minCllr, actDCF; see :func:`summarise`)."""

    table: pd.DataFrame
    summary: dict
    resolved: ResolvedTrials


def summarise(scores: np.ndarray, labels: np.ndarray, *, p_target: float, llrs: np.ndarray | None = None) -> dict:
    """EER and minDCF (``voiceprint.evaluation.metrics``, as the evaluate stage), and Cllr, minCllr, actDCF at
    ``p_target`` of ``llrs``, or, for a bundle without an LLR calibration, of the raw scores taken as LLRs
    (``calibrated`` says which)."""
    from voiceprint.evaluation import calibration, metrics

    out = metrics.score_summary(scores, labels, p_target=p_target)
    as_llr = scores if llrs is None else llrs
    out.update(cllr=calibration.cllr(as_llr, labels), min_cllr=calibration.min_cllr(scores, labels),
               act_dcf=calibration.act_dcf(as_llr, labels, p_target), calibrated=llrs is not None)
    return out


def score_trial_list(recognizer, trials_file: str | Path, audio_root: str | Path, *, p_target: float = 0.01,
                     progress: bool = False) -> ScoredTrials:
    """Score a Kaldi or VoxCeleb list of audio paths under ``audio_root`` with a ``voiceprint.serving.api.Recognizer``:
    each file is embedded once, each trial scored as the evaluate stage scores its trials (cosine, or AS-norm
    for a bundle with a cohort), mapped to LLRs when the bundle has an LLR calibration. Files that cannot be
    used (missing, unreadable, too short ...) make their trials missing, with the reason."""
    from voiceprint.data.audio import AudioError
    from voiceprint.evaluation.scoring import as_norm_scores, cosine_scores

    listed, _ = read_trials(trials_file)
    resolved = resolve_audio(listed, audio_root)
    files = list(pd.unique(pd.concat([resolved.trials.enroll_key, resolved.trials.test_key])))
    features, stats, unusable = {}, {}, {}
    stats_lda = recognizer.bundle.stats_lda
    from tqdm import tqdm

    for path in tqdm(files, desc="features", unit="file", disable=not progress, mininterval=1):
        try:
            features[path], stats[path] = recognizer.features_and_stats(path, with_stats=stats_lda is not None)
        except AudioError as exc:
            unusable[path] = f"unusable audio: {exc}"
    resolved = resolved.drop_entries(unusable)
    if resolved.trials.empty or resolved.trials.label.nunique() < 2:
        counts = resolved.counts()
        raise DataError(f"{trials_file}: {counts['scored_trials']} of {counts['listed_trials']} trials can be "
                        "scored, and they need both target and non-target trials "
                        f"({counts['missing_entries']} entries missing or unusable: "
                        + "; ".join(f"{e} ({r})" for e, r in resolved.missing_entries.head(3).itertuples(index=False))
                        + ")")
    names = [p for p in files if p in features]
    embeddings = recognizer.embed_features([features[p] for p in names], [stats[p] for p in names])
    pairs = resolved.trials.assign(enroll=resolved.trials.enroll_key, test=resolved.trials.test_key)
    if recognizer.score_norm == "as_norm":
        scores = as_norm_scores(embeddings, names, pairs, recognizer.bundle.cohort, recognizer.bundle.cohort_top_n)
    else:
        scores = cosine_scores(embeddings, names, pairs)
    calibration = getattr(recognizer.bundle, "llr_calibration", None)
    llrs = None if calibration is None else calibration.llr(scores)
    labels = resolved.trials.label.to_numpy()
    summary = {**resolved.counts(), **summarise(scores, labels, p_target=p_target, llrs=llrs)}
    scored = resolved.trials[COLUMNS].assign(score=scores)
    if llrs is not None:
        scored["llr"] = llrs
    scored["status"] = "scored"
    missing = resolved.missing.rename(columns={"reason": "status"})
    table = pd.concat([scored, missing], ignore_index=True).sort_values("line", kind="stable")
    return ScoredTrials(table.reset_index(drop=True), summary, resolved)


# ------------------------------------------------------------------------------------------------ evaluate stage

TRIALS_FOLDER = "data/trials"     # evaluate.trials lists live here: dvc.yaml tracks the folder as a dependency


def evaluation_trials(path: str | Path, index: pd.DataFrame, split: pd.DataFrame) -> tuple[pd.DataFrame,
                                                                                              ResolvedTrials]:
    """The evaluate stage's trials from a list (``evaluate.trials``) of utterance ids (or store paths): the columns
    of ``splits.make_trials`` (label, enroll, test, enroll_speaker, test_speaker) for the trials whose two
    utterances are evaluation utterances, and the resolution (what could not be scored, and why)."""
    listed, _ = read_trials(path)
    evaluation = split[split.role == "evaluation"]
    resolved = resolve_utterances(listed, index, evaluation.utterance)
    counts = resolved.counts()
    if resolved.trials.empty or resolved.trials.label.nunique() < 2:
        raise DataError(f"{path}: {counts['scored_trials']} of {counts['listed_trials']} trials name two evaluation "
                        "utterances, and they need both target and non-target trials; not scorable: "
                        + "; ".join(f"{e} ({r})" for e, r in resolved.missing_entries.head(3).itertuples(index=False)))
    speaker = dict(zip(split.utterance, split.speaker))
    table = resolved.trials
    trials = pd.DataFrame({"label": table.label.to_numpy(), "enroll": table.enroll_key.to_numpy(),
                           "test": table.test_key.to_numpy(),
                           "enroll_speaker": table.enroll_key.map(speaker).to_numpy(),
                           "test_speaker": table.test_key.map(speaker).to_numpy()})
    return trials, resolved

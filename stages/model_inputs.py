"""Stage model_inputs: speaker-disjoint split, validation hold-out and the trial list (model_inputs.* params)."""
import pandas as pd

from voiceprint.core.contracts import ModelInputsSettings
from voiceprint.core.outputs import atomic_path, write_metrics
from voiceprint.core.params import Params, load_params
from voiceprint.data.splits import make_trials, split_utterances
from voiceprint.core.stage import run_stage

INDEX = "data/features/index.csv"
OUT = "data/model_inputs"


def read_settings(params: Params) -> ModelInputsSettings:
    """Every param this stage reads (dvc.yaml lists the same; tests/test_contracts.py checks it)."""
    return ModelInputsSettings.read(params)


def main() -> None:
    p = read_settings(load_params())
    index = pd.read_csv(INDEX, dtype={"utterance": str, "speaker": str})
    split = split_utterances(index, eval_speakers=p.eval_speakers, validation_fraction=p.validation_fraction,
                             seed=p.seed)
    trials = make_trials(split, max_nontarget=p.max_nontarget_trials, seed=p.seed)
    with atomic_path(OUT) as tmp:
        tmp.mkdir()
        split.to_csv(tmp / "utterances.csv", index=False, lineterminator="\n")
        trials.to_csv(tmp / "trials.csv", index=False, lineterminator="\n")
    roles = split.groupby("role")
    write_metrics("metrics/model_inputs.json", {
        "utterances": roles.size().to_dict(),
        "speakers": roles.speaker.nunique().to_dict(),
        "target_trials": int(trials.label.sum()), "nontarget_trials": int((trials.label == 0).sum())})
    excluded = split[split.role == "excluded"]
    for speaker, rows in excluded.groupby("speaker"):
        print(f"model_inputs: excluded speaker {speaker}: {rows.reason.iat[0]}")
    print(f"model_inputs: {roles.size().to_dict()}; {int(trials.label.sum())} target / "
          f"{int((trials.label == 0).sum())} non-target trials")


if __name__ == "__main__":
    run_stage(main)

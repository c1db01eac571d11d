"""Stage model_inputs: speaker-disjoint split, validation hold-out and the trial list (model_inputs.* params)."""
import pandas as pd

from voiceprint.outputs import atomic_path, write_metrics
from voiceprint.params import load_params
from voiceprint.splits import make_trials, split_utterances
from voiceprint.stage import run_stage

INDEX = "data/features/index.csv"
OUT = "data/model_inputs"


def main() -> None:
    params = load_params().section("model_inputs")
    eval_speakers = params.int("eval_speakers", min=1)
    validation_fraction = params.float("validation_fraction", min=0.0, max=0.5)
    max_nontarget = params.int("max_nontarget_trials", min=1)
    seed = params.int("seed", min=0)
    index = pd.read_csv(INDEX, dtype={"utterance": str, "speaker": str})
    split = split_utterances(index, eval_speakers=eval_speakers, validation_fraction=validation_fraction,
                             seed=seed)
    trials = make_trials(split, max_nontarget=max_nontarget, seed=seed)
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

"""Stage triplet: fine-tune the softmax model with the triplet loss on cosine similarity (triplet.* and train.*
params)."""
import dataclasses
from pathlib import Path

from voiceprint.core.contracts import TrainSettings, TripletSettings
from voiceprint.training.original_h5 import init_checkpoint_path
from voiceprint.core.outputs import save_keras_model, write_csv, write_metrics
from voiceprint.training.live import live_dir
from voiceprint.core.params import Params, load_params
from voiceprint.core.runtime import configure_tensorflow, load_model
from voiceprint.core.stage import run_stage

SOFTMAX_MODEL = "models/softmax.keras"


def read_settings(params: Params) -> tuple[TripletSettings, TrainSettings]:
    """Every param this stage reads (dvc.yaml lists the same; tests/test_contracts.py checks it)."""
    return TripletSettings.read(params), TrainSettings.read(params)


def main() -> None:
    settings, train = read_settings(load_params())
    init = init_checkpoint_path(settings.init_checkpoint, "triplet.init_checkpoint")
    configure_tensorflow(settings.seed)
    from voiceprint.training import resume
    from voiceprint.training.distribute import make_distribution
    from voiceprint.data.splits import existing, training_inputs
    from voiceprint.training.fit import train_triplet

    distribution = make_distribution(train.strategy, mixed_precision=train.mixed_precision)   # before any other TF op
    store, split = training_inputs("data/features", "data/model_inputs", "data/augmented")
    if init is None:
        model = load_model(SOFTMAX_MODEL, what="softmax model")
    else:   # fine-tune a pretrained original Deep Speaker checkpoint instead of our softmax model
        from voiceprint.models import build_rescnn
        from voiceprint.training.original_h5 import architecture_of, import_original_weights

        model, _ = build_rescnn(**architecture_of(init), num_bands=store.num_bands)
        print(import_original_weights(model, init).summary())
    resume_state = None
    if settings.epochs:      # epochs 0 trains nothing: nothing to resume
        resume_state = resume.stage_resume_state(
            "triplet", {**dataclasses.asdict(settings), "init_checkpoint": init},
            ["data/features", "data/model_inputs", *existing("data/augmented"), init or SOFTMAX_MODEL,
             Path(__file__)], distribution)
    trained = train_triplet(model, store, split, settings, distribution=distribution, resume_state=resume_state,
                            live_dir=live_dir("triplet"))
    if not distribution.is_chief:
        return      # multi-worker: the chief writes the outputs
    save_keras_model(trained.model, "models/triplet.keras")
    write_csv("plots/triplet.csv", trained.history)
    last = trained.history.iloc[-1] if len(trained.history) else {}
    write_metrics("metrics/triplet.json", {
        "epochs": len(trained.history), "steps": len(trained.history) * settings.steps_per_epoch,
        "train_loss": last.get("loss"), "val_loss": last.get("val_loss")})
    if resume_state is not None:
        resume_state.remove()     # the outputs are written: the resume state has served its purpose


if __name__ == "__main__":
    run_stage(main)

"""Stage softmax: ResCNN pre-trained with softmax over the training speakers (softmax.* and train.* params)."""
import dataclasses
from pathlib import Path

from voiceprint.data.augment import MaskSettings
from voiceprint.core.contracts import SoftmaxSettings, TrainSettings
from voiceprint.training.original_h5 import check_architecture, init_checkpoint_path
from voiceprint.core.outputs import save_keras_model, write_csv, write_metrics
from voiceprint.training.live import live_dir
from voiceprint.core.params import Params, load_params
from voiceprint.core.runtime import configure_tensorflow
from voiceprint.core.stage import run_stage


def read_settings(params: Params) -> tuple[SoftmaxSettings, MaskSettings, TrainSettings]:
    """Every param this stage reads (dvc.yaml lists the same; tests/test_contracts.py checks it); the masks are
    SpecAugment on the training crops."""
    return SoftmaxSettings.read(params), MaskSettings.read(params), TrainSettings.read(params)


def main() -> None:
    settings, masks, train = read_settings(load_params())
    init = init_checkpoint_path(settings.init_checkpoint, "softmax.init_checkpoint")
    if init is not None:
        check_architecture(init, "softmax.init_checkpoint", filters=settings.filters, blocks=settings.blocks,
                           embedding_dim=settings.embedding_dim)
    configure_tensorflow(settings.seed)
    from voiceprint.training import resume
    from voiceprint.training.distribute import make_distribution
    from voiceprint.data.splits import existing, training_inputs
    from voiceprint.training.fit import train_softmax

    distribution = make_distribution(train.strategy, mixed_precision=train.mixed_precision)   # before any other TF op
    store, split = training_inputs("data/features", "data/model_inputs", "data/augmented")
    resume_state = resume.stage_resume_state(
        "softmax", {**dataclasses.asdict(settings), **dataclasses.asdict(masks), "init_checkpoint": init},
        ["data/features", "data/model_inputs", *existing("data/augmented"), *([init] if init else []),
         Path(__file__)], distribution)
    trained = train_softmax(store, split, settings, init_checkpoint=init, distribution=distribution,
                            resume_state=resume_state, live_dir=live_dir("softmax"),
                            crop_transform=masks.mask if masks.masking else None)
    if not distribution.is_chief:
        return      # multi-worker: the chief writes the outputs
    save_keras_model(trained.model, "models/softmax.keras")
    write_csv("plots/softmax.csv", trained.history)
    last = trained.history.iloc[-1]
    write_metrics("metrics/softmax.json", {
        "epochs": len(trained.history), "params": trained.model.count_params(),
        "train_loss": last["loss"], "train_accuracy": last["accuracy"],
        "val_loss": last.get("val_loss"), "val_accuracy": last.get("val_accuracy"),
        "classes": int(split[split.role == "train"].label.max()) + 1})
    if resume_state is not None:
        resume_state.remove()     # the outputs are written: the resume state has served its purpose


if __name__ == "__main__":
    run_stage(main)

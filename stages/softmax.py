"""Stage softmax: ResCNN pre-trained with softmax over the training speakers (softmax.* and train.* params)."""
import dataclasses
from pathlib import Path

from voiceprint.augment import MaskSettings
from voiceprint.checkpoint import check_architecture, init_checkpoint_path
from voiceprint.distribute import STRATEGIES
from voiceprint.outputs import save_keras_model, write_csv, write_metrics
from voiceprint.live import live_dir
from voiceprint.params import load_params
from voiceprint.runtime import configure_tensorflow
from voiceprint.stage import run_stage


def main() -> None:
    params = load_params()
    p = params.section("softmax")
    args = dict(filters=p.int_list("filters", min=1), blocks=p.int("blocks", min=0),
                embedding_dim=p.int("embedding_dim", min=1), frames=p.int("frames", min=16),
                epochs=p.int("epochs", min=1), batch_size=p.int("batch_size", min=2),
                lr=p.float("lr", min=0.0, min_exclusive=True), dropout=p.float("dropout", min=0.0, max=0.95),
                seed=p.int("seed", min=0), loss=p.str("loss", choices=["softmax", "aam_softmax"]),
                margin=p.float("margin", min=0.0, max=1.5), scale=p.float("scale", min=0.0, min_exclusive=True),
                lr_schedule=p.str("lr_schedule", choices=["constant", "cosine"]))
    init = init_checkpoint_path(p.str("init_checkpoint"), "softmax.init_checkpoint")
    if init is not None:
        check_architecture(init, "softmax.init_checkpoint", filters=args["filters"], blocks=args["blocks"],
                           embedding_dim=args["embedding_dim"])
    masks = MaskSettings.from_section(params.section("augment"))     # SpecAugment on the training crops
    t = params.section("train")
    strategy, mixed_precision = t.str("strategy", choices=STRATEGIES), t.bool("mixed_precision")
    configure_tensorflow(args["seed"])
    from voiceprint import resume
    from voiceprint.distribute import make_distribution
    from voiceprint.splits import existing, training_inputs
    from voiceprint.training import train_softmax

    distribution = make_distribution(strategy, mixed_precision=mixed_precision)   # before any other TF op
    store, split = training_inputs("data/features", "data/model_inputs", "data/augmented")
    checkpoint = resume.stage_checkpoint(
        "softmax", {**args, **dataclasses.asdict(masks), "init_checkpoint": init},
        ["data/features", "data/model_inputs", *existing("data/augmented"), *([init] if init else []),
         Path(__file__)], distribution)
    trained = train_softmax(store, split, init_checkpoint=init, distribution=distribution, checkpoint=checkpoint,
                            live_dir=live_dir("softmax"), crop_transform=masks.mask if masks.masking else None,
                            **args)
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
    if checkpoint is not None:
        checkpoint.remove()     # the outputs are written: the checkpoint has served its purpose


if __name__ == "__main__":
    run_stage(main)

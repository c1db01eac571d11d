"""Stage triplet: fine-tune the softmax model with the triplet loss on cosine similarity (triplet.* and train.*
params)."""
from pathlib import Path

from voiceprint.checkpoint import init_checkpoint_path
from voiceprint.distribute import STRATEGIES
from voiceprint.outputs import save_keras_model, write_csv, write_metrics
from voiceprint.live import live_dir
from voiceprint.params import load_params
from voiceprint.runtime import configure_tensorflow, load_model
from voiceprint.stage import run_stage

SOFTMAX_MODEL = "models/softmax.keras"


def main() -> None:
    params = load_params()
    p = params.section("triplet")
    args = dict(alpha=p.float("alpha", min=0.0, max=2.0), epochs=p.int("epochs", min=0),
                steps_per_epoch=p.int("steps_per_epoch", min=1),
                speakers_per_batch=p.int("speakers_per_batch", min=2),
                utterances_per_speaker=p.int("utterances_per_speaker", min=2), frames=p.int("frames", min=16),
                lr=p.float("lr", min=0.0, min_exclusive=True), seed=p.int("seed", min=0))
    init = init_checkpoint_path(p.str("init_checkpoint"), "triplet.init_checkpoint")
    t = params.section("train")
    strategy, mixed_precision = t.str("strategy", choices=STRATEGIES), t.bool("mixed_precision")
    configure_tensorflow(args["seed"])
    from voiceprint import resume
    from voiceprint.distribute import make_distribution
    from voiceprint.splits import existing, training_inputs
    from voiceprint.training import train_triplet

    distribution = make_distribution(strategy, mixed_precision=mixed_precision)   # before any other TF op
    store, split = training_inputs("data/features", "data/model_inputs", "data/augmented")
    if init is None:
        model = load_model(SOFTMAX_MODEL, what="softmax model")
    else:   # fine-tune a pretrained original Deep Speaker checkpoint instead of our softmax model
        from voiceprint.checkpoint import architecture_of, import_original_weights
        from voiceprint.models import build_rescnn

        model, _ = build_rescnn(**architecture_of(init), num_bands=store.num_bands)
        print(import_original_weights(model, init).summary())
    checkpoint = None
    if args["epochs"]:      # epochs 0 trains nothing: nothing to resume
        checkpoint = resume.stage_checkpoint(
            "triplet", {**args, "init_checkpoint": init},
            ["data/features", "data/model_inputs", *existing("data/augmented"), init or SOFTMAX_MODEL,
             Path(__file__)], distribution)
    trained = train_triplet(model, store, split, distribution=distribution, checkpoint=checkpoint,
                            live_dir=live_dir("triplet"), **args)
    if not distribution.is_chief:
        return      # multi-worker: the chief writes the outputs
    save_keras_model(trained.model, "models/triplet.keras")
    write_csv("plots/triplet.csv", trained.history)
    last = trained.history.iloc[-1] if len(trained.history) else {}
    write_metrics("metrics/triplet.json", {
        "epochs": len(trained.history), "steps": len(trained.history) * args["steps_per_epoch"],
        "train_loss": last.get("loss"), "val_loss": last.get("val_loss")})
    if checkpoint is not None:
        checkpoint.remove()     # the outputs are written: the checkpoint has served its purpose


if __name__ == "__main__":
    run_stage(main)

"""Stage triplet: fine-tune the softmax model with the triplet loss on cosine similarity (triplet.* params)."""
from voiceprint.checkpoint import init_checkpoint_path
from voiceprint.outputs import save_keras_model, write_csv, write_metrics
from voiceprint.params import load_params
from voiceprint.runtime import configure_tensorflow, load_model
from voiceprint.stage import run_stage


def main() -> None:
    p = load_params().section("triplet")
    args = dict(alpha=p.float("alpha", min=0.0, max=2.0), epochs=p.int("epochs", min=0),
                steps_per_epoch=p.int("steps_per_epoch", min=1),
                speakers_per_batch=p.int("speakers_per_batch", min=2),
                utterances_per_speaker=p.int("utterances_per_speaker", min=2), frames=p.int("frames", min=16),
                lr=p.float("lr", min=0.0, min_exclusive=True), seed=p.int("seed", min=0))
    init = init_checkpoint_path(p.str("init_checkpoint"), "triplet.init_checkpoint")
    configure_tensorflow(args["seed"])
    from voiceprint.splits import read_split
    from voiceprint.store import FeatureStore
    from voiceprint.training import train_triplet

    store = FeatureStore.open("data/features")
    split, _ = read_split("data/model_inputs")
    if init is None:
        model = load_model("models/softmax.keras", what="softmax model")
    else:   # fine-tune a pretrained original Deep Speaker checkpoint instead of our softmax model
        from voiceprint.checkpoint import architecture_of, import_original_weights
        from voiceprint.models import build_rescnn

        model, _ = build_rescnn(**architecture_of(init), num_bands=store.num_bands)
        print(import_original_weights(model, init).summary())
    trained = train_triplet(model, store, split, **args)
    save_keras_model(trained.model, "models/triplet.keras")
    write_csv("plots/triplet.csv", trained.history)
    last = trained.history.iloc[-1] if len(trained.history) else {}
    write_metrics("metrics/triplet.json", {
        "epochs": len(trained.history), "steps": len(trained.history) * args["steps_per_epoch"],
        "train_loss": last.get("loss"), "val_loss": last.get("val_loss")})


if __name__ == "__main__":
    run_stage(main)

"""Stage tdnn_head: a head trained on the frozen triplet model (tdnn.* params)."""
from voiceprint.outputs import save_keras_model, write_csv, write_metrics
from voiceprint.params import load_params
from voiceprint.runtime import configure_tensorflow, load_model
from voiceprint.stage import run_stage


def main() -> None:
    p = load_params().section("tdnn")
    from voiceprint.models import HEADS

    args = dict(kind=p.str("kind", choices=sorted(HEADS)), units=p.int("units", min=1),
                layers_count=p.int("layers", min=0), dropout=p.float("dropout", min=0.0, max=0.95),
                output_dim=p.int("output_dim", min=1), loss=p.str("loss", choices=["softmax", "triplet"]),
                epochs=p.int("epochs", min=1), lr=p.float("lr", min=0.0, min_exclusive=True),
                batch_size=p.int("batch_size", min=4), crops_per_utterance=p.int("crops_per_utterance", min=1),
                frames=p.int("frames", min=16), alpha=p.float("alpha", min=0.0, max=2.0),
                seed=p.int("seed", min=0))
    configure_tensorflow(args["seed"])
    from voiceprint.splits import read_split
    from voiceprint.store import FeatureStore
    from voiceprint.training import train_head

    store = FeatureStore.open("data/features")
    split, _ = read_split("data/model_inputs")
    base = load_model("models/triplet.keras", what="triplet model")
    trained = train_head(base, store, split, **args)
    save_keras_model(trained.model, "models/tdnn_head.keras")
    write_csv("plots/tdnn_head.csv", trained.history)
    last = trained.history.iloc[-1]
    write_metrics("metrics/tdnn_head.json", {
        "epochs": len(trained.history), "train_loss": last["loss"],
        "train_accuracy": last.get("accuracy"), "val_loss": last.get("val_loss"),
        "val_accuracy": last.get("val_accuracy")})


if __name__ == "__main__":
    run_stage(main)

"""Stage tdnn_head: a head on the triplet model, dense on its embedding or a frame TDNN on its frame sequence
(tdnn.* params except the fusion keys, which only the evaluate stage reads)."""
from voiceprint.outputs import save_keras_model, write_csv, write_metrics
from voiceprint.live import live_dir
from voiceprint.params import load_params
from voiceprint.runtime import configure_tensorflow, load_model
from voiceprint.stage import run_stage


def main() -> None:
    p = load_params().section("tdnn")
    from voiceprint.losses import LOSSES
    from voiceprint.models import HEADS, context_to_conv

    args = dict(kind=p.str("kind", choices=sorted(HEADS)), units=p.int("units", min=1),
                layers_count=p.int("layers", min=0), dropout=p.float("dropout", min=0.0, max=0.95),
                output_dim=p.int("output_dim", min=1), contexts=p.int_lists("contexts", check=context_to_conv),
                loss=p.str("loss", choices=sorted(LOSSES)), alpha=p.float("alpha", min=0.0, max=2.0),
                margin=p.float("margin", min=0.0, max=1.0), scale=p.float("scale", min=0.0, min_exclusive=True),
                epochs=p.int("epochs", min=1), lr=p.float("lr", min=0.0, min_exclusive=True),
                batch_size=p.int("batch_size", min=4), crops_per_utterance=p.int("crops_per_utterance", min=1),
                utterances_per_speaker=p.int("utterances_per_speaker", min=2), frames=p.int("frames", min=16),
                train_trunk=p.bool("train_trunk"), trunk_lr=p.float("trunk_lr", min=0.0, min_exclusive=True),
                seed=p.int("seed", min=0))
    configure_tensorflow(args["seed"])
    from voiceprint.splits import training_inputs
    from voiceprint.training import train_head

    store, split = training_inputs("data/features", "data/model_inputs", "data/augmented")
    base = load_model("models/triplet.keras", what="triplet model")
    trained = train_head(base, store, split, live_dir=live_dir("tdnn_head"), **args)
    save_keras_model(trained.model, "models/tdnn_head.keras")
    write_csv("plots/tdnn_head.csv", trained.history)
    last = trained.history.iloc[-1]
    write_metrics("metrics/tdnn_head.json", {
        "epochs": len(trained.history), "head_params": trained.head.count_params(),
        "train_loss": last["loss"], "train_accuracy": last.get("accuracy"), "val_loss": last.get("val_loss"),
        "val_accuracy": last.get("val_accuracy")})


if __name__ == "__main__":
    run_stage(main)

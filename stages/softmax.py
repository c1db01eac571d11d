"""Stage softmax: ResCNN pre-trained with softmax over the training speakers (softmax.* params)."""
from voiceprint.checkpoint import check_architecture, init_checkpoint_path
from voiceprint.outputs import save_keras_model, write_csv, write_metrics
from voiceprint.params import load_params
from voiceprint.runtime import configure_tensorflow
from voiceprint.stage import run_stage


def main() -> None:
    p = load_params().section("softmax")
    args = dict(filters=p.int_list("filters", min=1), blocks=p.int("blocks", min=0),
                embedding_dim=p.int("embedding_dim", min=1), frames=p.int("frames", min=16),
                epochs=p.int("epochs", min=1), batch_size=p.int("batch_size", min=2),
                lr=p.float("lr", min=0.0, min_exclusive=True), dropout=p.float("dropout", min=0.0, max=0.95),
                seed=p.int("seed", min=0))
    init = init_checkpoint_path(p.str("init_checkpoint"), "softmax.init_checkpoint")
    if init is not None:
        check_architecture(init, "softmax.init_checkpoint", filters=args["filters"], blocks=args["blocks"],
                           embedding_dim=args["embedding_dim"])
    configure_tensorflow(args["seed"])
    from voiceprint.splits import read_split
    from voiceprint.store import FeatureStore
    from voiceprint.training import train_softmax

    store = FeatureStore.open("data/features")
    split, _ = read_split("data/model_inputs")
    trained = train_softmax(store, split, init_checkpoint=init, **args)
    save_keras_model(trained.model, "models/softmax.keras")
    write_csv("plots/softmax.csv", trained.history)
    last = trained.history.iloc[-1]
    write_metrics("metrics/softmax.json", {
        "epochs": len(trained.history), "params": trained.model.count_params(),
        "train_loss": last["loss"], "train_accuracy": last["accuracy"],
        "val_loss": last.get("val_loss"), "val_accuracy": last.get("val_accuracy"),
        "classes": int(split[split.role == "train"].label.max()) + 1})


if __name__ == "__main__":
    run_stage(main)

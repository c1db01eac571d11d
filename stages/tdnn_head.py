"""Stage tdnn_head: a head on the triplet model, dense on its embedding or a frame TDNN on its frame sequence
(tdnn.* params except the fusion keys, which only the evaluate stage reads). Writes the head alone with the tap it
reads (models/tdnn_head/, voiceprint.models.trained_head), plus the trunk only when tdnn.train_trunk trained it."""
from voiceprint.core.contracts import HeadSettings
from voiceprint.core.outputs import write_csv, write_metrics
from voiceprint.training.live import live_dir
from voiceprint.core.params import Params, load_params
from voiceprint.core.runtime import configure_tensorflow, load_model
from voiceprint.core.stage import run_stage

HEAD_DIR = "models/tdnn_head"


def read_settings(params: Params) -> HeadSettings:
    """Every param this stage reads (dvc.yaml lists the same; tests/test_contracts.py checks it)."""
    return HeadSettings.read(params)


def main() -> None:
    settings = read_settings(load_params())
    configure_tensorflow(settings.seed)
    from voiceprint.data.splits import training_inputs
    from voiceprint.models.trained_head import save_head
    from voiceprint.training.fit import train_head

    store, split = training_inputs("data/features", "data/model_inputs", "data/augmented")
    base = load_model("models/triplet.keras", what="triplet model")
    trained = train_head(base, store, split, settings, live_dir=live_dir("tdnn_head"))
    save_head(HEAD_DIR, trained.head)
    write_csv("plots/tdnn_head.csv", trained.history)
    last = trained.history.iloc[-1]
    write_metrics("metrics/tdnn_head.json", {
        "epochs": len(trained.history), "head_params": trained.head.head.count_params(),
        "train_loss": last["loss"], "train_accuracy": last.get("accuracy"), "val_loss": last.get("val_loss"),
        "val_accuracy": last.get("val_accuracy")})


if __name__ == "__main__":
    run_stage(main)

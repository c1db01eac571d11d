"""What the per-epoch resume state (voiceprint/training/resume.py) costs: softmax training with the params.yaml
settings,
with and without it, plus the time of one resume-state write at that model size and the file's size.

    python bench/resume_overhead.py [--epochs 2]        # from the repo root, after `dvc repro model_inputs`

Epoch times on a busy machine drift by more than the overhead; the direct write timing is the precise number.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from voiceprint.core.contracts import SoftmaxSettings  # noqa: E402
from voiceprint.core.params import load_params  # noqa: E402
from voiceprint.core.runtime import configure_tensorflow  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs per configuration (default 2)")
    parser.add_argument("--writes", type=int, default=5, help="timed resume-state writes (default 5)")
    args = parser.parse_args()

    p = dataclasses.replace(SoftmaxSettings.read(load_params()), epochs=args.epochs)
    model = dict(filters=p.filters, blocks=p.blocks, embedding_dim=p.embedding_dim, dropout=p.dropout)
    fit = dict(frames=p.frames, batch_size=p.batch_size, lr=p.lr, seed=p.seed)
    configure_tensorflow(fit["seed"])
    import keras

    from voiceprint.models import build_rescnn
    from voiceprint.training.resume import ResumeState, Snapshot
    from voiceprint.data.splits import read_split
    from voiceprint.data.store import FeatureStore
    from voiceprint.training.fit import train_softmax

    store = FeatureStore.open("data/features")
    split, _ = read_split("data/model_inputs")
    classes = int(split[split.role == "train"].label.max()) + 1
    steps = -(-int((split.role == "train").sum()) // fit["batch_size"])
    print(f"softmax at params.yaml size: filters {model['filters']}, blocks {model['blocks']}, "
          f"{classes} classes, {steps} steps of {fit['batch_size']} x {fit['frames']} frames per epoch")

    with tempfile.TemporaryDirectory() as scratch:
        seconds = {}
        for label in ("without", "with"):
            configure_tensorflow(fit["seed"])
            resume_state = ResumeState(Path(scratch) / label, "bench") if label == "with" else None
            start = time.perf_counter()
            train_softmax(store, split, p, resume_state=resume_state, verbose=0)
            seconds[label] = time.perf_counter() - start
            print(f"{label:>7} resume state: {seconds[label]:7.1f} s for {args.epochs} epochs "
                  f"({seconds[label] / args.epochs:.1f} s/epoch, model build and tracing included)", flush=True)

        # One write of the full training state at this size, as _EpochEnds does after every epoch.
        _, classifier = build_rescnn(num_bands=store.num_bands, num_classes=classes, **model)
        classifier.compile(optimizer=keras.optimizers.Adam(fit["lr"]), loss="mse")
        classifier.optimizer.build(classifier.trainable_variables)
        state = list(classifier.variables) + list(classifier.optimizer.variables)
        history = [{"epoch": e, "loss": 1.0, "accuracy": 0.5} for e in range(1, 17)]
        target = ResumeState(Path(scratch) / "write", "bench")
        times = []
        for _ in range(args.writes):
            start = time.perf_counter()
            target.save(Snapshot(16, history, [v.value.numpy() for v in state]))
            times.append(time.perf_counter() - start)
        size = target.path.stat().st_size
    write = statistics.median(times)
    per_epoch = seconds["without"] / args.epochs
    print(f"resume-state write: {write * 1000:.0f} ms median of {args.writes} ({size / 2**20:.1f} MiB, "
          f"{len(state)} variables) = {100 * write / per_epoch:.2f}% of a {per_epoch:.1f} s epoch")
    print(f"epoch-time difference with - without: {(seconds['with'] - seconds['without']) / args.epochs:+.2f} "
          "s/epoch (noise on a shared machine)")


if __name__ == "__main__":
    main()

"""Mixed precision training (float16 compute + loss scaling): correctness, then speed against float32.

    KERAS_BACKEND=jax python bench/mixed_precision_check.py [--precision mixed_float16]
        [--filters 64 128 256 512] [--blocks 3] [--batch 96] [--steps 20] [--warmup 3] [--rounds 2]

voiceprint.training.fit's own code under any Keras backend: TensorFlow's default strategy, or elsewhere (JAX on a GPU
machine without TensorFlow) a one-device stand-in (strategy "auto" needs only scope() and the replica count).
1. Synthetic speaker-clustered store (32 speakers x 16 utterances of 200-800 frames): train_softmax 2 epochs in
   float32 and --precision, train_triplet 1 epoch from the mixed model; asserts conv/BN layers in --precision,
   FLOAT32_LAYERS and output float32, LossScaleOptimizer iff mixed_float16, finite losses, float32 result weights
   equal to the trainer's. 2. Speed: the softmax trainer as train_softmax builds it, fit on one random batch
   (--batch x 160 frames), --steps steps timed after --warmup (loss read back each step: waits for the device),
   interleaved over --rounds, best kept; jit_compile=False as train_softmax, but jax.jit under JAX (--jit).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import voiceprint.training.fit as training  # noqa: E402
from voiceprint.training.distribute import Distribution  # noqa: E402
from voiceprint.core.contracts import SoftmaxSettings, TripletSettings  # noqa: E402
from voiceprint.losses import get_loss  # noqa: E402
from voiceprint.models import build_rescnn  # noqa: E402
from voiceprint.data.store import FeatureStore, StoreWriter  # noqa: E402

SMALL = dict(filters=[8, 16, 16, 32], blocks=1, embedding_dim=32, frames=160, dropout=0.1)
FRAMES, BANDS, CLASSES = 160, 64, 500
failures: list[str] = []


class OneDevice:
    """Stand-in for TensorFlow's default strategy outside TensorFlow: one replica, no scope."""
    num_replicas_in_sync = 1

    def scope(self):
        return contextlib.nullcontext()


def distribution(precision: str) -> Distribution:
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf
        return Distribution(tf.distribute.get_strategy(), "auto", precision)
    return Distribution(OneDevice(), "auto", precision)


def describe_devices() -> str:
    if keras.backend.backend() == "jax":
        import jax
        return f"jax {jax.__version__}: {jax.devices()}"
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf
        return f"tensorflow {tf.__version__}: {tf.config.list_physical_devices()}"
    return str(keras.distribution.list_devices())


def synthetic_inputs(root: Path, *, speakers=32, utterances=16, evaluation=4, seed=0):
    rng = np.random.default_rng(seed)
    writer = StoreWriter(root, num_bands=BANDS, kind="bench")
    rows = []
    for s in range(speakers):
        centre = rng.normal(size=BANDS)
        for u in range(utterances):
            feats = centre + 0.5 * rng.normal(size=(int(rng.integers(200, 801)), BANDS))
            writer.add(f"s{s}-{u}", f"s{s}", f"s{s}/{u}.flac", feats, rng.normal(size=40))
            role = "evaluation" if s >= speakers - evaluation else ("validation" if u == 0 else "train")
            rows.append((f"s{s}-{u}", f"s{s}", role, -1 if role == "evaluation" else s, ""))
    writer.close()
    return FeatureStore.open(root), pd.DataFrame(rows, columns=["utterance", "speaker", "role", "label", "reason"])


def expect(ok: bool, what: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {what}", flush=True)
    if not ok:
        failures.append(what)


def check_trainer(trainer, precision: str, stage: str) -> None:
    half = [layer for layer in trainer.layers
            if isinstance(layer, (keras.layers.Conv2D, keras.layers.BatchNormalization))]
    expect(bool(half) and {layer.dtype_policy.name for layer in half} == {precision},
           f"{stage}: {len(half)} conv/BN layers in {precision}")
    kept = {layer.dtype_policy.name for layer in trainer.layers if layer.name in training.FLOAT32_LAYERS}
    expect(kept == {"float32"}, f"{stage}: FLOAT32_LAYERS in float32 ({sorted(kept)})")
    expect(trainer.output.dtype == "float32", f"{stage}: trainer output {trainer.output.dtype}")
    scaled = isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
    expect(scaled == (precision == "mixed_float16"), f"{stage}: LossScaleOptimizer {scaled}")


def show_and_check(name: str, history: pd.DataFrame) -> None:
    print(f"{name}:\n{history.to_string(index=False)}")
    losses = history[[c for c in ("loss", "val_loss") if c in history]].to_numpy(float)
    expect(losses.size > 0 and bool(np.isfinite(losses).all()), f"{name}: finite losses")


def correctness(precision: str, seed: int = 3) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store, split = synthetic_inputs(Path(tmp) / "features")
        softmax = SoftmaxSettings(epochs=2, batch_size=32, lr=1e-3, seed=seed, **SMALL)
        keras.utils.set_random_seed(seed)
        plain = training.train_softmax(store, split, softmax, distribution=distribution("float32"), verbose=0)
        show_and_check("float32 softmax", plain.history)
        copies, make_copy = [], training._training_copy
        training._training_copy = lambda *args: copies.append(make_copy(*args)) or copies[-1]
        try:
            mixed = distribution(precision)
            keras.utils.set_random_seed(seed)
            trained = training.train_softmax(store, split, softmax, distribution=mixed, verbose=0)
            show_and_check(f"{precision} softmax", trained.history)
            check_trainer(copies[0], precision, "softmax")
            expect({layer.dtype_policy.name for layer in trained.model.layers} == {"float32"}
                   and {w.dtype for w in trained.model.get_weights()} == {np.dtype("float32")},
                   "softmax: returned model all float32")
            expect(all(np.array_equal(a, b) for a, b in zip(trained.model.get_weights(), copies[0].get_weights())),
                   "softmax: returned weights equal the trainer's")
            tuned = training.train_triplet(trained.model, store, split,
                                           TripletSettings(alpha=0.1, epochs=1, steps_per_epoch=8,
                                                           speakers_per_batch=8, utterances_per_speaker=4,
                                                           frames=SMALL["frames"], lr=1e-3, seed=seed),
                                           distribution=mixed, verbose=0)
            show_and_check(f"{precision} triplet", tuned.history)
            check_trainer(copies[1], precision, "triplet")
        finally:
            training._training_copy = make_copy


def seconds_per_step(trainer, data, steps: int) -> float:
    marks = {}

    class Clock(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            marks.setdefault("begin", time.perf_counter())

        def on_train_batch_end(self, batch, logs=None):
            float(np.asarray(logs["loss"]))     # the step's result: waits for the device
            marks["end"] = time.perf_counter()

    trainer.fit((data for _ in range(steps)), steps_per_epoch=steps, shuffle=False, verbose=0, callbacks=[Clock()])
    return (marks["end"] - marks["begin"]) / steps


def speed(args, jit: bool) -> None:
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(args.batch, FRAMES, BANDS, 1)).astype(np.float32), rng.integers(0, CLASSES, args.batch))
    precisions, trainers, best = ("float32", args.precision), {}, {}
    for p in precisions:
        keras.utils.set_random_seed(1)
        dist = distribution(p)
        _, classifier = build_rescnn(filters=args.filters, blocks=args.blocks, embedding_dim=512, num_bands=BANDS,
                                     num_classes=CLASSES, dropout=0.5)
        trainers[p] = trainer = training._training_copy(classifier, dist)
        with dist.strategy.scope():
            trainer.compile(optimizer=training._optimizer(1e-3, dist), loss=get_loss("softmax"),
                            metrics=["accuracy"], jit_compile=jit)
        start = time.perf_counter()
        seconds_per_step(trainer, data, args.warmup)
        print(f"{p}: {args.warmup} warm-up steps {time.perf_counter() - start:.1f} s (compilation included)")
    for _ in range(args.rounds):
        for p in precisions:
            best[p] = min(best.get(p, np.inf), seconds_per_step(trainers[p], data, args.steps))
    print(f"filters {args.filters} blocks {args.blocks}, batch {args.batch} x {FRAMES} frames, jit_compile={jit}")
    for p in precisions:
        print(f"  {p:15s} {best[p] * 1000:9.2f} ms/step {args.batch / best[p]:10.1f} crops/s")
    print(f"  float32 / {args.precision} step time: {best['float32'] / best[args.precision]:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", default="mixed_float16", choices=["mixed_float16", "mixed_bfloat16"])
    ap.add_argument("--filters", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--jit", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    jit = keras.backend.backend() == "jax" if args.jit == "auto" else args.jit == "on"
    print(f"keras {keras.__version__}, backend {keras.backend.backend()}; {describe_devices()}", flush=True)
    start = time.perf_counter()
    correctness(args.precision)
    print(f"check 1: {time.perf_counter() - start:.1f} s", flush=True)
    if not args.skip_speed:
        speed(args, jit)
    print("FAILED: " + "; ".join(failures) if failures else "ALL PASS")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

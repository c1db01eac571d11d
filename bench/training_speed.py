"""Triplet training speed: the original recipe (A;P;N random triplets from one .npy per utterance) vs ours (P x K
batches from the memory-mapped feature store, hardest negative mined in the batch), and the input pipeline alone.

    python bench/training_speed.py [--filters 16 32 64 128 --blocks 3] [--full] [--steps 8] [--repeat 2]

``--full`` is the paper-sized model (filters 64 128 256 512, 3 blocks, default --steps 3). Weights are random
(speed does not depend on them). One process, one synthetic corpus (--speakers-in-corpus x --utterances of
200-1,600 frames, 64 bands, float32 noise), written twice: one ``<speaker>_<utt>.npy`` per utterance (the
original's cache) and our float16 FeatureStore. Batch 96 for all: the original's 32 triplets, ours P=24 x K=4.

Configurations, each warmed up by a short fit, then timed for --steps steps of ``model.fit`` (from the first
step's start to the last step's end, so fit's set-up is excluded but the first batch's input latency is not),
interleaved over --repeat rounds, best kept:
  original             build_rescnn embedding model, float32, SGD(0.01), the original deep_speaker_loss on
                       [A;P;N]; batches from a python generator doing what get_random_batch(96) does (np.load
                       of every .npy at every batch, python random crop).
  original + mining    the same plus LazyTripletBatcher's embedding pass amortised per step: one predict of
                       1,280 crops every 100 batches (timed on --mining-crops crops, scaled to 1,280). Its
                       start-up pass (5,120 crops) and the per-anchor cosine scoring are left out (favours it).
  ours float32         what voiceprint.training.fit.train_triplet fits: training._training_copy + training._optimizer
                       (Adam) + the in-batch hardest-negative triplet loss, over SpeakerBatches on the store.
  ours bfloat16        the same under Distribution(default strategy, "auto", "mixed_bfloat16"), which is what
                       train.mixed_precision: true gives on a CPU with avx512_bf16.
Input pipeline alone: ms per batch of SpeakerBatches.__getitem__ and of the original generator (--input-batches
batches), and its share of the step time. Keras fits both through tf.data with prefetch, so input overlaps
compute during training: the share printed is the un-overlapped upper bound. The corpus sits in the page cache.
The load average is printed at start and end (other processes make the numbers noisy).
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from _shared_data import load_average  # noqa: E402  (bench/ is on sys.path)

from voiceprint.core.runtime import configure_tensorflow  # noqa: E402

ALPHA = 0.1
HISTORY_CROPS, REFRESH_EVERY = 1280, 100     # LazyTripletBatcher: predict 1,280 crops every 100 batches


def load_avg() -> str:
    return f"load average: {load_average()} ({os.cpu_count()} cores)"


def make_corpus(root: Path, speakers: int, utterances: int, seed: int):
    """Writes both layouts; returns (speaker -> list of .npy paths, FeatureStore, store labels)."""
    from voiceprint.data.store import FeatureStore, StoreWriter

    rng = np.random.default_rng(seed)
    (root / "audio-fbanks").mkdir()
    writer = StoreWriter(root / "store", num_bands=64, kind="bench")
    files, labels = {}, []
    for s in range(speakers):
        for u in range(utterances):
            feats = rng.standard_normal((int(rng.integers(200, 1601)), 64)).astype(np.float32)
            path = root / "audio-fbanks" / f"spk{s:03d}_utt{u:02d}.npy"
            np.save(path, feats, allow_pickle=False)
            files.setdefault(f"spk{s:03d}", []).append(str(path))
            writer.add(f"spk{s:03d}_utt{u:02d}", f"spk{s:03d}", str(path), feats, np.zeros(40, np.float32))
            labels.append(s)
    writer.close()
    return files, FeatureStore.open(root / "store"), np.array(labels)


def sample_from_mfcc_file(path: str, frames: int) -> np.ndarray:
    """The original's sample_from_mfcc(np.load(path)): python random crop (zero-padded if short), channel axis."""
    mfcc = np.load(path, allow_pickle=False)
    if len(mfcc) >= frames:
        r = random.choice(range(0, len(mfcc) - frames + 1))
        s = mfcc[r:r + frames]
    else:
        s = np.pad(mfcc, ((0, frames - len(mfcc)), (0, 0)))
    return np.expand_dims(s, axis=-1)


def original_batches(files: dict, frames: int, batch_size: int = 96):
    """LazyTripletBatcher.get_random_batch, forever: [anchors; positives; negatives], dummy zero targets."""
    speakers = list(files)
    while True:
        anchors, positives, negatives = [], [], []
        for a in np.random.choice(speakers, size=batch_size // 3, replace=False):
            n = np.random.choice(list(set(speakers) - {a}), size=1)[0]
            pos = np.random.choice(files[a], 2, replace=False)
            anchors.append(pos[0])
            positives.append(pos[1])
            negatives.append(np.random.choice(files[n], 1, replace=True)[0])
        x = np.vstack([[sample_from_mfcc_file(u, frames) for u in group] for group in (anchors, positives, negatives)])
        yield x, np.zeros((len(x), 1))


def deep_speaker_loss(y_true, y_pred, alpha=ALPHA):
    """The original triplet_loss.deep_speaker_loss: batch = [A; P; N], y_true ignored."""
    from keras import ops

    split = ops.shape(y_pred)[0] // 3
    anchor, positive, negative = y_pred[:split], y_pred[split:2 * split], y_pred[2 * split:]
    s_ap = ops.sum(anchor * positive, axis=1)
    s_an = ops.sum(anchor * negative, axis=1)
    return ops.mean(ops.maximum(s_an - s_ap + alpha, 0.0))


def timed_fit(model, data, steps: int, **fit_kwargs) -> float:
    """Seconds per step of ``model.fit`` over ``steps`` steps, first step's begin to last step's end."""
    import keras

    marks = {}

    class Timer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            marks.setdefault("begin", time.perf_counter())

        def on_train_batch_end(self, batch, logs=None):
            marks["end"] = time.perf_counter()

    model.fit(data, epochs=1, verbose=0, callbacks=[Timer()], **fit_kwargs)
    time.sleep(0.5)     # let a prefetch thread still loading a batch finish before the next configuration
    return (marks["end"] - marks["begin"]) / steps


def ms_per_batch(next_batch, batches: int) -> float:
    t = time.perf_counter()
    for i in range(batches):
        next_batch(i)
    return 1000 * (time.perf_counter() - t) / batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--filters", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--full", action="store_true", help="paper-sized model: --filters 64 128 256 512 --blocks 3")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per fit (0: 8, or 3 with --full)")
    ap.add_argument("--repeat", type=int, default=2, help="rounds over all configurations (best is reported)")
    ap.add_argument("--speakers", type=int, default=24, help="P: speakers per batch (ours)")
    ap.add_argument("--per-speaker", type=int, default=4, help="K: utterances per speaker (ours)")
    ap.add_argument("--frames", type=int, default=160)
    ap.add_argument("--speakers-in-corpus", type=int, default=64)
    ap.add_argument("--utterances", type=int, default=12, help="utterances per speaker in the corpus")
    ap.add_argument("--mining-crops", type=int, default=0, help="crops in the timed predict (0: 1280, --full 320)")
    ap.add_argument("--input-batches", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.full:
        args.filters, args.blocks = [64, 128, 256, 512], 3
    steps = args.steps or (3 if args.full else 8)
    mining_crops = args.mining_crops or (320 if args.full else HISTORY_CROPS)
    batch = args.speakers * args.per_speaker

    print(load_avg())
    tf = configure_tensorflow(args.seed)
    import keras

    from voiceprint.training import fit as training
    from voiceprint.training.batching import SpeakerBatches
    from voiceprint.training.distribute import BF16_CPU_FLAGS, Distribution, cpu_flags, local
    from voiceprint.losses import get_loss
    from voiceprint.models.rescnn import build_rescnn

    bf16_flags = sorted(cpu_flags() & set(BF16_CPU_FLAGS))
    print(f"tensorflow {tf.__version__}, keras {keras.__version__}; CPU bf16 flags: {', '.join(bf16_flags) or 'none'}")

    def rescnn():
        return build_rescnn(filters=args.filters, blocks=args.blocks)[0]

    with tempfile.TemporaryDirectory(prefix="training_speed_") as tmp:
        t = time.perf_counter()
        files, store, labels = make_corpus(Path(tmp), args.speakers_in_corpus, args.utterances, args.seed)
        print(f"corpus: {len(store)} utterances of {store.index.frames.min()}-{store.index.frames.max()} frames "
              f"({args.speakers_in_corpus} speakers), written as .npy files and a float16 store in "
              f"{time.perf_counter() - t:.1f} s")
        positions = np.arange(len(store))

        def ours_batches(n, seed=args.seed):
            return SpeakerBatches(store, positions, labels, frames=args.frames, steps=n, seed=seed,
                                  speakers_per_batch=args.speakers, utterances_per_speaker=args.per_speaker)

        original = rescnn()
        original.compile(optimizer=keras.optimizers.SGD(0.01), loss=deep_speaker_loss, jit_compile=False)
        print(f"model: filters {args.filters} x {args.blocks} blocks, {original.count_params():,} params; batch 96 "
              f"(original 32 A;P;N triplets), ours {args.speakers} x {args.per_speaker} = {batch}; "
              f"{args.frames}-frame crops; {steps} timed steps per fit, {args.repeat} round(s)")
        configs = {"original (random triplets)": lambda n: timed_fit(original, original_batches(files, args.frames),
                                                                     n, steps_per_epoch=n, shuffle=False)}
        for name, dist in (("ours float32", local()),
                           ("ours bfloat16", Distribution(tf.distribute.get_strategy(), "auto", "mixed_bfloat16"))):
            trainer = training._training_copy(rescnn(), dist)
            with dist.strategy.scope():
                trainer.compile(optimizer=training._optimizer(0.01, dist), jit_compile=False,
                                loss=training._mined_over_all_replicas(get_loss("triplet", alpha=ALPHA), dist))
            configs[name] = lambda n, trainer=trainer: timed_fit(trainer, ours_batches(n), n, shuffle=False)

        t = time.perf_counter()
        for run in configs.values():        # warm-up: traces the train step, builds the optimizer
            run(2)
        crops = np.stack([sample_from_mfcc_file(random.choice(files[s]), args.frames)
                          for s in random.choices(list(files), k=mining_crops)])
        original.predict(crops[:64], batch_size=32, verbose=0)
        print(f"warm-up {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        original.predict(crops, batch_size=32, verbose=0)
        mining_s = (time.perf_counter() - t) * HISTORY_CROPS / mining_crops / REFRESH_EVERY
        print(f"original mining pass: predict of {mining_crops} crops (batch 32) in {time.perf_counter() - t:.2f} s"
              + (f", scaled to {HISTORY_CROPS}" if mining_crops != HISTORY_CROPS else "")
              + f"; every {REFRESH_EVERY} batches = {mining_s:.3f} s per step")

        best = dict.fromkeys([*configs, "input ours", "input original"], np.inf)
        for _ in range(args.repeat):
            for name, run in configs.items():
                best[name] = min(best[name], run(steps))
            sb = ours_batches(args.input_batches, seed=args.seed + 1)
            best["input ours"] = min(best["input ours"], ms_per_batch(sb.__getitem__, args.input_batches))
            gen = original_batches(files, args.frames)
            best["input original"] = min(best["input original"],
                                         ms_per_batch(lambda i: next(gen), args.input_batches))

    base = best["original (random triplets)"]
    steps_s = {**{k: v for k, v in best.items() if not k.startswith("input")},
               "original + mining pass": base + mining_s}
    order = ["original (random triplets)", "original + mining pass", "ours float32", "ours bfloat16"]
    triplets = {"original (random triplets)": batch // 3, "original + mining pass": batch // 3,
                "ours float32": batch * (args.per_speaker - 1), "ours bfloat16": batch * (args.per_speaker - 1)}
    print(f"\n{'configuration':28s} {'s/step':>8s} {'crops/s':>8s} {'vs original':>12s} {'vs orig+mining':>15s} "
          f"{'triplets/batch':>15s}")
    for name in order:
        s = steps_s[name]
        print(f"{name:28s} {s:8.3f} {batch / s:8.1f} {base / s:11.2f}x {steps_s[order[1]] / s:14.2f}x "
              f"{triplets[name]:15d}")
    print("(target 4: ours >= 1.5x the original at the same width and batch; triplets/batch is information only: "
          "ours = P*K*(K-1) (anchor, positive) pairs, each with its hardest in-batch negative)")
    print(f"\ninput pipeline alone, ms per batch of {batch} crops (best of {args.repeat} x {args.input_batches} "
          "batches; un-overlapped upper bound, target 3: < 10% of the step)")
    print(f"  ours SpeakerBatches (mmap float16 store) {best['input ours']:8.2f} ms: "
          f"{best['input ours'] / (10 * steps_s['ours float32']):5.2f}% of the float32 step, "
          f"{best['input ours'] / (10 * steps_s['ours bfloat16']):5.2f}% of the bfloat16 step")
    print(f"  original generator (np.load per crop)    {best['input original']:8.2f} ms: "
          f"{best['input original'] / (10 * base):5.2f}% of its step")
    print(load_avg())


if __name__ == "__main__":
    main()

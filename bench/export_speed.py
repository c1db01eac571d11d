"""Inference speed of one ResCNN as Keras vs SavedModel vs TFLite (and ONNX where tf2onnx/onnxruntime are
installed), on the same utterances, in one process.

    python bench/export_speed.py [--filters 16 32 64 128 --blocks 1] [--full] [--utterances 40] [--repeat 3]

``--full`` is the paper-sized model (filters 64 128 256 512, 3 blocks). Weights are random (speed does not depend
on them). Utterances have random lengths in [--min-frames, --max-frames] and are embedded one at a time at their
own length (batch 1, no padding), as serving would. Every runtime gets the same thread count (--threads, default
all cores). Each format is warmed up on a few other lengths first, so one-time costs (tracing, delegate set-up)
are excluded but per-new-length costs (TFLite re-plans memory on every resize) are not. Passes are interleaved
across formats and the best is kept, to dampen noise from other processes.
Prints per format: utterances/s, ms per utterance, x real time (10 ms frames), ratio vs Keras, and the lowest
cosine vs Keras (a check that the timed artifact is the same model).
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from voiceprint.serving import export as E  # noqa: E402
from voiceprint.core.runtime import configure_tensorflow  # noqa: E402

FRAME_S = 0.01  # 10 ms hop: frames -> seconds of audio


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _embedders(model, workdir: Path, threads: int, onnx: bool):
    out = {"keras": E.keras_embedder(model)}
    t = time.perf_counter()
    out["savedmodel"] = E.load_savedmodel_embedder(E.export_savedmodel(model, workdir / "savedmodel"))
    out["tflite"] = E.load_tflite_embedder(E.export_tflite(model, workdir / "model.tflite"), num_threads=threads)
    if onnx:
        out["onnx"] = E.load_onnx_embedder(E.export_onnx(model, workdir / "model.onnx"), num_threads=threads)
    print(f"exported {', '.join(f for f in out if f != 'keras')} in {time.perf_counter() - t:.1f} s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--filters", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--full", action="store_true", help="paper-sized model: --filters 64 128 256 512 --blocks 3")
    ap.add_argument("--embedding-dim", type=int, default=512)
    ap.add_argument("--utterances", type=int, default=40)
    ap.add_argument("--min-frames", type=int, default=100)
    ap.add_argument("--max-frames", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3, help="timed passes per format (best is reported)")
    ap.add_argument("--threads", type=int, default=0, help="threads for every runtime (0: all cores)")
    ap.add_argument("--no-onnx", action="store_true", help="skip ONNX even where tf2onnx/onnxruntime exist")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.full:
        args.filters, args.blocks = [64, 128, 256, 512], 3

    threads = args.threads or os.cpu_count() or 1
    tf = configure_tensorflow(args.seed, threads)
    import keras

    from voiceprint.models.rescnn import build_rescnn

    model, _ = build_rescnn(filters=args.filters, blocks=args.blocks, embedding_dim=args.embedding_dim)
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(args.min_frames, args.max_frames + 1, args.utterances)
    utterances = [rng.normal(size=(n, 64)).astype(np.float32) for n in lengths]
    warmup = [rng.normal(size=(n, 64)).astype(np.float32) for n in rng.integers(args.min_frames, args.max_frames, 3)]
    onnx = not args.no_onnx and _have("tf2onnx") and _have("onnxruntime")
    print(f"model filters={args.filters} blocks={args.blocks} dim={args.embedding_dim} "
          f"params={model.count_params():,}; {len(utterances)} utterances, {lengths.min()}-{lengths.max()} frames "
          f"({lengths.sum() * FRAME_S:.0f} s audio); threads={threads}; tensorflow {tf.__version__}, "
          f"keras {keras.__version__}" + ("" if onnx else "; ONNX skipped (tf2onnx/onnxruntime not installed)"))

    with tempfile.TemporaryDirectory(prefix="export_speed_") as workdir:
        embedders = _embedders(model, Path(workdir), threads, onnx)
        reference = [embedders["keras"](u) for u in utterances]
        cosine = {}
        for name, embed in embedders.items():
            for u in warmup:
                embed(u)
            cosine[name] = min(float(np.dot(embed(u), r)) for u, r in zip(utterances, reference))
        best = dict.fromkeys(embedders, float("inf"))
        for _ in range(max(1, args.repeat)):
            for name, embed in embedders.items():
                t = time.perf_counter()
                for u in utterances:
                    embed(u)
                best[name] = min(best[name], time.perf_counter() - t)

    audio_s = lengths.sum() * FRAME_S
    print(f"{'format':11s} {'utt/s':>8s} {'ms/utt':>8s} {'x real time':>12s} {'vs keras':>9s} {'min cosine':>11s}")
    for name, wall in best.items():
        print(f"{name:11s} {len(utterances) / wall:8.1f} {1000 * wall / len(utterances):8.2f} "
              f"{audio_s / wall:12.0f} {best['keras'] / wall:8.2f}x {cosine[name]:11.6f}")


if __name__ == "__main__":
    main()

"""The fused system as one trunk pass against the two-trunk model bundles held before (issue 14, item 3).

Builds both from the SAME weights (a bundle's fused model.keras, default: the shipped real-speech model), then
side by side in one process: file sizes (.keras and .onnx) and the time to embed the same utterances with Keras
(one traced tf.function, as ``voiceprint.core.embedding``) and with ONNX Runtime (as the runtime backend), and checks
the two give the same embeddings.

    python bench/one_trunk.py [BUNDLE_DIR] [--utterances 40] [--seconds 4] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def two_trunk(one):
    """The model the evaluate stage wrote before heads were saved alone: ``[base(x), attach_head(base, head)(x)]``,
    i.e. the trunk run twice (its weights stored twice in the file)."""
    import keras
    from keras import layers

    from voiceprint.models import attach_head

    base, head = one.get_layer("rescnn"), one.get_layer("dense_head")
    w = float(np.asarray(one.get_layer("base_weight").scale)) ** 2
    copy = keras.models.clone_model(base)
    copy.set_weights(base.get_weights())
    inputs = keras.Input(base.input_shape[1:], name="input")
    parts = [layers.Rescaling(w ** 0.5, name="base_weight")(base(inputs)),
             layers.Rescaling((1 - w) ** 0.5, name="head_weight")(attach_head(copy, head)(inputs))]
    return keras.Model(inputs, layers.Concatenate(name="fused")(parts), name="fused")


def best_of(repeats, fn):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    from voiceprint.serving.pretrained import SHIPPED

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", nargs="?", default=str(SHIPPED))
    parser.add_argument("--utterances", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from voiceprint.serving.bundle import one_trunk_model
    from voiceprint.core.embedding import embed_features
    from voiceprint.serving.export import export_onnx, load_onnx_embedder
    from voiceprint.core.outputs import save_keras_model
    from voiceprint.core.runtime import configure_tensorflow, load_model

    configure_tensorflow(0)
    model = load_model(Path(args.bundle) / "model.keras", what="bundle model")
    one = one_trunk_model(model) or model       # a two-trunk bundle is rebuilt first
    if "dense_head" not in [layer.name for layer in one.layers]:
        raise SystemExit(f"{args.bundle}: not a fused model with a dense head")
    two = two_trunk(one)
    bands = int(one.input_shape[2])
    frames = int(args.seconds * 100)
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(frames, bands)).astype(np.float32) for _ in range(args.utterances)]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, m in (("two trunks (before)", two), ("one trunk (now)", one)):
            keras_file, onnx_file = Path(tmp) / f"{len(rows)}.keras", Path(tmp) / f"{len(rows)}.onnx"
            save_keras_model(m, keras_file)
            export_onnx(m, onnx_file)
            onnx = load_onnx_embedder(onnx_file)
            embed_features(m, feats[:2])                # trace once outside the timing
            keras_s, emb = best_of(args.repeats, lambda: embed_features(m, feats))
            onnx_s, emb_onnx = best_of(args.repeats, lambda: embed_features(onnx, feats))
            rows[name] = dict(keras_mb=os.path.getsize(keras_file) / 1e6, onnx_mb=os.path.getsize(onnx_file) / 1e6,
                              params=m.count_params(), keras_s=keras_s, onnx_s=onnx_s, emb=emb, emb_onnx=emb_onnx)
    before, now = rows.values()
    same = float(np.min(np.sum(before["emb"] * now["emb"], axis=1)))
    same_onnx = float(np.min(np.sum(before["emb_onnx"] * now["emb_onnx"], axis=1)))
    print(f"{args.utterances} utterances of {args.seconds:g} s ({frames} frames), best of {args.repeats}; "
          f"min cosine between the two models' embeddings: keras {same:.7f}, onnx {same_onnx:.7f}")
    print(f"{'model':22s} {'params':>10s} {'.keras MB':>10s} {'.onnx MB':>9s} {'keras s':>8s} {'onnx s':>7s}")
    for name, r in rows.items():
        print(f"{name:22s} {r['params']:>10,d} {r['keras_mb']:>10.2f} {r['onnx_mb']:>9.2f} {r['keras_s']:>8.2f} "
              f"{r['onnx_s']:>7.2f}")
    print("ratio now/before: " + ", ".join(f"{k} {now[k] / before[k]:.2f}"
                                           for k in ("params", "keras_mb", "onnx_mb", "keras_s", "onnx_s")))


if __name__ == "__main__":
    main()

"""Exported models (SavedModel, TFLite, optional ONNX) embed exactly like the Keras model, at any batch and length.

One small ResCNN with randomised weights (BatchNorm statistics included, so BN folding in the converters is
exercised) is exported once per module; every test reuses the artifacts, keeping the file well under a minute.
"""
from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
import keras  # noqa: E402

from voiceprint.serving import export as E  # noqa: E402
from voiceprint.models.rescnn import build_rescnn  # noqa: E402

BANDS, DIM = 64, 16
# (batch, frames): lengths that are not multiples of the 16x time reduction, a 1-frame edge case, and batches.
CASES = [(1, 37), (1, 160), (1, 411), (3, 37), (2, 160), (4, 411), (2, 1)]
MIN_COSINE = 0.9999


def _randomise(model, seed=0):
    """Random weights everywhere, BN moving stats included (fresh BN is an identity the converters could hide)."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        shape, path = tuple(v.shape), v.path
        if path.endswith("moving_variance") or path.endswith("gamma"):
            v.assign(rng.uniform(0.5, 1.5, shape).astype(np.float32))
        elif path.endswith("moving_mean") or path.endswith("beta") or path.endswith("bias"):
            v.assign(rng.normal(0.0, 0.1, shape).astype(np.float32))
        else:
            v.assign(rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[:-1])), shape).astype(np.float32))
    return model


def _features(batch, frames, seed):
    return np.random.default_rng(seed).normal(size=(batch, frames, BANDS, 1)).astype(np.float32)


def _min_cosine(a, b):
    return float(np.min(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    m, _ = build_rescnn(filters=[4, 8, 8, 8], blocks=1, embedding_dim=DIM, num_bands=BANDS)
    return _randomise(m)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return {"savedmodel": E.export_savedmodel(model, root / "embedder"),
            "tflite": E.export_tflite(model, root / "embedder.tflite")}


@pytest.fixture(scope="module")
def embedders(exported):
    # One embedder per format for the whole module: the TFLite one then sees lengths change between calls.
    return {"savedmodel": E.load_savedmodel_embedder(exported["savedmodel"]),
            "tflite": E.load_tflite_embedder(exported["tflite"])}


# ------------------------------------------------------------------------------------------ equivalence

@pytest.mark.parametrize("fmt", ["savedmodel", "tflite"])
def test_export_matches_keras_at_every_length_and_batch(model, embedders, fmt):
    for i, (batch, frames) in enumerate(CASES):
        x = _features(batch, frames, seed=i)
        want = model(x, training=False).numpy()
        got = embedders[fmt](x)
        assert got.shape == (batch, DIM) and got.dtype == np.float32
        assert _min_cosine(want, got) >= MIN_COSINE, (fmt, batch, frames)
        np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("fmt", ["savedmodel", "tflite"])
def test_single_utterance_2d_input(model, embedders, fmt):
    x = _features(1, 123, seed=7)
    got = embedders[fmt](x[0, :, :, 0])
    assert got.shape == (DIM,)
    assert _min_cosine(model(x, training=False).numpy(), got[None]) >= MIN_COSINE


def test_keras_embedder_is_the_model(model):
    x = _features(2, 90, seed=3)
    np.testing.assert_allclose(E.keras_embedder(model)(x), model(x, training=False).numpy(), atol=1e-6)


def test_onnx_matches_keras(model, tmp_path):
    pytest.importorskip("tf2onnx")
    pytest.importorskip("onnxruntime")
    embedder = E.load_onnx_embedder(E.export_onnx(model, tmp_path / "embedder.onnx"))
    for i, (batch, frames) in enumerate(CASES):
        x = _features(batch, frames, seed=i)
        assert _min_cosine(model(x, training=False).numpy(), embedder(x)) >= MIN_COSINE, (batch, frames)


# ---------------------------------------------------------------------------------------- signatures

def test_savedmodel_signature_has_variable_batch_and_length(exported):
    loaded = tf.saved_model.load(str(exported["savedmodel"]))
    assert {"embed", "serving_default"} <= set(loaded.signatures)
    fn = loaded.signatures["embed"]
    spec = fn.structured_input_signature[1]["features"]
    assert spec.shape.as_list() == [None, None, BANDS, 1] and spec.dtype == tf.float32
    out = fn.structured_outputs["embedding"]
    assert out.shape.as_list() == [None, DIM] and out.dtype == tf.float32


def test_tflite_is_dynamic_float32_builtin_only(embedders, exported):
    interp = embedders["tflite"].backend  # its interpreter (a new tf.lite.Interpreter would warn: deprecated)
    (inp,), (out,) = interp.get_input_details(), interp.get_output_details()
    assert list(inp["shape_signature"]) == [-1, -1, BANDS, 1]
    assert inp["dtype"] == np.float32 and out["dtype"] == np.float32
    assert list(out["shape_signature"]) == [-1, DIM]
    # Select-TF ops would be stored as custom ops named Flex*; builtins only means none.
    assert b"Flex" not in exported["tflite"].read_bytes()


# ------------------------------------------------------------------------------------ paths and errors

def test_export_replaces_previous_export_without_leftovers(model, tmp_path):
    target = tmp_path / "sm"
    E.export_savedmodel(model, target)
    E.export_savedmodel(model, target)
    assert (target / "saved_model.pb").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sm"]  # no temporary siblings left


def test_failed_tflite_conversion_leaves_nothing(model, tmp_path, monkeypatch):
    class Broken:
        target_spec = type("Spec", (), {})()

        def convert(self):
            raise RuntimeError("converter exploded")

    # from_saved_model returns a subclass with its own convert(), so replace the factory.
    monkeypatch.setattr(tf.lite.TFLiteConverter, "from_saved_model", lambda *a, **k: Broken())
    with pytest.raises(RuntimeError, match="exploded"):
        E.export_tflite(model, tmp_path / "m.tflite")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_to_clobber_what_is_not_an_export(model, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        E.export_savedmodel(model, tmp_path / "file")
    other = tmp_path / "models"
    other.mkdir()
    (other / "softmax.keras").write_text("precious")
    with pytest.raises(FileExistsError, match="not a SavedModel"):
        E.export_savedmodel(model, other)
    assert (other / "softmax.keras").read_text() == "precious"
    with pytest.raises(IsADirectoryError):
        E.export_tflite(model, other)
    with pytest.raises(NotADirectoryError, match="is a file"):
        E.export_tflite(model, tmp_path / "file" / "m.tflite")


def test_export_rejects_a_model_that_is_not_a_feature_embedder(tmp_path):
    dense = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match=r"\(batch, frames, bands, 1\)"):
        E.export_savedmodel(dense, tmp_path / "sm")


def test_loaders_give_clear_errors_for_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        E.load_savedmodel_embedder(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a SavedModel"):
        E.load_savedmodel_embedder(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        E.load_tflite_embedder(tmp_path / "missing.tflite")
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"definitely not a flatbuffer")
    with pytest.raises(ValueError, match="not a valid TFLite model"):
        E.load_tflite_embedder(bad)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        E.load_tflite_embedder(tmp_path)
    with pytest.raises(NotADirectoryError, match="is a file"):
        E.load_savedmodel_embedder(bad)


@pytest.mark.parametrize("fmt", ["savedmodel", "tflite"])
def test_embedder_rejects_wrong_shapes(embedders, fmt):
    with pytest.raises(ValueError, match="features must be"):
        embedders[fmt](np.zeros((10, BANDS + 1), np.float32))
    with pytest.raises(ValueError, match="features must be"):
        embedders[fmt](np.zeros((1, 10, BANDS), np.float32))
    with pytest.raises(ValueError, match="empty"):
        embedders[fmt](np.zeros((0, BANDS), np.float32))


def test_command_line_export(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO
    from voiceprint.core.outputs import save_keras_model

    model, _ = build_rescnn(filters=[4, 8, 8, 8], blocks=1, embedding_dim=16)
    save_keras_model(model, tmp_path / "m.keras")
    cmd = [sys.executable, "-m", "voiceprint.serving.export", str(tmp_path / "m.keras")]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(cmd + ["--format", "tflite", "-o", str(tmp_path / "m.tflite")], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert E.load_tflite_embedder(tmp_path / "m.tflite")(np.zeros((50, 64), "float32")).shape == (16,)
    bad = subprocess.run([sys.executable, "-m", "voiceprint.serving.export", str(tmp_path / "nope.keras"), "--format",
                          "savedmodel", "-o", str(tmp_path / "sm")], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and "nope.keras" in bad.stderr and "Traceback" not in bad.stderr

import numpy as np
import pytest

from voiceprint.losses import get_loss, triplet_loss
from voiceprint.models import attach_head, build_head, build_rescnn


def test_small_rescnn_shapes_and_normalisation():
    emb, clf = build_rescnn(filters=[4, 8, 8, 8], blocks=1, embedding_dim=16, num_classes=3)
    x = np.random.default_rng(0).normal(size=(2, 160, 64, 1)).astype("float32")
    out = emb.predict(x, verbose=0)
    assert out.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    assert clf.predict(x, verbose=0).shape == (2, 3)
    # variable length: whole utterances of any length, including shorter than the 16x downsampling
    assert emb.predict(x[:1, :37], verbose=0).shape == (1, 16)
    assert emb.predict(x[:1, :5], verbose=0).shape == (1, 16)
    # both models share every trunk weight
    assert emb.get_layer("affine") is clf.get_layer("affine")


def test_full_size_matches_original_parameter_count():
    emb, clf = build_rescnn(num_classes=100)
    assert emb.count_params() == 24_185_728          # the original's DeepSpeakerModel (deep_speaker/conv_models.py)
    assert clf.count_params() - emb.count_params() == 51_300


def test_layer_names_and_shapes_match_reference(shared_dir):
    import csv

    emb, _ = build_rescnn()
    rows = list(csv.DictReader(open(shared_dir / "reference/layers.tsv"), delimiter="\t"))
    for row in rows:
        layer = emb.get_layer(row["layer_name"])
        shapes = ["x".join(map(str, w.shape)) for w in layer.weights]
        assert ";".join(shapes) == row["weight_shapes"], row["layer_name"]


def test_num_bands_must_divide():
    with pytest.raises(ValueError, match="num_bands=60"):
        build_rescnn(num_bands=60)


def _numpy_triplet(emb, labels, alpha):
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = emb @ emb.T
    total, count = 0.0, 0
    for i in range(len(emb)):
        hardest = max(sim[i, j] for j in range(len(emb)) if labels[j] != labels[i])
        for j in range(len(emb)):
            if j != i and labels[j] == labels[i]:
                total += max(hardest - sim[i, j] + alpha, 0.0)
                count += 1
    return total / count


def test_triplet_loss_known_values():
    loss = triplet_loss(alpha=0.1)
    separated = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], "float32")
    assert float(loss(np.array([0, 0, 1, 1]), separated)) == pytest.approx(0.0)
    # every positive is orthogonal (s_ap = 0) and the hardest negative identical (s_an = 1): 1 - 0 + 0.1
    swapped = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], "float32")
    assert float(loss(np.array([0, 0, 1, 1]), swapped)) == pytest.approx(1.1)


def test_triplet_loss_matches_reference_loop():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(12, 8)).astype("float32")
    labels = np.repeat(np.arange(4), 3)
    got = float(triplet_loss(alpha=0.2)(labels, emb))
    assert got == pytest.approx(_numpy_triplet(emb, labels, 0.2), rel=1e-5)


def test_loss_registry():
    assert float(get_loss("softmax")(np.array([0]), np.array([[10.0, 0.0]]))) == pytest.approx(4.54e-5, rel=1e-2)
    with pytest.raises(ValueError, match="unknown loss 'mse'"):
        get_loss("mse")


def test_dense_head_attached_is_normalised():
    base, _ = build_rescnn(filters=[4, 4, 4, 4], blocks=0, embedding_dim=8)
    head = build_head("dense", input_dim=8, units=16, layers_count=2, dropout=0.5, output_dim=5)
    model = attach_head(base, head)
    out = model.predict(np.ones((3, 40, 64, 1), "float32"), verbose=0)
    assert out.shape == (3, 5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="unknown head 'conv'"):
        build_head("conv")


def test_saved_model_is_byte_reproducible_and_loads_safely(tmp_path):
    from voiceprint.core.outputs import save_keras_model
    from voiceprint.core.runtime import load_model

    emb, _ = build_rescnn(filters=[4, 4, 4, 4], blocks=1, embedding_dim=8)
    save_keras_model(emb, tmp_path / "a.keras")
    save_keras_model(emb, tmp_path / "b.keras")
    assert (tmp_path / "a.keras").read_bytes() == (tmp_path / "b.keras").read_bytes()
    loaded = load_model(tmp_path / "a.keras")
    x = np.ones((1, 32, 64, 1), "float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), emb.predict(x, verbose=0), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="missing.keras"):
        load_model(tmp_path / "missing.keras")
    (tmp_path / "junk.keras").write_text("not a zip")
    with pytest.raises(ValueError, match="junk.keras"):
        load_model(tmp_path / "junk.keras")


def test_saved_model_bytes_do_not_depend_on_the_process(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    script = ("import sys, keras; keras.utils.set_random_seed(0);"
              "from voiceprint.models import build_rescnn; from voiceprint.core.outputs import save_keras_model;"
              "save_keras_model(build_rescnn(filters=[4, 8, 8, 8], blocks=1, embedding_dim=8)[0], sys.argv[1])")
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / f"{name}.keras")], check=True, cwd=REPO,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert (tmp_path / "a.keras").read_bytes() == (tmp_path / "b.keras").read_bytes()
    from voiceprint.core.runtime import load_model

    assert load_model(tmp_path / "a.keras").count_params() > 0

"""Original (Keras 2) checkpoints: import by layer name, export in the original layout, parity with the reference.

Parity tests use ../shared/reference (skipped where it is absent); the rest run on small models and files built
here. The gzip'd reference files are gunzipped once per module into a temporary directory.
"""
import gzip
import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from voiceprint.models import build_rescnn
from voiceprint.training.original_h5 import (CheckpointError, ImportReport, export_original_weights,
                                             import_original_weights,
                                    read_original_layout)

# Located as tests/conftest.py's `shared_dir` does; module-scoped fixtures cannot use that function-scoped one.
REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VOICEPRINT_SHARED", REPO.parent / "shared"))

COS_MIN, ABS_MAX = 0.9999, 1e-4          # the task's acceptance bounds (README: correct code agrees to 1e-4)
SMALL = dict(filters=[4, 8, 8, 8], blocks=1, embedding_dim=16)


# ------------------------------------------------------------------------------------------------------ helpers

def _cosines(a, b):
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _embed(model, x):
    return np.asarray(model(x, training=False))


def _randomise(model, seed=0):
    """Non-trivial weights everywhere, BN statistics included (variances positive)."""
    rng = np.random.default_rng(seed)
    for v in model.weights:
        value = rng.normal(scale=0.3, size=v.shape)
        if v.name == "moving_variance":
            value = rng.uniform(0.5, 2.0, size=v.shape)
        v.assign(value.astype("float32"))


def _snapshot(model):
    return [np.array(v.numpy()) for v in model.weights]


def _inputs(n=2, frames=48, seed=1):
    return np.random.default_rng(seed).normal(size=(n, frames, 64, 1)).astype("float32")


def _rewrite_str_attr(obj, name, values):
    obj.attrs.pop(name, None)
    obj.attrs.create(name, [v.encode() for v in values], dtype=h5py.string_dtype("ascii"))


def _strings(obj, name):
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.atleast_1d(obj.attrs[name])]


def _describe(path):
    """Everything structural in an .h5 file: groups, datasets (shape, dtype, layout), attrs (name, HDF5 type
    class, variable-length or not, charset, value)."""
    out = {}

    def attrs(obj):
        result = {}
        for key in obj.attrs:
            h5type = obj.attrs.get_id(key).get_type()
            is_str = isinstance(h5type, h5py.h5t.TypeStringID)
            kind = (h5type.get_class(), is_str and h5type.is_variable_str(), is_str and h5type.get_cset())
            result[key] = (kind, [str(v) for v in np.atleast_1d(obj.attrs[key])])
        return result

    with h5py.File(path, "r") as f:
        out["/"] = ("group", attrs(f))

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = ("dataset", obj.shape, str(obj.dtype), obj.chunks, obj.compression, attrs(obj))
            else:
                out[name] = ("group", attrs(obj))
        f.visititems(visit)
    return out


# ----------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ref = SHARED / "reference"
    if not ref.is_dir():
        pytest.skip(f"{SHARED} not present (shared reference material)")
    tmp = tmp_path_factory.mktemp("reference")
    files = {}
    for stem in ("rescnn_reference_random", "rescnn_reference_random_softmax5_fullmodel"):
        with gzip.open(ref / f"{stem}.h5.gz", "rb") as src, open(tmp / f"{stem}.h5", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        files[stem] = tmp / f"{stem}.h5"
    parity = ref / "parity"
    return SimpleNamespace(dir=ref, weights=files["rescnn_reference_random"],
                           full_model=files["rescnn_reference_random_softmax5_fullmodel"],
                           parity=parity, meta=json.loads((parity / "meta.json").read_text()),
                           inputs=np.load(parity / "inputs_160.npy"))


@pytest.fixture(scope="module")
def reference_embedding(reference):
    """The full-size embedding model with the reference save_weights checkpoint imported."""
    model, _ = build_rescnn()
    report = import_original_weights(model, reference.weights)
    return model, report


@pytest.fixture(scope="module")
def reference_outputs(reference_embedding, reference):
    return _embed(reference_embedding[0], reference.inputs)


# ------------------------------------------------------------------------------------------ parity (reference)

def test_import_save_weights_layout_loads_every_layer(reference_embedding, reference):
    model, report = reference_embedding
    tsv = [line.split("\t")[1] for line in (reference.dir / "layers.tsv").read_text().splitlines()[1:] if line]
    assert report.layout == "save_weights" and report.keras_version == "2.21.0"
    assert report.loaded == tsv                 # all 57 weighted layers, in model order
    assert report.skipped == {}
    assert report.num_values == model.count_params() == 24_185_728
    assert "loaded 57 layers (24,185,728 values)" in report.summary()


def test_parity_embeddings_160(reference_outputs, reference):
    expected = np.load(reference.parity / "embeddings_160.npy")
    cos, diff = _cosines(reference_outputs, expected), np.abs(reference_outputs - expected).max()
    print(f"embeddings_160: min cosine {cos.min():.8f}, max abs diff {diff:.3g}")
    assert cos.min() >= COS_MIN and diff <= ABS_MAX


def test_parity_whole_utterances(reference_embedding, reference):
    model, _ = reference_embedding
    keys = reference.meta["full_length_keys"]
    expected = np.load(reference.parity / "embeddings_full.npy")
    # one at a time with all frames, as the original did (no padding to a common length)
    got = np.concatenate([_embed(model, np.load(reference.parity / "features" / f"{k}.npy")[None, :, :, None])
                          for k in keys])
    assert [np.load(reference.parity / "features" / f"{k}.npy").shape[0] for k in keys] == \
        [reference.meta["frames"][k] for k in keys]
    cos, diff = _cosines(got, expected), np.abs(got - expected).max()
    print(f"embeddings_full: min cosine {cos.min():.8f}, max abs diff {diff:.3g}")
    assert cos.min() >= COS_MIN and diff <= ABS_MAX


def test_parity_softmax5_full_model_checkpoint(reference, reference_outputs):
    emb, clf = build_rescnn(num_classes=5)
    report = import_original_weights(clf, reference.full_model)
    assert report.layout == "model.save" and report.skipped == {}
    assert report.loaded[-2:] == ["affine", "dense"] and len(report.loaded) == 58
    probs = _softmax(np.asarray(clf(reference.inputs, training=False)))   # our head outputs logits
    expected = np.load(reference.parity / "softmax5_probs_160.npy")
    diff = np.abs(probs - expected).max()
    print(f"softmax5_probs_160: max abs diff {diff:.3g}")
    assert diff <= ABS_MAX
    # the classifier shares its trunk with the embedding model: same trunk weights as the save_weights file
    np.testing.assert_allclose(_embed(emb, reference.inputs), reference_outputs, atol=1e-6)


def test_softmax_checkpoint_into_embedding_model_skips_classifier(reference, reference_embedding):
    model, _ = build_rescnn()
    report = import_original_weights(model, reference.full_model)
    assert list(report.skipped) == ["dense"] and "5 speakers" in report.skipped["dense"]
    assert len(report.loaded) == 57 and "skipped dense" in report.summary()
    for mine, theirs in zip(_snapshot(model), _snapshot(reference_embedding[0])):
        np.testing.assert_array_equal(mine, theirs)


def test_speaker_count_mismatch_skips_or_fails(reference):
    _, clf = build_rescnn(num_classes=3)
    before = np.array(clf.get_layer("dense").kernel.numpy())
    report = import_original_weights(clf, reference.full_model)
    assert "speaker count differs" in report.skipped["dense"] and "dense" not in report.loaded
    np.testing.assert_array_equal(clf.get_layer("dense").kernel.numpy(), before)
    with pytest.raises(CheckpointError, match=re.escape("dense/kernel: file (512, 5) vs model (512, 3)")):
        import_original_weights(clf, reference.full_model, skip_mismatched_classifier=False)


def test_wrong_architecture_lists_everything(reference):
    model, _ = build_rescnn(**SMALL)
    with pytest.raises(CheckpointError) as err:
        import_original_weights(model, reference.weights)
    msg = str(err.value)
    assert str(reference.weights) in msg
    assert "extra layers (in the file, not in the model): " in msg and "res1_1_branch_2a" in msg
    assert "missing layers" in msg and "conv4-s1" in msg        # SMALL's repeated widths get stage numbers
    assert "affine/kernel: file (2048, 512) vs model (32, 16)" in msg


# ------------------------------------------------------------------------------------- export: reference layout

def test_export_reproduces_the_reference_file(reference, reference_embedding, tmp_path):
    model, _ = reference_embedding
    out = export_original_weights(model, tmp_path / "exported.h5")
    assert out == tmp_path / "exported.h5" and [p.name for p in tmp_path.iterdir()] == ["exported.h5"]
    got, want = _describe(out), _describe(reference.weights)
    assert set(got) == set(want)                 # same groups and dataset paths, empty layer groups included
    assert got == want                           # shapes, dtypes, layouts, attr names, types and values
    with h5py.File(out, "r") as a, h5py.File(reference.weights, "r") as b:
        assert _strings(a, "layer_names") == _strings(b, "layer_names")    # original order reproduced
        for name in _strings(b, "layer_names"):
            for w in _strings(b[name], "weight_names") if len(b[name].attrs["weight_names"]) else []:
                np.testing.assert_array_equal(a[name][w][()], b[name][w][()])


def test_export_matches_h5_layout_txt(reference, reference_embedding, tmp_path):
    text = (reference.dir / "h5_layout.txt").read_text().split("\n\n")[0]    # the save_weights section
    top = eval(re.search(r"top-level keys: (\[.*?\])", text).group(1))     # a literal list of names
    rows = [line.split("\t") for line in text.splitlines() if "\t" in line]
    out = export_original_weights(reference_embedding[0], tmp_path / "exported.h5")
    with h5py.File(out, "r") as f:
        assert sorted(f.keys()) == sorted(top)
        assert sorted(f.attrs.keys()) == ["backend", "keras_version", "layer_names"]
        for layer, weights in rows:
            listed = re.findall(r"([^,(]+)\(([^)]*)\)", weights)
            assert _strings(f[layer], "weight_names") == [name for name, _ in listed]
            for name, shape in listed:
                assert f[layer][name].shape == tuple(int(d) for d in shape.split(",") if d.strip())
                assert f[layer][name].dtype == np.float32


# ---------------------------------------------------------------------------------- export/import, small models

def test_export_import_roundtrip_identical_outputs(tmp_path):
    emb, clf = build_rescnn(**SMALL, num_classes=3)
    _randomise(emb)
    _randomise(clf.get_layer("dense"), seed=5)
    x = _inputs()
    path = export_original_weights(clf, tmp_path / "small.h5")
    emb2, clf2 = build_rescnn(**SMALL, num_classes=3)
    report = import_original_weights(clf2, path)
    assert report.skipped == {} and report.num_values == clf.count_params()
    np.testing.assert_array_equal(_embed(emb2, x), _embed(emb, x))
    np.testing.assert_array_equal(_embed(clf2, x), _embed(clf, x))
    # the classifier's file into the embedding model: the head is reported, the trunk loads
    emb3, _ = build_rescnn(**SMALL)
    assert list(import_original_weights(emb3, path).skipped) == ["dense"]
    np.testing.assert_array_equal(_embed(emb3, x), _embed(emb, x))


def test_export_accepted_by_the_original_readers_algorithm(tmp_path):
    """Oracle only: Keras 3 keeps a port of tf-keras's `load_weights(..., by_name=True)` reader for legacy .h5
    files; it must accept our export as the original would (the importer itself never uses it)."""
    emb, clf = build_rescnn(**SMALL, num_classes=3)
    _randomise(clf)
    path = export_original_weights(clf, tmp_path / "for_original.h5")
    _, fresh = build_rescnn(**SMALL, num_classes=3)
    fresh.load_weights(str(path), by_name=True)
    x = _inputs()
    np.testing.assert_array_equal(_embed(fresh, x), _embed(clf, x))


def test_layer_names_do_not_depend_on_models_built_before(tmp_path):
    build_rescnn(**SMALL)                          # Keras's per-process counter must not leak into names
    model, clf = build_rescnn(**SMALL, num_classes=3)
    assert "add" in [layer.name for layer in model.layers]
    with h5py.File(export_original_weights(clf, tmp_path / "c.h5"), "r") as f:
        names = _strings(f, "layer_names")
    adds = [n for n in names if n.startswith("add")]
    assert adds == ["add"] + [f"add_{i}" for i in range(1, len(adds))]
    assert names[-5:] == ["reshape", "average", "dropout", "affine", "dense"]
    assert names[0] == "input" and len(set(names)) == len(names) == len(clf.layers)


def test_weights_matched_by_name_suffix_not_position(tmp_path):
    emb, _ = build_rescnn(**SMALL)
    _randomise(emb)
    path = export_original_weights(emb, tmp_path / "w.h5")
    with h5py.File(path, "r+") as f:             # a file that lists weights in another order
        for layer in ("conv4-s1", "conv4-s1_bn", "affine"):
            _rewrite_str_attr(f[layer], "weight_names", _strings(f[layer], "weight_names")[::-1])
    fresh, _ = build_rescnn(**SMALL)
    import_original_weights(fresh, path)
    x = _inputs()
    np.testing.assert_array_equal(_embed(fresh, x), _embed(emb, x))


def test_missing_extra_and_misshaped_in_one_error_and_model_untouched(tmp_path):
    src, _ = build_rescnn(**SMALL)
    path = export_original_weights(src, tmp_path / "bad.h5")
    with h5py.File(path, "r+") as f:
        names = [n for n in _strings(f, "layer_names") if n != "res2_0_branch_2a"]       # -> missing
        group = f.create_group("mystery")                                                  # -> extra
        _rewrite_str_attr(group, "weight_names", ["mystery/kernel:0"])
        group.create_dataset("mystery/kernel:0", data=np.zeros((3, 3), "float32"))
        _rewrite_str_attr(f, "layer_names", names + ["mystery"])
    target, _ = build_rescnn(**{**SMALL, "embedding_dim": 8})                               # -> mis-shaped
    before = _snapshot(target)
    with pytest.raises(CheckpointError) as err:
        import_original_weights(target, path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: checkpoint does not fit the model")
    assert "missing layers (in the model, not in the file): res2_0_branch_2a\n" in msg
    assert "extra layers (in the file, not in the model): mystery\n" in msg
    assert "affine/kernel: file (32, 16) vs model (32, 8)" in msg
    assert "affine/bias: file (16,) vs model (8,)" in msg
    assert isinstance(err.value, ValueError)
    for a, b in zip(before, _snapshot(target)):  # checked before anything is assigned
        np.testing.assert_array_equal(a, b)


def test_classifier_auto_named_dense_n_in_file(tmp_path):
    _, clf = build_rescnn(**SMALL, num_classes=3)
    _randomise(clf)
    path = export_original_weights(clf, tmp_path / "c.h5")
    with h5py.File(path, "r+") as f:             # as written by a session that had built another Dense first
        f.move("dense", "dense_1")
        _rewrite_str_attr(f, "layer_names", [("dense_1" if n == "dense" else n) for n in _strings(f, "layer_names")])
    _, fresh = build_rescnn(**SMALL, num_classes=3)
    assert "dense" in import_original_weights(fresh, path).loaded
    np.testing.assert_array_equal(fresh.get_layer("dense").kernel.numpy(), clf.get_layer("dense").kernel.numpy())
    emb, _ = build_rescnn(**SMALL)
    assert list(import_original_weights(emb, path).skipped) == ["dense_1"]


def test_embedding_checkpoint_into_classifier_leaves_head(tmp_path):
    emb, _ = build_rescnn(**SMALL)
    path = export_original_weights(emb, tmp_path / "e.h5")
    _, clf = build_rescnn(**SMALL, num_classes=3)
    report = import_original_weights(clf, path)
    assert "not in the file" in report.skipped["dense"]
    with pytest.raises(CheckpointError, match=r"missing layers \(in the model, not in the file\): dense"):
        import_original_weights(clf, path, skip_mismatched_classifier=False)


def test_classifier_with_other_input_width_is_not_a_speaker_count_skip(tmp_path):
    _, clf = build_rescnn(**SMALL, num_classes=3)
    path = export_original_weights(clf, tmp_path / "c.h5")
    _, other = build_rescnn(**{**SMALL, "embedding_dim": 8}, num_classes=3)
    with pytest.raises(CheckpointError) as err:
        import_original_weights(other, path)
    assert "dense/kernel: file (16, 3) vs model (8, 3)" in str(err.value)
    assert "affine/kernel: file (32, 16) vs model (32, 8)" in str(err.value)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside Keras's save_weights
def test_unreadable_files_fail_clearly(tmp_path):
    model, _ = build_rescnn(**SMALL)
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        import_original_weights(model, tmp_path / "nope.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(CheckpointError, match=r"text\.h5: not an HDF5 file"):
        import_original_weights(model, tmp_path / "text.h5")
    with gzip.open(tmp_path / "zipped.h5.gz", "wb") as fh:
        fh.write(b"whatever")
    with pytest.raises(CheckpointError, match="gunzip it first"):
        import_original_weights(model, tmp_path / "zipped.h5.gz")
    model.save_weights(tmp_path / "k3.weights.h5")
    with pytest.raises(CheckpointError, match="Keras 3 '.weights.h5' file"):
        import_original_weights(model, tmp_path / "k3.weights.h5")
    with h5py.File(tmp_path / "empty.h5", "w"):
        pass
    with pytest.raises(CheckpointError, match="no 'layer_names' attribute"):
        import_original_weights(model, tmp_path / "empty.h5")


def test_export_is_atomic(tmp_path, monkeypatch):
    model, _ = build_rescnn(**SMALL)
    path = export_original_weights(model, tmp_path / "w.h5")
    good = path.read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")
    monkeypatch.setattr(h5py.Group, "create_dataset", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_original_weights(model, path)
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["w.h5"]


def test_large_string_lists_are_chunked_like_tf_keras(tmp_path):
    from voiceprint.training.original_h5 import _read_str_list, _write_str_list
    names = [f"layer_with_a_long_name_{i:05d}" for i in range(4000)]       # ~116 kB > the 64 kB header limit
    with h5py.File(tmp_path / "a.h5", "w") as f:
        _write_str_list(f, "layer_names", names)
        assert "layer_names" not in f.attrs and "layer_names0" in f.attrs
        assert _read_str_list(f, "layer_names") == names


def test_read_original_layout_describes_without_loading(tmp_path):
    emb, _ = build_rescnn(**SMALL)
    layout, version, names, weighted = read_original_layout(export_original_weights(emb, tmp_path / "w.h5"))
    assert layout == "save_weights" and version == "2.21.0" and len(names) == len(emb.layers)
    assert weighted["affine"].weight_names == ("affine/kernel:0", "affine/bias:0")
    assert weighted["affine"].shapes == ((32, 16), (16,)) and weighted["affine"].suffixes == ("kernel", "bias")
    assert isinstance(ImportReport("p", "save_weights", "2").summary(), str)

"""The TensorFlow-free runtime: bundles carry a checked model.onnx, Recognizer and CLI run it on ONNX Runtime with
numpy features, the two backends agree, and the runtime path never imports TensorFlow, Keras, DVC or numba."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from voiceprint import features as F
from voiceprint.features import filterbanks as FB, kernels
from voiceprint.data.audio import _resample
from voiceprint.serving.bundle import BundleError, load_bundle

REPO = Path(__file__).resolve().parents[1]
FEATURES = {"kind": "logmel_cmn", "vad": "original", "sample_rate": 16000, "num_bands": 64, "min_seconds": 0.5,
            "window_frames": 0, "hop_frames": 80}
THRESHOLDS = {"eer": 0.5, "low_far": 0.9, "low_far_rate": 0.01}
MIN_COSINE = 0.99999      # issue 13: embeddings from the two backends agree to at least this


def _cosines(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    """Synthetic speech-like files of 1-6 s: 16 kHz FLAC, plus one 44.1 kHz stereo WAV (resampled, mixed down)."""
    from voiceprint.data.corpus.synthetic import generate

    root = tmp_path_factory.mktemp("audio")
    manifest = generate(root, num_speakers=2, utterances_per_speaker=2, min_seconds=1.0, max_seconds=6.0, seed=3)
    files = [root / p for p in manifest.path]
    y, sr = sf.read(files[0], dtype="float32")
    stereo = np.stack([_resample(y, sr, 44100), 0.5 * _resample(y, sr, 44100)], axis=1)
    sf.write(root / "stereo.wav", stereo, 44100, subtype="PCM_16")
    return files + [root / "stereo.wav"]


# ------------------------------------------------------------------------------ features without numba

@pytest.mark.parametrize("rates", [(8000, 16000), (44100, 16000), (22050, 16000), (48000, 16000), (16000, 8000)])
def test_resampling_is_librosas_bit_for_bit(rates):
    librosa = pytest.importorskip("librosa")
    y = np.random.default_rng(0).uniform(-0.5, 0.5, 12345).astype(np.float32)
    want = librosa.resample(y, orig_sr=rates[0], target_sr=rates[1], res_type="soxr_hq")
    got = _resample(y, *rates)
    assert got.dtype == np.float32 and np.array_equal(got, want)


@pytest.mark.parametrize("kind", ["logmel_cmn", "fbank_norm"])
@pytest.mark.parametrize("vad", ["original", "energy"])
def test_numpy_engine_gives_the_numba_features(audio, kind, vad):
    """Spectra differ only by float64 round-off (<1e-13 relative), which the float32 features never show here;
    the chunked long-file path agrees too."""
    pytest.importorskip("numba")
    for path in audio:
        with F.engine("numba"):
            want, want_stats = F.featurize_file(path, kind, 16000, 0.5, vad=vad)
        with F.engine("numpy"):
            got, got_stats = F.featurize_file(path, kind, 16000, 0.5, vad=vad)
            chunked, _ = F.featurize_file(path, kind, 16000, 0.5, vad=vad, long_file_seconds=1.0,
                                          chunk_seconds=0.7, with_mfcc_stats=False)
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
        np.testing.assert_allclose(got_stats, want_stats, rtol=0, atol=2e-5)
        np.testing.assert_array_equal(chunked, got)


def test_numpy_band_energies_match_the_kernel_at_the_edges():
    pytest.importorskip("numba")
    x = (0.1 * np.random.default_rng(1).normal(size=16000)).astype(np.float32)
    cases = [(x, 0, 98, 160, FB._hann(400), 512, FB._librosa_mel(16000, 512, 64, 20.0)),
             (x, -200, 101, 160, FB._hann(400), 400, FB._librosa_mel(16000, 400, 64, 0.0)),   # frames before/after
             (x, 0, 98, 160, FB._ones(400), 512, FB._psf_bands(64, 16000), F.PREEMPH)]       # pre-emphasis
    for args in cases:
        with F.engine("numba"):
            want = kernels._band_energies(*args)
        with F.engine("numpy"):
            got = kernels._band_energies(*args)
        assert np.abs(got - want).max() <= 1e-13 * np.abs(want).max()


def test_engine_names_are_checked():
    with pytest.raises(ValueError, match="feature engine 'fast'"):
        with F.engine("fast"):
            pass


# ------------------------------------------------------------------------------ bundles with model.onnx

@pytest.fixture(scope="module")
def model():
    keras = pytest.importorskip("keras")
    pytest.importorskip("tf2onnx")
    from voiceprint.models import build_rescnn

    keras.utils.set_random_seed(0)
    built, _ = build_rescnn(filters=[4, 8, 8, 8], blocks=1, embedding_dim=16, num_bands=64, num_classes=3,
                            dropout=0.0)
    # Random BatchNorm statistics: a fresh BN is an identity that an export could get wrong unseen.
    rng = np.random.default_rng(0)
    for v in built.weights:
        if v.path.endswith("moving_variance"):
            v.assign(rng.uniform(0.5, 1.5, tuple(v.shape)).astype(np.float32))
        elif v.path.endswith("moving_mean"):
            v.assign(rng.normal(0.0, 0.1, tuple(v.shape)).astype(np.float32))
    return built


@pytest.fixture(scope="module")
def bundle(model, tmp_path_factory):
    from voiceprint.serving.bundle import save_bundle

    return save_bundle(tmp_path_factory.mktemp("bundle") / "voiceprint", model, system="head", features=FEATURES,
                       thresholds=THRESHOLDS, evaluation={"eer": 0.1}, onnx=True)


def test_the_bundle_carries_a_hashed_onnx_model_and_auto_runs_it(bundle, model):
    from voiceprint.serving.bundle import file_sha256

    calibration = json.loads((bundle / "thresholds.json").read_text())
    assert sorted(p.name for p in bundle.iterdir()) == ["model.keras", "model.onnx", "thresholds.json"]
    assert calibration["onnx_sha256"] == file_sha256(bundle / "model.onnx")
    onnx, keras_run = load_bundle(bundle, backend="auto"), load_bundle(bundle, backend="keras")
    assert (onnx.backend, keras_run.backend) == ("onnx", "keras")
    assert onnx.model_sha256 == keras_run.model_sha256 == calibration["model_sha256"]
    rng = np.random.default_rng(5)
    for frames in (2, 53, 160, 777):       # lengths the export check did not use
        x = rng.normal(size=(3, frames, 64, 1)).astype(np.float32)
        assert _cosines(onnx.model(x), model(x, training=False).numpy()).min() >= MIN_COSINE, frames


def test_same_weights_give_the_same_onnx_bytes(bundle, model, tmp_path):
    from voiceprint.serving.bundle import save_bundle

    again = save_bundle(tmp_path / "again", model, system="head", features=FEATURES, thresholds=THRESHOLDS,
                        evaluation={"eer": 0.1}, onnx=True)
    assert (again / "model.onnx").read_bytes() == (bundle / "model.onnx").read_bytes()
    assert (again / "thresholds.json").read_text() == (bundle / "thresholds.json").read_text()


def test_recognizer_backends_agree_on_files(bundle, audio):
    from voiceprint.serving.api import Recognizer

    onnx, keras_run = Recognizer(bundle, backend="onnx"), Recognizer(bundle, backend="keras")
    assert (onnx.backend, onnx.feature_engine) == ("onnx", "numpy")
    assert keras_run.backend == "keras"
    got, want = onnx.embed_files(audio), keras_run.embed_files(audio)
    assert got.shape == want.shape == (len(audio), 16)
    assert _cosines(got, want).min() >= MIN_COSINE
    a, b = audio[0], audio[2]
    assert onnx.verify(a, b).score == pytest.approx(keras_run.verify(a, b).score, abs=1e-4)


def test_the_onnx_file_is_checked_like_the_others(bundle, tmp_path):
    copy = shutil.copytree(bundle, tmp_path / "copy")
    with open(copy / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    for backend in ("onnx", "keras", "auto"):     # every file the calibration names, whichever backend runs
        with pytest.raises(BundleError, match=r"model\.onnx: sha256 .* differs from onnx_sha256"):
            load_bundle(copy, backend=backend)
    (copy / "model.onnx").unlink()
    with pytest.raises(BundleError, match="model.onnx missing, but thresholds.json has onnx_sha256"):
        load_bundle(copy, backend="auto")


def test_a_bundle_without_onnx_runs_on_keras_and_says_so_when_onnx_is_asked(model, tmp_path):
    from voiceprint.serving.bundle import add_onnx, save_bundle

    old = save_bundle(tmp_path / "old", model, system="head", features=FEATURES, thresholds=THRESHOLDS,
                      evaluation={"eer": 0.1})
    assert load_bundle(old, backend="auto").backend == "keras"
    with pytest.raises(BundleError, match="no model.onnx in this bundle"):
        load_bundle(old, backend="onnx")
    with pytest.raises(BundleError, match="backend 'tflite'"):
        load_bundle(old, backend="tflite")
    add_onnx(old)                                   # an old bundle gains one, checked
    assert load_bundle(old, backend="auto").backend == "onnx"


def test_a_mismatched_export_is_refused(model, bundle):
    keras = pytest.importorskip("keras")
    from voiceprint.serving.export import ExportMismatchError, check_onnx
    from voiceprint.models import build_rescnn

    keras.utils.set_random_seed(1)
    other, _ = build_rescnn(filters=[4, 8, 8, 8], blocks=1, embedding_dim=16, num_bands=64, num_classes=3,
                            dropout=0.0)
    assert check_onnx(model, bundle / "model.onnx") >= MIN_COSINE
    with pytest.raises(ExportMismatchError, match="differ from the Keras model's"):
        check_onnx(other, bundle / "model.onnx")


def test_a_bare_onnx_file_loads_with_default_features(bundle):
    bare = load_bundle(bundle / "model.onnx", backend="auto")
    assert (bare.backend, bare.embedding_dim, bare.thresholds, bare.features.kind) == ("onnx", 16, None,
                                                                                        "logmel_cmn")
    with pytest.raises(BundleError, match="runs on the onnx backend, not keras"):
        load_bundle(bundle / "model.onnx", backend="keras")


# ------------------------------------------------------------------------------ no TensorFlow in the runtime

HEAVY = ("tensorflow", "keras", "dvc", "numba", "librosa", "scipy", "pandas", "sklearn")


def _run_isolated(code: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)


def test_the_runtime_never_imports_tensorflow_keras_or_dvc(bundle, audio, tmp_path):
    code = f"""
import json, sys
from voiceprint import Recognizer
rec = Recognizer(sys.argv[1], backend="onnx")
emb = rec.embed_files(sys.argv[2:4])
result = rec.verify(sys.argv[2], sys.argv[3])
from voiceprint.serving.cli import main
code = main(["verify", sys.argv[2], sys.argv[3], "--model", sys.argv[1], "--json", "--quiet"])
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))
print(json.dumps({{"backend": rec.backend, "dim": emb.shape[1], "cli": code, "heavy": heavy}}))
"""
    done = _run_isolated(code, bundle, audio[0], audio[1])
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"backend": "onnx", "dim": 16, "cli": 0, "heavy": []}


def test_import_voiceprint_recognizer_is_lazy():
    done = _run_isolated("import sys, voiceprint; assert 'voiceprint.serving.api' not in sys.modules; "
                         "from voiceprint import Recognizer; print(Recognizer.__module__, "
                         "sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras', 'onnxruntime'}))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["voiceprint.serving.api", "[]"]


# ------------------------------------------------------------------------------ the shipped model

def test_the_shipped_model_has_an_onnx_twin_that_agrees(audio):
    pytest.importorskip("keras")
    from voiceprint.serving.api import Recognizer
    from voiceprint.serving.pretrained import SHIPPED, describe

    assert "model.onnx" in describe()["sha256"]
    onnx, keras_run = Recognizer(SHIPPED), Recognizer(SHIPPED, backend="keras")
    assert onnx.backend == "onnx"
    assert _cosines(onnx.embed_files(audio), keras_run.embed_files(audio)).min() >= MIN_COSINE

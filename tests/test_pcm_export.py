"""The raw-PCM models (voiceprint.serving.pcm_export): features computed in the graph, embeddings as the package makes
them.

Synthetic tests (always run with TensorFlow installed) use one tiny ResCNN with random weights, BatchNorm
statistics included; the real-data test (skipped without ../shared) exports the shipped model and compares it
with :class:`voiceprint.serving.api.Recognizer` on a few LibriSpeech-mini files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
import keras  # noqa: E402

from voiceprint.core import embedding  # noqa: E402
from voiceprint import features as F  # noqa: E402
from voiceprint.serving import pcm_export as P  # noqa: E402
from voiceprint.features import filterbanks  # noqa: E402
from voiceprint.serving.bundle import DEFAULT_FEATURES  # noqa: E402
from voiceprint.models.rescnn import build_rescnn  # noqa: E402

DIM = 16
MIN_COSINE = 0.9999
# Sample counts around the framing edges: <= 1 frame, exactly 1 frame, 1 sample into frame 2, a hop boundary.
EDGE_LENGTHS = (1, 399, 400, 401, 559, 560, 561, 16000)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "librispeech-mini"


def _randomise(model, seed=0):
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


def _speechlike(n, seed):
    """A decaying harmonic tone in noise with a silent gap: spectral shape, loud and quiet frames, digital zeros."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    y = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((180, 360, 540, 1100), 1)) * 0.2
    y = y * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.01 * rng.standard_normal(n)
    y[n // 3: n // 3 + min(n // 6, 800)] = 0.0
    return y.astype(np.float32)


def _package_embedding(model, signal, settings):
    """What Recognizer computes after the VAD: features, float16 rounding, the model."""
    feats = F.FEATURE_KINDS[settings["kind"]](signal).astype(np.float16).astype(np.float32)
    return embedding.embed_features(model, [feats])[0]


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    m, _ = build_rescnn(filters=[4, 8, 8, 8], blocks=1, embedding_dim=DIM, num_bands=64)
    return _randomise(m)


@pytest.fixture(scope="module")
def onnx_file(model, tmp_path_factory):
    """The default features (logmel_cmn) exported through the export command's main, from a bare .keras file."""
    pytest.importorskip("tf2onnx")
    pytest.importorskip("onnxruntime")
    from voiceprint.serving import export as E

    root = tmp_path_factory.mktemp("pcm")
    model.save(root / "tiny.keras")
    assert E.main([str(root / "tiny.keras"), "--format", "pcm-onnx", "-o", str(root / "model_pcm.onnx")]) == 0
    return root / "model_pcm.onnx"


# ------------------------------------------------------------------------------------------------ front end

@pytest.mark.parametrize("kind", sorted(F.FEATURE_KINDS))
def test_graph_features_match_the_package_features_at_framing_edges(kind):
    fn = P.pcm_features_function({**DEFAULT_FEATURES, "kind": kind})
    for i, n in enumerate(EDGE_LENGTHS):
        signal = _speechlike(n, seed=i)
        want = F.FEATURE_KINDS[kind](signal)
        got = fn(signal[None]).numpy()[0]
        assert got.shape == want.shape == (F.num_frames(n), 64), (kind, n)
        # float32 spectrum in the graph vs float64 in the package: ~1e-6 of features of magnitude ~1-10
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=f"{kind}, {n} samples")


def test_graph_rounds_features_to_float16_like_the_recognizer():
    signal = _speechlike(8000, seed=3)
    got = P.pcm_features_function(DEFAULT_FEATURES, round_features=True)(signal[None]).numpy()[0]
    want = F.logmel_cmn(signal).astype(np.float16).astype(np.float32)
    assert np.array_equal(got, got.astype(np.float16).astype(np.float32))     # every value is a float16
    # the float32 spectrum can round across a float16 tie only rarely, and then by one float16 step
    assert np.mean(got == want) > 0.98
    assert np.max(np.abs(got - want) / np.maximum(np.abs(want), 2.0 ** -14)) <= 2.0 ** -10 + 1e-7


def test_graph_mfcc_statistics_match_the_package():
    fn = P._mfcc_stats_frontend(16000)
    for i, n in enumerate((561, 16000, 16000 * 3 + 17)):
        signal = _speechlike(n, seed=20 + i)
        want = F.mfcc_stats(signal)
        got = fn(signal[None]).numpy()[0]
        assert got.shape == want.shape == (40,)
        # float32 in the graph, float64 in the package: ~1e-4 dB of statistics of magnitude ~1-300
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3, err_msg=str(n))


def test_onnx_pcm_model_with_a_statistics_branch_embeds_like_the_package(model, tmp_path):
    pytest.importorskip("tf2onnx")
    pytest.importorskip("onnxruntime")
    from voiceprint.evaluation.stats_lda import fit_stats_lda

    signals = [_speechlike(16000 + 300 * i, seed=30 + i) for i in range(12)]
    stats = np.stack([F.mfcc_stats(s) for s in signals])
    lda = fit_stats_lda(stats, np.repeat(np.arange(4), 3), weight=0.4)
    embedder = P.load_pcm_onnx(P.export_pcm_onnx(model, DEFAULT_FEATURES, tmp_path / "joint.onnx", stats_lda=lda))
    for signal, row in zip(signals[:3], stats):
        want = lda.joint(_package_embedding(model, signal, DEFAULT_FEATURES)[None], row[None])[0]
        got = embedder(signal)
        assert got.shape == (DIM + lda.output_dim,) and float(got @ want) >= MIN_COSINE


def test_frontend_matrices_give_the_power_spectrum_and_filterbank():
    dft, filters = P.frontend_matrices("logmel_cmn", 16000, 64)
    assert dft.shape == (400, 514) and filters.shape == (514, 64)
    frame = np.random.default_rng(0).standard_normal(400)
    power = np.abs(np.fft.rfft(frame * filterbanks._hann(400), 512)) ** 2
    np.testing.assert_allclose((frame @ dft) ** 2 @ filters, power @ filters[:257], rtol=1e-5)
    with pytest.raises(ValueError, match="feature kind 'mfcc' has no in-graph front end"):
        P.frontend_matrices("mfcc", 16000, 64)


# ------------------------------------------------------------------------------------------------ ONNX

def test_onnx_pcm_model_embeds_like_the_package(model, onnx_file):
    embedder = P.load_pcm_onnx(onnx_file)
    for i, n in enumerate((401, 561, 16000 * 3 + 17)):
        signal = _speechlike(n, seed=10 + i)
        got = embedder(signal)
        want = _package_embedding(model, signal, DEFAULT_FEATURES)
        assert got.shape == (DIM,) and got.dtype == np.float32
        assert float(got @ want) >= MIN_COSINE, n
        assert abs(float(np.linalg.norm(got)) - 1.0) < 1e-5


def test_onnx_pcm_model_runs_on_plain_onnxruntime_with_batches(onnx_file):
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, len(inp.shape)) == ("pcm", "tensor(float)", 2)
    assert (out.name, out.shape[1]) == ("embedding", DIM)
    rows = np.stack([_speechlike(3000, seed=20), _speechlike(3000, seed=21)])
    batch = session.run(["embedding"], {"pcm": rows})[0]
    single = [session.run(["embedding"], {"pcm": row[None]})[0][0] for row in rows]
    # each row is featurized (mean normalisation included) on its own
    np.testing.assert_allclose(batch, np.stack(single), atol=1e-5)
    assert float(batch[0] @ batch[1]) < 0.9999       # and the two rows are different utterances


def test_onnx_fbank_norm_pcm_model_embeds_like_the_package(model, tmp_path):
    pytest.importorskip("tf2onnx")
    pytest.importorskip("onnxruntime")
    settings = {**DEFAULT_FEATURES, "kind": "fbank_norm"}
    embedder = P.load_pcm_onnx(P.export_pcm_onnx(model, settings, tmp_path / "fbank.onnx"))
    for n in (5000, 15400):
        signal = _speechlike(n, seed=n)
        got, want = embedder(signal), _package_embedding(model, signal, settings)
        assert float(got @ want) >= MIN_COSINE, n


def test_pcm_embedder_rejects_bad_shapes(onnx_file):
    embedder = P.load_pcm_onnx(onnx_file)
    for bad in (np.zeros(0, np.float32), np.zeros((1, 0), np.float32), np.zeros((2, 3, 4), np.float32)):
        with pytest.raises(ValueError, match="pcm must be"):
            embedder(bad)


def test_loaders_name_a_missing_or_bad_file(tmp_path):
    pytest.importorskip("onnxruntime")
    with pytest.raises(FileNotFoundError, match="ONNX file .*nothing.onnx not found"):
        P.load_pcm_onnx(tmp_path / "nothing.onnx")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.onnx: not a valid ONNX model"):
        P.load_pcm_onnx(tmp_path / "bad.onnx")


def test_export_refuses_other_bands_and_windowed_embedding(model, tmp_path):
    with pytest.raises(ValueError, match="num_bands is 40, but the model takes 64 bands"):
        P.export_pcm_onnx(model, {**DEFAULT_FEATURES, "num_bands": 40}, tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="window_frames is 40: a PCM model embeds the whole utterance"):
        P.export_pcm_tflite(model, {**DEFAULT_FEATURES, "window_frames": 40}, tmp_path / "x.tflite")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------ TFLite

def test_tflite_pcm_model_embeds_like_the_package(model, tmp_path):
    embedder = P.load_pcm_tflite(P.export_pcm_tflite(model, DEFAULT_FEATURES, tmp_path / "model_pcm.tflite"))
    for i, n in enumerate((401, 7000, 16000 * 2)):   # lengths change between calls: the input is resized
        signal = _speechlike(n, seed=40 + i)
        got = embedder(signal)
        assert got.shape == (DIM,)
        assert float(got @ _package_embedding(model, signal, DEFAULT_FEATURES)) >= MIN_COSINE, n


# ------------------------------------------------------------------------------------------------ real audio

@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/librispeech-mini")
def test_shipped_model_as_pcm_onnx_agrees_with_the_recognizer_on_real_files(tmp_path):
    pytest.importorskip("tf2onnx")
    pytest.importorskip("onnxruntime")
    from voiceprint.serving.api import Recognizer
    from voiceprint.data.audio import load_audio
    from voiceprint.serving.pretrained import SHIPPED

    rec = Recognizer(SHIPPED, backend="keras")
    embedder = P.load_pcm_onnx(P.export_pcm_onnx(rec.bundle.model, rec.bundle.features, tmp_path / "pcm.onnx",
                                                 stats_lda=rec.bundle.stats_lda))
    files = sorted(SHARED.rglob("*.flac"))
    # the shortest, the median and the longest file (by size): ~1.5 s to ~30 s; bench/pcm_model_check.py does all
    by_length = sorted(files, key=lambda p: p.stat().st_size)
    for path in [by_length[0], by_length[len(by_length) // 2], by_length[-1]]:
        speech = F.apply_vad(load_audio(path), rec.bundle.features.vad or "original")
        assert float(embedder(speech) @ rec.embed(path)) >= MIN_COSINE, path

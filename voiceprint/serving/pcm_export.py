"""Raw audio in, embedding out: one ONNX (or TFLite) model that computes the features in its graph.

``export_pcm_onnx`` / ``export_pcm_tflite`` write a model whose input is the PCM signal itself, so a program in
any language with ONNX Runtime (or an app with TFLite) needs nothing of this package to embed audio.

Contract (docs/pcm-model.md): input ``pcm`` float32 ``(batch, samples)``, mono, at the bundle's sample rate (16 kHz
for the shipped model), values in [-1, 1] (what :func:`voiceprint.data.audio.load_audio` decodes), any length; a batch
holds utterances of equal length (each row is featurized and normalised on its own). Output ``embedding``
float32 ``(batch, D)``, L2-normalised. The silence trim / VAD of the bundle stays OUTSIDE the graph: run it before
(``voiceprint.features.apply_vad``) to match the package's embeddings; without it the model embeds the
whole signal.

The graph reproduces :mod:`voiceprint.features` step by step:

* framing: ``frame_len`` (25 ms) frames every ``frame_step`` (10 ms), no centring, the tail zero-padded,
  ``1 + ceil((N - frame_len) / frame_step)`` frames (1 when ``N <= frame_len``);
* ``logmel_cmn``: periodic Hann window, |rfft|^2 at NFFT 512, librosa Slaney mel filters (fmin 20 Hz, fmax sr/2),
  ``log(E + 1e-6)``, minus each band's mean over the utterance;
* ``fbank_norm``: pre-emphasis 0.97 (first sample kept), rectangular window, |rfft|^2 / 512, the
  python_speech_features HTK filters, zero energies -> float64 eps, per-frame ``(v - mean) / max(std, 1e-12)``;
* features rounded to float16 and back, as :meth:`voiceprint.serving.api.Recognizer.features` does (the feature store
  keeps float16, so models are trained and calibrated on those values);
* the model on the whole utterance (bundles with ``window_frames > 0`` are refused), then ``e / max(|e|, 1e-12)``;
* for a bundle with an MFCC-statistics branch (``stats_lda``, :mod:`voiceprint.evaluation.stats_lda`), also
  :func:`voiceprint.features.mfcc_stats` in the graph (centred 400-sample frames every 160, periodic Hann, |rfft|^2,
  64 Slaney mels from 0 Hz, 10 log10 with the 80 dB floor below the utterance's maximum, orthonormal DCT-II to 20
  coefficients, their means and population stds), its LDA projection and the joint vector
  ``[sqrt(1 - w) unit(e), sqrt(w) unit(lda)]``: the output is then the bundle's embedding, as
  :meth:`voiceprint.serving.api.Recognizer.embed` returns it.

Window, DFT and framing are one strided convolution whose kernel holds ``window * cos`` and ``window * sin`` of
the NFFT-point DFT (the zero padding from frame_len to NFFT contributes nothing, so only frame_len rows exist);
the power spectrum's squares and the mel filter sum are one matmul (the filterbank stacked twice, for the real
and imaginary parts). Both are builtin ops in ONNX and TFLite. Everything runs in float32 (the package computes
the spectrum in float64); measured agreement: docs/pcm-model.md.

The graph is built in TensorFlow around the Keras model and converted with tf2onnx (ONNX, opset 17) or the
TFLite converter (builtin ops only), so both formats share one front end.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from voiceprint.core.errors import DataError
from voiceprint.core.outputs import atomic_path

PCM_INPUT = "pcm"
OUTPUT_NAME = "embedding"
ONNX_OPSET = 17
LOG_FLOOR = 1e-6        # logmel_cmn's log(E + 1e-6)
STD_FLOOR = 1e-12       # fbank_norm's max(std, 1e-12), and the final max(|e|, 1e-12)

__all__ = ["PCM_INPUT", "OUTPUT_NAME", "frontend_matrices", "pcm_features_function", "pcm_function", "export_pcm_onnx",
           "export_pcm_tflite", "load_pcm_onnx", "load_pcm_tflite", "PcmEmbedder"]


def frontend_matrices(kind: str, sample_rate: int, num_bands: int) -> tuple[np.ndarray, np.ndarray]:
    """(dft, filters) float32 constants of the in-graph front end.

    ``dft`` (frame_len, 2 * bins): frame @ dft = [Re, Im] of rfft(frame * window, NFFT), bins = NFFT/2 + 1
    (rows past NFFT are zero: rfft cuts longer frames). ``filters`` (2 * bins, num_bands): [Re, Im]^2 @ filters
    = the filterbank energies of :mod:`voiceprint.features` (fbank_norm's 1/NFFT folded in).
    """
    from voiceprint import features as F
    from voiceprint.features import filterbanks, framing

    frame_len, _ = framing._frame_params(sample_rate)
    nfft = F.NFFT
    bins = nfft // 2 + 1
    if kind == "logmel_cmn":
        window = filterbanks._hann(frame_len)
        # What filterbanks._librosa_mel wraps (it keeps only the sparse form): the package's float32 weights.
        bank = filterbanks._slaney_mel(sample_rate, nfft, num_bands, 20.0, sample_rate / 2).T.astype(np.float64)
    elif kind == "fbank_norm":
        window = filterbanks._ones(frame_len)
        bank = filterbanks._psf_filterbank(num_bands, nfft, sample_rate, 1.0 / nfft)
    else:
        # A registered kind computes in numpy; its graph twin has to be written here too (none is silently assumed).
        raise DataError(f"feature kind {kind!r} has no in-graph front end; PCM export supports: fbank_norm, "
                        f"logmel_cmn (registered kinds: {', '.join(sorted(F.FEATURE_KINDS))})")
    used = min(frame_len, nfft)
    n = np.arange(used)[:, None]
    k = np.arange(bins)[None, :]
    angle = 2.0 * np.pi * ((n * k) % nfft) / nfft       # exact phase reduction before the float64 cos/sin
    dft = np.zeros((frame_len, 2 * bins))
    dft[:used, :bins] = window[:used, None] * np.cos(angle)
    dft[:used, bins:] = -window[:used, None] * np.sin(angle)
    filters = np.concatenate([bank, bank], axis=0)
    return dft.astype(np.float32), filters.astype(np.float32)


def _settings_of(model, features):
    """``features`` as FeatureSettings, checked against the model (bands) and the graph (no windows)."""
    from voiceprint.serving.bundle import parse_features
    from voiceprint.features.settings import FeatureSettings

    if not isinstance(features, FeatureSettings):
        features = parse_features(dict(features), "features")
    shape = model.input_shape
    if not isinstance(shape, tuple) or len(shape) != 4 or shape[2] is None or shape[3] != 1:
        raise DataError(f"expected a model with one input (batch, frames, bands, 1); got {shape}")
    if int(shape[2]) != features.num_bands:
        raise DataError(f"features.num_bands is {features.num_bands}, but the model takes {shape[2]} bands")
    if features.window_frames > 0:
        # The windowed mean (voiceprint.core.embedding.windows) runs in TensorFlow, but tf2onnx 1.17 converts the
        # reshape of the windows into a batch wrongly (the model then sees one window): refused, not approximated.
        raise DataError(f"features.window_frames is {features.window_frames}: a PCM model embeds the whole "
                        f"utterance in one pass (window_frames 0) only")
    return features


def _frontend(settings, round_features: bool):
    """The in-graph featurizer: a Python function of TF ops, pcm (B, N) -> features (B, T, bands)."""
    import tensorflow as tf

    from voiceprint import features as F
    from voiceprint.features import framing

    frame_len, frame_step = framing._frame_params(settings.sample_rate)
    dft, filters = frontend_matrices(settings.kind, settings.sample_rate, settings.num_bands)
    emphasis = np.float32(F.PREEMPH)

    def featurize(pcm):
        # Constants made while tracing, inside the graph: eager tensors would be captured as extra inputs.
        kernel = tf.constant(dft[:, None, :])              # conv1d kernel (width, in=1, out)
        bank = tf.constant(filters)
        x = pcm
        if settings.kind == "fbank_norm":   # in float32, as the package pre-emphasises decoded (float32) audio
            x = tf.concat([x[:, :1], x[:, 1:] - emphasis * x[:, :-1]], axis=1)
        n = tf.shape(x)[1]
        beyond = tf.maximum(n - frame_len, 0)
        count = beyond // frame_step + tf.cast(beyond % frame_step > 0, tf.int32) + 1
        pad = frame_len + (count - 1) * frame_step - n        # zeros completing the last frame
        x = tf.pad(x, tf.stack([tf.constant([0, 0]), tf.stack([0, pad])]))
        spectrum = tf.nn.conv1d(tf.expand_dims(x, 2), kernel, stride=frame_step, padding="VALID")   # (B, T, 2 bins)
        batch, frames = tf.shape(spectrum)[0], tf.shape(spectrum)[1]
        flat = tf.reshape(tf.square(spectrum), [-1, dft.shape[1]])
        energies = tf.reshape(tf.matmul(flat, bank), tf.stack([batch, frames, settings.num_bands]))
        if settings.kind == "logmel_cmn":
            feats = tf.math.log(energies + LOG_FLOOR)
            feats = feats - tf.reduce_mean(feats, axis=1, keepdims=True)
        else:
            energies = tf.where(energies == 0.0, tf.constant(np.finfo(np.float64).eps, tf.float32), energies)
            mean = tf.reduce_mean(energies, axis=2, keepdims=True)
            std = tf.sqrt(tf.reduce_mean(tf.square(energies - mean), axis=2, keepdims=True))
            feats = (energies - mean) / tf.maximum(std, STD_FLOOR)
        if round_features:
            feats = tf.cast(tf.cast(feats, tf.float16), tf.float32)
        return feats

    return featurize


def _mfcc_stats_frontend(sample_rate: int):
    """:func:`voiceprint.features.mfcc_stats` as TF ops: pcm (B, N) -> (B, 40) [means, stds] of 20 MFCCs."""
    import tensorflow as tf

    from voiceprint.features import filterbanks, mfcc as M

    n_fft, hop, bins = M.MFCC_N_FFT, M.MFCC_HOP, M.MFCC_N_FFT // 2 + 1
    n = np.arange(n_fft)[:, None]
    angle = 2.0 * np.pi * ((n * np.arange(bins)[None, :]) % n_fft) / n_fft
    window = filterbanks._hann(n_fft)[:, None]
    dft = np.concatenate([window * np.cos(angle), -window * np.sin(angle)], axis=1).astype(np.float32)
    bank = filterbanks._slaney_mel(sample_rate, n_fft, M.MFCC_BANDS, 0.0, sample_rate / 2).T.astype(np.float64)
    filters = np.concatenate([bank, bank], axis=0).astype(np.float32)
    dct = M._dct_ortho(M.MFCC_BANDS, 20).astype(np.float32)

    def stats(pcm):
        kernel, mel, cosines = tf.constant(dft[:, None, :]), tf.constant(filters), tf.constant(dct)
        # librosa's centred frames: n_fft / 2 zeros before and after, 1 + N // hop frames
        x = tf.pad(pcm, [[0, 0], [n_fft // 2, n_fft // 2]])
        spectrum = tf.nn.conv1d(tf.expand_dims(x, 2), kernel, stride=hop, padding="VALID")
        batch, frames = tf.shape(spectrum)[0], tf.shape(spectrum)[1]
        power = tf.matmul(tf.reshape(tf.square(spectrum), [-1, 2 * bins]), mel)
        db = 10.0 * tf.math.log(tf.maximum(power, 1e-10)) / np.float32(np.log(10.0))
        db = tf.reshape(db, tf.stack([batch, frames, M.MFCC_BANDS]))
        db = tf.maximum(db, tf.reduce_max(db, axis=[1, 2], keepdims=True) - M.MFCC_TOP_DB)
        mfcc = tf.reshape(tf.matmul(tf.reshape(db, [-1, M.MFCC_BANDS]), cosines), tf.stack([batch, frames, 20]))
        mean = tf.reduce_mean(mfcc, axis=1)
        std = tf.sqrt(tf.reduce_mean(tf.square(mfcc - mean[:, None, :]), axis=1))
        return tf.concat([mean, std], axis=1)

    return stats


def pcm_features_function(features, *, round_features: bool = False):
    """A ``tf.function`` pcm ``(batch, samples)`` -> the graph's features ``(batch, frames, bands)``: the front
    end alone, to compare with :mod:`voiceprint.features` (``features``: FeatureSettings or its dict)."""
    import tensorflow as tf

    from voiceprint.serving.bundle import parse_features
    from voiceprint.features.settings import FeatureSettings

    if not isinstance(features, FeatureSettings):
        features = parse_features(dict(features), "features")
    spec = tf.TensorSpec([None, None], tf.float32, name=PCM_INPUT)
    return tf.function(_frontend(features, round_features), input_signature=[spec])


def pcm_function(model, features, *, round_features: bool = True, stats_lda=None):
    """A ``tf.function`` pcm ``(batch, samples)`` float32 -> ``{"embedding": (batch, D)}`` (see module docstring).

    ``features``: a :class:`voiceprint.features.FeatureSettings` or its dict. ``round_features``: round the
    features to float16 and back, as the package does before its model (True matches
    :class:`voiceprint.serving.api.Recognizer`). ``stats_lda``: the bundle's statistics branch, joined in the graph.
    """
    import tensorflow as tf

    spec = tf.TensorSpec([None, None], tf.float32, name=PCM_INPUT)
    return tf.function(_embed_fn(model, features, round_features, stats_lda), input_signature=[spec])


def _unit(x):
    import tensorflow as tf

    return x / tf.maximum(tf.sqrt(tf.reduce_sum(tf.square(x), axis=-1, keepdims=True)), STD_FLOOR)


def _embed_fn(model, features, round_features: bool, stats_lda=None):
    """pcm_function's Python body (TF ops), for tf.function or a Keras ExportArchive endpoint."""
    import tensorflow as tf

    settings = _settings_of(model, features)
    featurize = _frontend(settings, round_features)
    mfcc_stats = _mfcc_stats_frontend(settings.sample_rate) if stats_lda is not None else None

    def embed(pcm):
        emb = _unit(model(tf.expand_dims(featurize(pcm), 3), training=False))
        if stats_lda is not None:
            mean = tf.constant(stats_lda.mean.astype(np.float32))
            projection = tf.constant(stats_lda.projection.astype(np.float32))
            lda = _unit(tf.matmul(mfcc_stats(pcm) - mean, projection))
            emb = tf.concat([np.float32(np.sqrt(1.0 - stats_lda.weight)) * emb,
                             np.float32(np.sqrt(stats_lda.weight)) * lda], axis=1)
        return {OUTPUT_NAME: emb}

    return embed


def _output_path(path, what: str) -> Path:
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give the {what} file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(f"cannot write {path}: a parent of it is a file, not a directory") from None
    return path


def export_pcm_onnx(model, features, path, *, opset: int = ONNX_OPSET, round_features: bool = True,
                    stats_lda=None) -> Path:
    """Write the PCM -> embedding graph of ``model`` with ``features`` (FeatureSettings or dict), and the bundle's
    statistics branch ``stats_lda`` if any, as ONNX."""
    import tensorflow as tf

    try:
        import tf2onnx
    except ImportError as exc:
        raise ImportError("export_pcm_onnx needs tf2onnx (and onnx): pip install tf2onnx onnx") from exc
    path = _output_path(path, ".onnx")
    fn = pcm_function(model, features, round_features=round_features, stats_lda=stats_lda)
    spec = [tf.TensorSpec([None, None], tf.float32, name=PCM_INPUT)]
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=opset)
    with atomic_path(path) as tmp:
        tmp.write_bytes(proto.SerializeToString())
    return path


def export_pcm_tflite(model, features, path, *, round_features: bool = True, stats_lda=None) -> Path:
    """Write the PCM -> embedding graph (with the statistics branch ``stats_lda`` if any) as a float32 TFLite
    flatbuffer with builtin ops only."""
    import tensorflow as tf

    import keras

    path = _output_path(path, ".tflite")
    embed = _embed_fn(model, features, round_features, stats_lda)
    # Through a SavedModel, as voiceprint.serving.export.export_tflite: the converter then freezes the model's variables
    # into constants (from a concrete function it keeps them as resource variables the interpreter cannot read).
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("embed", embed, input_signature=[tf.TensorSpec([None, None], tf.float32, name=PCM_INPUT)])
    with atomic_path(path) as tmp:
        saved = tmp.parent / "savedmodel"
        archive.write_out(str(saved), verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved), signature_keys=["embed"])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        tmp.write_bytes(converter.convert())
    return path


class PcmEmbedder:
    """Runs an exported PCM model: ``embedder(pcm)`` with pcm ``(samples,)`` -> ``(D,)`` or ``(batch, samples)``
    -> ``(batch, D)``, float32. Not thread-safe (a TFLite interpreter holds per-call state)."""

    def __init__(self, run, fmt: str, source: str):
        self._run, self.format, self.source = run, fmt, source

    def __repr__(self):
        return f"PcmEmbedder(format={self.format!r}, source={self.source!r})"

    def __call__(self, pcm) -> np.ndarray:
        x = np.asarray(pcm, dtype=np.float32)
        single = x.ndim == 1
        if single:
            x = x[None]
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"pcm must be (samples,) or (batch, samples) with samples >= 1; got {np.shape(pcm)}")
        out = np.asarray(self._run(np.ascontiguousarray(x)), dtype=np.float32)
        return out[0] if single else out


def _existing(path, what: str) -> Path:
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a {what} file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} not found")
    return path


def load_pcm_onnx(path, *, num_threads: int | None = None) -> PcmEmbedder:
    """A :class:`PcmEmbedder` on onnxruntime for a file written by :func:`export_pcm_onnx`."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError("load_pcm_onnx needs onnxruntime: pip install onnxruntime") from exc

    path = _existing(path, "ONNX")
    from voiceprint.serving.export import onnx_session

    session = onnx_session(ort, path, num_threads, error=DataError)
    name = session.get_inputs()[0].name
    return PcmEmbedder(lambda x: session.run([OUTPUT_NAME], {name: x})[0], "pcm-onnx", str(path))


def load_pcm_tflite(path, *, num_threads: int | None = None) -> PcmEmbedder:
    """A :class:`PcmEmbedder` on the TFLite interpreter for a file written by :func:`export_pcm_tflite`."""
    import warnings

    from voiceprint.serving.export import _tflite_interpreter_class

    path = _existing(path, "TFLite")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
        interp = _tflite_interpreter_class()(model_path=str(path), num_threads=num_threads or os.cpu_count() or 1)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    state = {"shape": None}

    def run(x):
        if x.shape != state["shape"]:       # resizing re-plans memory: only when the length changes
            interp.resize_tensor_input(inp["index"], x.shape, strict=True)
            interp.allocate_tensors()
            state["shape"] = x.shape
        interp.set_tensor(inp["index"], x)
        interp.invoke()
        return interp.get_tensor(out["index"]).copy()

    return PcmEmbedder(run, "pcm-tflite", str(path))

"""Feature kinds: registered objects that turn speech samples into float32 (frames, num_bands) features.

* ``fbank_norm`` -- the original Deep Speaker features, numerically matching
  ``python_speech_features.fbank(signal, 16000, nfilt=64)`` energies followed by per-frame normalisation (the
  original implementation's ``deep_speaker/audio.py``, https://github.com/philipperemy/deep-speaker).
* ``logmel_cmn`` -- log-mel energies (Hann window) with per-utterance mean normalisation of each band; a more
  conventional alternative.

A kind gives both the whole-signal computation and the frame-range one the long-file (streaming) path uses, plus
the per-utterance state the latter needs (:class:`FeatureKind`, :class:`KindStream`). Both paths go through the
registered object, so a new kind is one class plus :func:`register_feature_kind`: nothing dispatches on its name.
"""

from __future__ import annotations

import numpy as np

from voiceprint.core import portable_math as pm
from voiceprint.features import kernels
from voiceprint.features.filterbanks import _hann, _librosa_mel, _ones, _psf_bands
from voiceprint.features.framing import NFFT, _frame_params, num_frames
from voiceprint.features.kernels import _EPS, _PAIRWISE_BLOCK, _band_energies
from voiceprint.features.vad import apply_vad

PREEMPH = 0.97


class FeatureKind:
    """A feature kind. Subclasses give :meth:`frames` (the ``count`` frames from ``start`` of a signal already
    through :meth:`KindStream.prepare`) and may override :meth:`whole`, :meth:`normalize` and :meth:`stream`.

    ``kind(signal, sample_rate=16000, num_bands=64)`` is :meth:`whole`. :meth:`stream` is what the long-file path
    uses (pieces of speech in order, framed with the shared framing, then :meth:`KindStream.finish`); the two must
    give the same features, which tests/test_features.py checks for every registered kind.
    """

    name = ""   # set by register_feature_kind

    def frames(self, signal: np.ndarray, start: int, count: int, sample_rate: int, num_bands: int) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__}.frames")

    def normalize(self, features: np.ndarray) -> np.ndarray:
        """Per-utterance normalisation of all the frames (may work in place); none by default."""
        return features

    def stream(self, sample_rate: int = 16000, num_bands: int = 64) -> "KindStream":
        """The per-utterance state of the streaming path."""
        return KindStream(self, sample_rate, num_bands)

    def whole(self, signal: np.ndarray, sample_rate: int = 16000, num_bands: int = 64) -> np.ndarray:
        """Features of a whole signal; by default the streaming computation over one piece."""
        stream = self.stream(sample_rate, num_bands)
        sig = stream.prepare(np.asarray(signal, dtype=np.float32))
        count = num_frames(sig.shape[0], *_frame_params(sample_rate))
        return stream.finish(stream.frames(sig, 0, count))

    def __call__(self, signal: np.ndarray, sample_rate: int = 16000, num_bands: int = 64) -> np.ndarray:
        return self.whole(signal, sample_rate, num_bands)

    def __repr__(self) -> str:
        return f"<feature kind {self.name or type(self).__name__}>"


class KindStream:
    """One utterance through a kind's streaming path: :meth:`prepare` each piece of speech in order (the samples
    to frame; state such as a filter's memory carries across pieces), :meth:`frames` of what was prepared, then
    :meth:`finish` on all the frames."""

    def __init__(self, kind: FeatureKind, sample_rate: int, num_bands: int):
        self.kind, self.sample_rate, self.num_bands = kind, sample_rate, num_bands

    def prepare(self, piece: np.ndarray) -> np.ndarray:
        return piece

    def frames(self, signal: np.ndarray, start: int, count: int) -> np.ndarray:
        return self.kind.frames(signal, start, count, self.sample_rate, self.num_bands)

    def finish(self, features: np.ndarray) -> np.ndarray:
        return self.kind.normalize(features)


# ---------------------------------------------------------------------------
# fbank_norm: original Deep Speaker filterbank (python_speech_features.fbank, nfilt=64)
# ---------------------------------------------------------------------------

def _normalize_frames(feat: np.ndarray) -> np.ndarray:
    """Per frame (row): (v - mean) / max(std, 1e-12) across the bands, as the original; zeros -> eps first.
    float64 in (modified in place), float32 out."""
    if feat.shape[1] > _PAIRWISE_BLOCK or not kernels._use_numba():  # numpy's own sums: the same (see the kernel)
        feat[feat == 0] = _EPS
        mean = feat.mean(axis=1, keepdims=True)
        return ((feat - mean) / np.maximum(feat.std(axis=1, keepdims=True), 1e-12)).astype(np.float32)
    out = np.empty(feat.shape, np.float32)
    kernels._normalize_rows_kernel(feat, out)
    return out


def _preemphasis(signal: np.ndarray) -> np.ndarray:
    # What the kernel does with emphasis=PREEMPH, for the chunked path, whose frames straddle chunks.
    emph = np.empty_like(signal)
    if signal.shape[0] > 0:
        emph[0] = signal[0]
        np.subtract(signal[1:], PREEMPH * signal[:-1], out=emph[1:])
    return emph


def fbank_original(signal: np.ndarray, sample_rate: int = 16000, num_bands: int = 64) -> np.ndarray:
    """Original Deep Speaker frame features, float32 (frames, num_bands).

    python_speech_features.fbank(signal, sample_rate, nfilt=num_bands) energies
    (pre-emphasis 0.97, rectangular 25 ms / 10 ms frames, NFFT 512, power
    spectrum |FFT|^2/512, HTK-mel filters, zeros -> float eps; linear energies,
    no log), then per-frame normalisation.  Computed in float64 like the
    original, cast to float32 at the end.
    """
    sig = np.asarray(signal)
    if sig.dtype not in (np.float32, np.float64):
        sig = sig.astype(np.float64)
    frame_len, frame_step = _frame_params(sample_rate)
    count = num_frames(sig.shape[0], frame_len, frame_step)
    # The kernel pre-emphasises as it reads the frames: in the input dtype (float32 for decoded audio), as the
    # original did before its float64 framing.
    return _fbank_of_frames(sig, 0, count, sample_rate, num_bands, emphasis=PREEMPH)


def _fbank_of_frames(sig: np.ndarray, start: int, count: int, sample_rate: int, num_bands: int,
                     emphasis: float = 0.0) -> np.ndarray:
    """fbank_original's per-frame part: the ``count`` frames from ``start`` of a signal pre-emphasised already
    (``emphasis`` 0) or by the kernel (``emphasis`` PREEMPH) -> float32 features."""
    frame_len, frame_step = _frame_params(sample_rate)
    energies = _band_energies(sig, start, count, frame_step, _ones(frame_len), NFFT,
                              _psf_bands(num_bands, sample_rate), emphasis)
    return _normalize_frames(energies)


class _PreemphasisStream(KindStream):
    """fbank_original's pre-emphasis (the same float32 operations), carried across pieces; the frames are then
    computed without it (``emphasis`` 0)."""

    def __init__(self, kind, sample_rate, num_bands):
        super().__init__(kind, sample_rate, num_bands)
        self.previous = None  # last sample of the previous piece

    def prepare(self, piece: np.ndarray) -> np.ndarray:
        if self.previous is None:
            emph = _preemphasis(piece)
        else:
            extended = np.concatenate([[self.previous], piece])
            emph = np.subtract(extended[1:], PREEMPH * extended[:-1])
        self.previous = piece[-1]
        return emph


class FbankNorm(FeatureKind):
    """``fbank_norm``: :func:`fbank_original`."""

    def whole(self, signal, sample_rate=16000, num_bands=64):
        return fbank_original(signal, sample_rate, num_bands)

    def frames(self, signal, start, count, sample_rate, num_bands):
        return _fbank_of_frames(signal, start, count, sample_rate, num_bands)

    def stream(self, sample_rate=16000, num_bands=64):
        return _PreemphasisStream(self, sample_rate, num_bands)


# ---------------------------------------------------------------------------
# Log-mel with per-utterance mean normalisation
# ---------------------------------------------------------------------------

def logmel_cmn(signal: np.ndarray, sample_rate: int = 16000, num_bands: int = 64) -> np.ndarray:
    """Log-mel features with cepstral-style mean normalisation, float32 (frames, num_bands).

    Same framing (and so the same frame count) as :func:`fbank_original`; Hann
    window, NFFT 512, power spectrum, librosa Slaney mel filters (fmin 20 Hz,
    fmax sr/2), log(x + 1e-6), then each band minus its mean over time.
    Spectrum and log in float64, rounded to float32, minus the float64 mean of that.
    """
    sig = np.asarray(signal, dtype=np.float32)
    count = num_frames(sig.shape[0], *_frame_params(sample_rate))
    feat = _logmel_of_frames(sig, 0, count, sample_rate, num_bands)
    return _subtract_band_means(feat)


def _logmel_of_frames(sig: np.ndarray, start: int, count: int, sample_rate: int, num_bands: int) -> np.ndarray:
    """logmel_cmn before the mean normalisation: the ``count`` frames from ``start`` -> float32 log-mel."""
    frame_len, frame_step = _frame_params(sample_rate)
    energies = _band_energies(sig, start, count, frame_step, _hann(frame_len), NFFT,
                              _librosa_mel(sample_rate, NFFT, num_bands, 20.0))
    energies += 1e-6
    return pm.log(energies).astype(np.float32)  # portable: numpy's log differs in the last bit between CPUs


def _subtract_band_means(feat: np.ndarray) -> np.ndarray:
    feat -= feat.mean(axis=0, dtype=np.float64)  # a float64 mean: float32 sums over long files drift ~1e-5
    return feat


class LogmelCmn(FeatureKind):
    """``logmel_cmn``: :func:`logmel_cmn`; the band means are subtracted once all frames are known."""

    def whole(self, signal, sample_rate=16000, num_bands=64):
        return logmel_cmn(signal, sample_rate, num_bands)

    def frames(self, signal, start, count, sample_rate, num_bands):
        return _logmel_of_frames(signal, start, count, sample_rate, num_bands)

    def normalize(self, features):
        return _subtract_band_means(features)


# ---------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------

FEATURE_KINDS: dict[str, FeatureKind] = {}


def register_feature_kind(name: str, kind: FeatureKind, *, replace: bool = False) -> FeatureKind:
    """Make ``kind`` the feature kind ``name``: a valid ``features.kind`` from then on (params, bundles, the
    whole-file and the long-file paths). Registering a taken name raises ValueError unless ``replace``."""
    if not isinstance(kind, FeatureKind):
        raise TypeError(f"feature kind {name!r}: expected a FeatureKind, got {type(kind).__name__}")
    if name in FEATURE_KINDS and not replace:
        raise ValueError(f"feature kind {name!r} is registered already")
    kind.name = name
    FEATURE_KINDS[name] = kind
    return kind


register_feature_kind("fbank_norm", FbankNorm())
register_feature_kind("logmel_cmn", LogmelCmn())


def _check_kind(kind: str) -> FeatureKind:
    try:
        return FEATURE_KINDS[kind]
    except KeyError:
        raise ValueError(
            f"unknown feature kind {kind!r}; valid kinds: {', '.join(sorted(FEATURE_KINDS))}"
        ) from None


def extract(signal: np.ndarray, kind: str, sample_rate: int = 16000, vad: str = "original") -> np.ndarray:
    """The VAD (default: trim_silence_original), then the feature kind registered as ``kind``."""
    fn = _check_kind(kind)
    return fn(apply_vad(signal, vad, sample_rate), sample_rate=sample_rate)

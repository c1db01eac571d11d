"""Frame-level features, voice activity detection and batch feature extraction (no TensorFlow).

Two feature kinds share one framing convention (25 ms window = 400 samples,
10 ms hop = 160 samples, no centre padding, zero-padded tail, frame count
``1 + ceil((N - 400) / 160)``, 1 frame when ``N <= 400``):

* ``fbank_norm`` -- the original Deep Speaker features, numerically matching
  ``python_speech_features.fbank(signal, 16000, nfilt=64)`` energies followed
  by per-frame normalisation (see PROTOCOL.md section 2).
* ``logmel_cmn`` -- log-mel energies (Hann window) with per-utterance mean
  normalisation of each band; a more conventional alternative.

Two voice activity detectors (``vad``) choose the samples that are featurized:

* ``original`` -- the original recipe's crude trim (:func:`trim_silence_original`),
  the default, so existing features stay identical.
* ``energy`` -- :func:`vad_energy`: 10 ms block energies against a noise floor and a
  speech level estimated per utterance, with hangover; removes inner silences too.

Plus ``mfcc_stats``, a 40-dim utterance vector (MFCC means and stds) used as a
no-training baseline.

Files longer than ``long_file_seconds`` (5 min) are decoded and featurized in chunks
(:func:`featurize_file`), with the same results as the whole-file path.

This module runs inside multiprocessing workers, before TF is imported anywhere.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
from typing import Callable, Iterable, Iterator

import numpy as np
import scipy.fft

from voiceprint.audio import AudioError, ChunkedAudio, decode, open_audio

__all__ = [
    "FRAME_LEN",
    "FRAME_STEP",
    "NFFT",
    "FEATURE_KINDS",
    "VAD_KINDS",
    "LONG_FILE_SECONDS",
    "CHUNK_SECONDS",
    "NoSpeechError",
    "num_frames",
    "trim_silence_original",
    "vad_energy",
    "apply_vad",
    "fbank_original",
    "logmel_cmn",
    "extract",
    "mfcc_stats",
    "featurize_file",
    "featurize_many",
]

# At 16 kHz: 25 ms window, 10 ms hop. python_speech_features rounds half-up
# winlen*sr and winstep*sr; for 16 kHz these are exact.
FRAME_LEN = 400
FRAME_STEP = 160
NFFT = 512
PREEMPH = 0.97
MIN_FRAMES = 2  # featurize_file rejects shorter results (see its docstring)
# Files longer than LONG_FILE_SECONDS are featurized in chunks of CHUNK_SECONDS.  Whole-file fbank_norm
# extraction of 5 min of audio peaks at 262 MB (tracemalloc; float64 frames and spectra, 2.5x overlapping),
# and grows with the length; in 20 s chunks it peaks at 35 MB plus the features returned, at a similar speed.
# 5 min is above any utterance of the usual corpora, whose features so stay those of the whole-file path.
LONG_FILE_SECONDS = 300.0
CHUNK_SECONDS = 20.0


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def _frame_params(sample_rate: int) -> tuple[int, int]:
    if sample_rate == 16000:
        return FRAME_LEN, FRAME_STEP
    return _round_half_up(0.025 * sample_rate), _round_half_up(0.01 * sample_rate)


def num_frames(n_samples: int, frame_len: int = FRAME_LEN, frame_step: int = FRAME_STEP) -> int:
    """Frame count of python_speech_features' framesig: 1 + ceil((N - len) / step), min 1."""
    if n_samples <= frame_len:
        return 1
    return 1 + -(-(n_samples - frame_len) // frame_step)


def _frames(signal: np.ndarray, frame_len: int, frame_step: int) -> np.ndarray:
    """(num_frames, frame_len) strided view of the zero-padded signal (no copy of frames)."""
    n = signal.shape[0]
    count = num_frames(n, frame_len, frame_step)
    padlen = (count - 1) * frame_step + frame_len
    if padlen > n:
        signal = np.concatenate([signal, np.zeros(padlen - n, dtype=signal.dtype)])
    return np.lib.stride_tricks.sliding_window_view(signal, frame_len)[::frame_step][:count]


# ---------------------------------------------------------------------------
# Silence trimming (original recipe)
# ---------------------------------------------------------------------------


def trim_silence_original(signal: np.ndarray) -> np.ndarray:
    """The original crude trim: keep [first, last) of the samples louder than the 95th percentile.

    threshold = np.percentile(|x|, 95) (linear interpolation); returns
    ``signal[first:last]`` where first/last are the first/last indices with
    ``|x| > threshold`` (the last loud sample itself is excluded, as in the
    original).  With fewer than 2 loud samples (e.g. silence, or a constant
    signal) the original would crash or return nothing; we return the signal
    unchanged instead.
    """
    signal = np.asarray(signal)
    if signal.shape[0] == 0:
        return signal
    energy = np.abs(signal)
    threshold = np.percentile(energy, 95)
    loud = np.flatnonzero(energy > threshold)
    if loud.shape[0] < 2:
        return signal
    return signal[loud[0] : loud[-1]]


# ---------------------------------------------------------------------------
# Energy VAD
# ---------------------------------------------------------------------------

# Block energies every 10 ms; percentiles of them estimate the noise floor and the loud-speech level of the
# utterance, so the detector adapts to each recording's gain and noise (no absolute dB threshold).
VAD_NOISE_PERCENTILE = 10  # read speech pauses >= ~10% of the time (LibriSpeech ~15-20%)
VAD_SPEECH_PERCENTILE = 95  # loud vowels; robust to a few clicks or coughs (< 5% of the blocks)
VAD_MIN_CONTRAST_DB = 6.0  # speech vs floor closer than this: stationary noise or a steady tone -> no_speech
VAD_RANGE_DB = 35.0  # speech: blocks within 35 dB of the speech level (weak fricatives sit 25-35 dB down) ...
VAD_MARGIN_DB = 6.0  # ... and 6 dB above the noise floor (10 ms noise blocks scatter by ~1-2 dB)
VAD_MIN_SPEECH_FRACTION = 0.1  # fallback: always keep at least the loudest 10% of the blocks
VAD_MIN_RUN_S = 0.03  # shorter isolated loud runs are clicks, not speech
VAD_ONSET_S = 0.05  # hangover before each speech run: keeps weak onsets (unvoiced plosives, /h/)
VAD_OFFSET_S = 0.10  # and after it: keeps decaying word endings; gaps below 150 ms are never cut


class NoSpeechError(ValueError):
    """The energy VAD found no speech (no contrast between loud and quiet parts, or only clicks)."""


def _vad_block(sample_rate: int) -> int:
    return max(1, _round_half_up(0.01 * sample_rate))


class _BlockEnergy:
    """Mean square of consecutive ``block``-sample blocks (the last one partial), fed in pieces of any size.

    Each block's mean is computed the same way however the signal is cut, so chunked == whole-signal results.
    """

    def __init__(self, block: int):
        self.block = block
        self._rest = np.zeros(0, np.float32)
        self._parts: list[np.ndarray] = []

    def push(self, x: np.ndarray) -> None:
        buf = np.concatenate([self._rest, x]) if self._rest.size else x
        k = buf.shape[0] // self.block
        if k:
            self._parts.append(self._mean_square(buf[: k * self.block].reshape(k, self.block)))
        self._rest = buf[k * self.block :]

    @staticmethod
    def _mean_square(blocks: np.ndarray) -> np.ndarray:
        x = blocks.astype(np.float64)
        return (x * x).mean(axis=1)

    def energies_db(self) -> np.ndarray:
        parts = list(self._parts)
        if self._rest.size:
            parts.append(self._mean_square(self._rest.reshape(1, -1)))
        energy = np.concatenate(parts) if parts else np.zeros(0)
        return 10.0 * np.log10(energy + 1e-10)  # 1e-10: digital silence at -100 dB, not -inf


def _energy_segments(energy_db: np.ndarray, n_samples: int, sample_rate: int) -> list[tuple[int, int]]:
    """Speech as sorted, disjoint sample ranges [start, end) from the 10 ms block energies (see :func:`vad_energy`)."""
    block = _vad_block(sample_rate)
    if energy_db.shape[0] == 0:
        raise NoSpeechError("no samples")
    floor = float(np.percentile(energy_db, VAD_NOISE_PERCENTILE))
    level = float(np.percentile(energy_db, VAD_SPEECH_PERCENTILE))
    if level - floor < VAD_MIN_CONTRAST_DB:
        raise NoSpeechError(
            f"block energies span only {level - floor:.1f} dB between their {VAD_NOISE_PERCENTILE}th and "
            f"{VAD_SPEECH_PERCENTILE}th percentiles (< {VAD_MIN_CONTRAST_DB:g} dB)")
    threshold = max(level - VAD_RANGE_DB, floor + VAD_MARGIN_DB)
    threshold = min(threshold, float(np.percentile(energy_db, 100.0 * (1.0 - VAD_MIN_SPEECH_FRACTION))))
    speech = np.concatenate([[False], energy_db >= threshold, [False]])
    edges = np.flatnonzero(np.diff(speech.astype(np.int8)))
    min_run = max(1, _round_half_up(VAD_MIN_RUN_S * sample_rate / block))
    runs = [(s, e) for s, e in zip(edges[0::2], edges[1::2]) if e - s >= min_run]
    if not runs:
        raise NoSpeechError(f"no loud run of at least {VAD_MIN_RUN_S * 1000:g} ms")
    onset = _round_half_up(VAD_ONSET_S * sample_rate / block)
    offset = _round_half_up(VAD_OFFSET_S * sample_rate / block)
    segments: list[tuple[int, int]] = []
    for s, e in runs:
        start, end = max(0, (s - onset) * block), min(n_samples, (e + offset) * block)
        if segments and start <= segments[-1][1]:
            segments[-1] = (segments[-1][0], end)
        else:
            segments.append((start, end))
    return segments


def vad_energy(signal: np.ndarray, sample_rate: int = 16000) -> np.ndarray:
    """Speech samples of ``signal``, silences removed (leading, trailing and inner), concatenated.

    Energies of 10 ms blocks in dB; noise floor = their 10th percentile, speech level = their 95th.
    A block is speech when its energy is within 35 dB of the speech level and at least 6 dB above the floor;
    if that keeps fewer than 10% of the blocks (a loud non-speech event set the level), the threshold drops
    to keep the loudest 10%.  Speech runs shorter than 30 ms (clicks) are dropped; each run is extended by
    50 ms before and 100 ms after (hangover), and overlapping runs merge, so pauses under 150 ms stay.

    Raises:
        NoSpeechError: the floor and speech level are less than 6 dB apart (stationary noise, a steady tone),
            or no speech run is left.
    """
    signal = np.asarray(signal)
    energy = _BlockEnergy(_vad_block(sample_rate))
    energy.push(signal)
    segments = _energy_segments(energy.energies_db(), signal.shape[0], sample_rate)
    return np.concatenate([signal[s:e] for s, e in segments])


# ---------------------------------------------------------------------------
# Original Deep Speaker filterbank (python_speech_features.fbank, nfilt=64)
# ---------------------------------------------------------------------------


def _hz2mel(hz):
    return 2595.0 * np.log10(1.0 + hz / 700.0)


def _mel2hz(mel):
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


@functools.lru_cache(maxsize=16)
def _psf_filterbank(num_bands: int, nfft: int, sample_rate: int, scale: float = 1.0) -> np.ndarray:
    """(nfft//2+1, num_bands) float64 HTK-mel triangles, built exactly like
    python_speech_features.get_filterbanks (floored FFT-bin edges), transposed
    for ``pspec @ fb`` and multiplied by ``scale``.  Read-only because it is
    shared through the cache."""
    lowmel, highmel = _hz2mel(0.0), _hz2mel(sample_rate / 2)
    melpoints = np.linspace(lowmel, highmel, num_bands + 2)
    bins = np.floor((nfft + 1) * _mel2hz(melpoints) / sample_rate)
    fb = np.zeros((num_bands, nfft // 2 + 1))
    for j in range(num_bands):  # 64 tiny loops, once per process (cached)
        lo, mid, hi = bins[j], bins[j + 1], bins[j + 2]
        for i in range(int(lo), int(mid)):
            fb[j, i] = (i - lo) / (mid - lo)
        for i in range(int(mid), int(hi)):
            fb[j, i] = (hi - i) / (hi - mid)
    fbt = np.ascontiguousarray(fb.T) * scale
    fbt.setflags(write=False)
    return fbt


def _normalize_frames(feat: np.ndarray) -> np.ndarray:
    """Per frame (row): (v - mean) / max(std, 1e-12) across the bands, as the original."""
    mean = feat.mean(axis=1, keepdims=True)
    std = feat.std(axis=1, keepdims=True)
    return (feat - mean) / np.maximum(std, 1e-12)


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
    # Pre-emphasis in the input dtype (float32 for decoded audio), as the
    # original did, and only then float64 (its framing concatenated float64 zeros).
    if sig.shape[0] > 0:
        emph = np.empty_like(sig)
        emph[0] = sig[0]
        np.subtract(sig[1:], PREEMPH * sig[:-1], out=emph[1:])
    else:
        emph = sig
    frames = _frames(emph.astype(np.float64), frame_len, frame_step)  # rectangular window: no-op
    return _fbank_of_frames(frames, sample_rate, num_bands)


def _fbank_of_frames(frames: np.ndarray, sample_rate: int, num_bands: int) -> np.ndarray:
    """fbank_original's per-frame part: (frames, frame_len) float64 pre-emphasised frames -> float32 features."""
    # numpy's float64 rfft is the dominant cost (scipy's is no faster in float64).
    pspec = np.square(np.abs(np.fft.rfft(frames, NFFT)))  # same ops as psf.powspec
    # The 1/NFFT of the power spectrum is folded into the cached filterbank
    # (a power of two, so the result is bit-identical and saves a pass).
    feat = pspec @ _psf_filterbank(num_bands, NFFT, sample_rate, 1.0 / NFFT)
    feat[feat == 0] = np.finfo(float).eps
    return _normalize_frames(feat).astype(np.float32)


# ---------------------------------------------------------------------------
# Log-mel with per-utterance mean normalisation
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _librosa_mel(sample_rate: int, n_fft: int, n_mels: int, fmin: float) -> np.ndarray:
    """(n_fft//2+1, n_mels) float32 Slaney mel matrix (librosa defaults), transposed; cached."""
    import librosa  # heavy import, only where needed

    mel = librosa.filters.mel(
        sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=sample_rate / 2, dtype=np.float32
    )
    melt = np.ascontiguousarray(mel.T)
    melt.setflags(write=False)
    return melt


@functools.lru_cache(maxsize=4)
def _hann(n: int) -> np.ndarray:
    # Periodic Hann, same as scipy.signal.get_window('hann', n) / librosa's default.
    w = (0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)).astype(np.float32)
    w.setflags(write=False)
    return w


def logmel_cmn(signal: np.ndarray, sample_rate: int = 16000, num_bands: int = 64) -> np.ndarray:
    """Log-mel features with cepstral-style mean normalisation, float32 (frames, num_bands).

    Same framing (and so the same frame count) as :func:`fbank_original`; Hann
    window, NFFT 512, power spectrum, librosa Slaney mel filters (fmin 20 Hz,
    fmax sr/2), log(x + 1e-6), then each band minus its mean over time.
    Computed in float32: nothing to stay bit-compatible with here.
    """
    sig = np.asarray(signal, dtype=np.float32)
    frame_len, frame_step = _frame_params(sample_rate)
    feat = _logmel_of_frames(_frames(sig, frame_len, frame_step), sample_rate, num_bands)
    feat -= feat.mean(axis=0, keepdims=True)
    return feat


def _logmel_of_frames(frames: np.ndarray, sample_rate: int, num_bands: int) -> np.ndarray:
    """logmel_cmn before the mean normalisation: (frames, frame_len) float32 -> float32 log-mel."""
    frames = frames * _hann(frames.shape[1])
    # scipy's pocketfft keeps float32 (complex64) and is ~2.5x faster here than numpy's.
    spec = scipy.fft.rfft(frames, NFFT, axis=1, overwrite_x=True)
    pspec = np.square(np.abs(spec))  # float32; faster than re**2 + im**2 here
    feat = pspec @ _librosa_mel(sample_rate, NFFT, num_bands, 20.0)
    np.log(feat + np.float32(1e-6), out=feat)
    return feat


# ---------------------------------------------------------------------------
# Registries
# ---------------------------------------------------------------------------

FEATURE_KINDS: dict[str, Callable[..., np.ndarray]] = {
    "fbank_norm": fbank_original,
    "logmel_cmn": logmel_cmn,
}

VAD_KINDS = ("original", "energy")


def _check_kind(kind: str) -> Callable[..., np.ndarray]:
    try:
        return FEATURE_KINDS[kind]
    except KeyError:
        raise ValueError(
            f"unknown feature kind {kind!r}; valid kinds: {', '.join(sorted(FEATURE_KINDS))}"
        ) from None


def _check_vad(vad: str) -> None:
    if vad not in VAD_KINDS:
        raise ValueError(f"unknown vad {vad!r}; valid: {', '.join(VAD_KINDS)}")


def apply_vad(signal: np.ndarray, vad: str = "original", sample_rate: int = 16000) -> np.ndarray:
    """The samples that get featurized: ``original`` = :func:`trim_silence_original`, ``energy`` =
    :func:`vad_energy` (raises :class:`NoSpeechError`)."""
    _check_vad(vad)
    if vad == "original":
        return trim_silence_original(signal)
    return vad_energy(signal, sample_rate)


def extract(signal: np.ndarray, kind: str, sample_rate: int = 16000, vad: str = "original") -> np.ndarray:
    """The VAD (default: trim_silence_original), then the feature function registered as ``kind``."""
    fn = _check_kind(kind)
    return fn(apply_vad(signal, vad, sample_rate), sample_rate=sample_rate)


# ---------------------------------------------------------------------------
# No-training baseline vector
# ---------------------------------------------------------------------------

MFCC_N_FFT = 400
MFCC_HOP = 160
MFCC_TOP_DB = 80.0


def mfcc_stats(signal: np.ndarray, sample_rate: int = 16000, n_mfcc: int = 20) -> np.ndarray:
    """[mean over time, std over time] of librosa MFCCs (n_fft 400, hop 160, 64 mels): float32 (2*n_mfcc,)."""
    import librosa

    mfcc = librosa.feature.mfcc(
        y=np.asarray(signal, dtype=np.float32),
        sr=sample_rate,
        n_mfcc=n_mfcc,
        n_fft=MFCC_N_FFT,
        hop_length=MFCC_HOP,
        n_mels=64,
    )
    return np.concatenate([mfcc.mean(axis=1), mfcc.std(axis=1)]).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _hann64(n: int) -> np.ndarray:
    # librosa's stft window: scipy.signal.get_window('hann', n) (periodic), float64.
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)
    w.setflags(write=False)
    return w


def _mfcc_db_of_frames(frames: np.ndarray, sample_rate: int) -> np.ndarray:
    """librosa's melspectrogram + power_to_db (before its top_db clamp) for centred (frames, 400) float32 frames."""
    spec = np.fft.rfft(frames * _hann64(frames.shape[1]), axis=1).astype(np.complex64)  # as librosa.stft
    mel = np.square(np.abs(spec)) @ _librosa_mel(sample_rate, MFCC_N_FFT, 64, 0.0)
    return 10.0 * np.log10(np.maximum(1e-10, mel))


class _MeanStd:
    """Column means and population stds of row blocks, merged in float64 (Chan et al.'s parallel update)."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, x: np.ndarray) -> None:
        x = x.astype(np.float64)
        n_b = x.shape[0]
        if not n_b:
            return
        mean_b = x.mean(axis=0)
        m2_b = np.square(x - mean_b).sum(axis=0)
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + np.square(delta) * (self.n * n_b / n)
        self.n = n

    def result(self) -> np.ndarray:
        return np.concatenate([self.mean, np.sqrt(self.m2 / self.n)]).astype(np.float32)


# ---------------------------------------------------------------------------
# Chunked extraction (long files)
# ---------------------------------------------------------------------------


class _FrameCutter:
    """Cuts samples pushed in pieces into the frames the whole-signal framing would give (``frame_len`` every
    ``frame_step``, after ``left_pad`` zeros); returns each frame once, as soon as it is complete."""

    def __init__(self, frame_len: int, frame_step: int, left_pad: int = 0):
        self.frame_len, self.frame_step = frame_len, frame_step
        self._buf = np.zeros(left_pad, np.float32)
        self.emitted = 0

    def push(self, x: np.ndarray) -> np.ndarray | None:
        buf = np.concatenate([self._buf, x]) if self._buf.size else x
        if buf.shape[0] < self.frame_len:
            self._buf = buf
            return None
        k = 1 + (buf.shape[0] - self.frame_len) // self.frame_step
        frames = np.lib.stride_tricks.sliding_window_view(buf, self.frame_len)[:: self.frame_step][:k]
        self._buf = buf[k * self.frame_step :]
        self.emitted += k
        return frames

    def finish_zero_padded(self, total_frames: int) -> np.ndarray | None:
        """The remaining frames up to ``total_frames``, the last ones zero-padded (as :func:`_frames`)."""
        remaining = total_frames - self.emitted
        if remaining <= 0:
            return None
        need = (remaining - 1) * self.frame_step + self.frame_len
        buf = np.concatenate([self._buf, np.zeros(need - self._buf.shape[0], np.float32)])
        self.emitted += remaining
        return np.lib.stride_tricks.sliding_window_view(buf, self.frame_len)[:: self.frame_step][:remaining]


class _StreamedTrim:
    """trim_silence_original's [first, last) for a signal seen in float32 chunks, with memory far below the
    signal's: :meth:`push` every chunk once (pass 1), then :meth:`segment` reads them again (pass 2).

    Whole-signal code compares ``|x| > np.percentile(|x|, 95)``.  That threshold lies between the order
    statistics a_k and a_(k+1), k = floor(0.95 (n - 1)), and below a_(k+1) unless they are equal, so the
    comparison is exactly ``|x| > a_k``: only a_k is needed.  Pass 1 histograms the float32 bit patterns
    (monotonic for non-negative floats) by their top 16 bits; pass 2 keeps the values of a_k's bin (with
    their positions, for first/last) and the positions in louder bins.
    """

    def __init__(self):
        self.counts = np.zeros(1 << 16, np.int64)
        self.samples = 0

    def push(self, chunk: np.ndarray) -> None:
        self.counts += np.bincount(np.abs(chunk).view(np.uint32) >> 16, minlength=1 << 16)
        self.samples += chunk.shape[0]

    def segment(self, chunks: Iterable[np.ndarray]) -> tuple[int, int]:
        n = self.samples
        k = int(np.floor((n - 1) * (95 / 100)))  # np.percentile's lower index, same float64 arithmetic
        cumulative = np.cumsum(self.counts)
        target = int(np.searchsorted(cumulative, k, side="right"))  # bin holding the k-th smallest (0-based)
        below = int(cumulative[target - 1]) if target else 0
        values, positions = [], []
        first_louder = last_louder = None  # positions of samples in bins above the target bin
        offset = 0
        for chunk in chunks:
            keys = np.abs(chunk).view(np.uint32) >> 16
            in_bin = np.flatnonzero(keys == target)
            values.append(np.abs(chunk[in_bin]))
            positions.append(in_bin + offset)
            louder = np.flatnonzero(keys > target)
            if louder.size:
                first_louder = offset + int(louder[0]) if first_louder is None else first_louder
                last_louder = offset + int(louder[-1])
            offset += chunk.shape[0]
        values_in_bin, positions_in_bin = np.concatenate(values), np.concatenate(positions)
        threshold = np.partition(values_in_bin, k - below)[k - below]
        loud_in_bin = positions_in_bin[values_in_bin > threshold]
        loud = [p for p in (first_louder, last_louder) if p is not None]
        if loud_in_bin.size:
            loud += [int(loud_in_bin[0]), int(loud_in_bin[-1])]
        if n - int(cumulative[target]) + loud_in_bin.size < 2:
            return 0, n  # fewer than 2 loud samples: trim_silence_original returns the signal unchanged
        return min(loud), max(loud)


def _select(chunks: Iterable[np.ndarray], segments: list[tuple[int, int]]) -> Iterator[np.ndarray]:
    """The parts of a chunked signal inside ``segments`` (sorted, disjoint [start, end)), in order."""
    offset, i = 0, 0
    for chunk in chunks:
        if i == len(segments):
            return  # closes the decoder early
        end = offset + chunk.shape[0]
        while i < len(segments) and segments[i][0] < end:
            start, stop = segments[i]
            lo, hi = max(start, offset) - offset, min(stop, end) - offset
            if hi > lo:
                yield chunk[lo:hi]
            if stop > end:
                break
            i += 1
        offset = end


def _chunked_features(chunks: Iterable[np.ndarray], segments, kind: str, sample_rate: int, num_bands: int = 64):
    """Features and mfcc_stats of the ``segments`` of a signal, with one chunk in memory (plus the features).

    ``chunks`` is iterated twice (each time giving the same chunks): features and the MFCC log-mel maximum
    (power_to_db's top_db reference), then the MFCC statistics.
    """
    total = sum(stop - start for start, stop in segments)
    frame_len, frame_step = _frame_params(sample_rate)
    count = num_frames(total, frame_len, frame_step)
    out = np.empty((count, num_bands), np.float32)
    cutter = _FrameCutter(frame_len, frame_step)
    mfcc_cutter = _FrameCutter(MFCC_N_FFT, MFCC_HOP, left_pad=MFCC_N_FFT // 2)  # librosa's centred frames
    mel_max = -np.inf
    previous = None  # last sample, for the pre-emphasis across pieces
    filled = 0

    def features(frames):
        nonlocal filled
        if frames is None:
            return
        rows = frames.shape[0]
        if rows == 1:
            # One row would make the matrix product a BLAS gemv, which rounds differently from the gemm
            # the whole-signal path uses (>= 2 frames); compute it as two identical rows.
            frames = np.repeat(frames, 2, axis=0)
        if kind == "fbank_norm":
            feats = _fbank_of_frames(frames.astype(np.float64), sample_rate, num_bands)
        else:
            feats = _logmel_of_frames(frames, sample_rate, num_bands)
        out[filled : filled + rows] = feats[:rows]
        filled += rows

    def mfcc_max(frames):
        nonlocal mel_max
        if frames is not None:
            mel_max = max(mel_max, float(_mfcc_db_of_frames(frames, sample_rate).max()))

    for piece in _select(chunks, segments):
        if kind == "fbank_norm":  # fbank_original's pre-emphasis (same float32 operations), across pieces
            if previous is None:
                emph = np.empty_like(piece)
                emph[0] = piece[0]
                np.subtract(piece[1:], PREEMPH * piece[:-1], out=emph[1:])
            else:
                extended = np.concatenate([[previous], piece])
                emph = np.subtract(extended[1:], PREEMPH * extended[:-1])
            previous = piece[-1]
            features(cutter.push(emph))
        else:
            features(cutter.push(piece))
        mfcc_max(mfcc_cutter.push(piece))
    features(cutter.finish_zero_padded(count))
    mfcc_max(mfcc_cutter.push(np.zeros(MFCC_N_FFT // 2, np.float32)))
    if kind == "logmel_cmn":
        out -= out.mean(axis=0, keepdims=True)

    stats = _MeanStd()
    floor_db = np.float32(mel_max - MFCC_TOP_DB)
    cutter = _FrameCutter(MFCC_N_FFT, MFCC_HOP, left_pad=MFCC_N_FFT // 2)

    def mfcc_add(frames):
        if frames is not None:
            db = np.maximum(_mfcc_db_of_frames(frames, sample_rate), floor_db)
            stats.add(scipy.fft.dct(db, type=2, norm="ortho", axis=1)[:, :20])

    for piece in _select(chunks, segments):
        mfcc_add(cutter.push(piece))
    mfcc_add(cutter.push(np.zeros(MFCC_N_FFT // 2, np.float32)))
    return out, stats.result()


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def _too_short(path, samples: int, vad: str, frame_len: int) -> AudioError:
    return AudioError(path, "too_short", f"{samples} samples left by the {vad!r} VAD, need > {frame_len}")


def _featurize_chunked(path, kind, sample_rate, min_seconds, vad, max_clipped_fraction, chunk_seconds):
    audio = ChunkedAudio(path, sample_rate, chunk_seconds)
    frame_len, frame_step = _frame_params(sample_rate)
    if vad == "original":
        trim = _StreamedTrim()
        for chunk in audio:
            trim.push(chunk)
        audio.validate(min_seconds, max_clipped_fraction)
        segments = [trim.segment(audio)]
    else:
        energy = _BlockEnergy(_vad_block(sample_rate))
        for chunk in audio:
            energy.push(chunk)
        n = audio.validate(min_seconds, max_clipped_fraction)
        try:
            segments = _energy_segments(energy.energies_db(), n, sample_rate)
        except NoSpeechError as exc:
            raise AudioError(path, "no_speech", str(exc)) from None
    total = sum(stop - start for start, stop in segments)
    if total <= frame_len or num_frames(total, frame_len, frame_step) < MIN_FRAMES:
        raise _too_short(path, total, vad, frame_len)
    return _chunked_features(audio, segments, kind, sample_rate)


def featurize_file(
    path,
    kind: str,
    sample_rate: int = 16000,
    min_seconds: float = 0.0,
    *,
    vad: str = "original",
    max_clipped_fraction: float | None = None,
    long_file_seconds: float = LONG_FILE_SECONDS,
    chunk_seconds: float = CHUNK_SECONDS,
) -> tuple[np.ndarray, np.ndarray]:
    """File -> (features (frames, 64) float32 of ``kind``, mfcc_stats vector): the one way to make model input.

    load_audio -> VAD (``vad``: ``original`` = trim_silence_original, ``energy`` = vad_energy) ->
    (FEATURE_KINDS[kind], mfcc_stats).  ``min_seconds`` applies to the decoded audio, before the VAD;
    ``max_clipped_fraction`` as in :func:`voiceprint.audio.load_audio` (None: no check).

    A file longer than ``long_file_seconds`` (by its header) is decoded and featurized in chunks of
    ``chunk_seconds``, never holding more than one chunk of audio: same features (bit-identical in tests), and
    the same mfcc_stats up to float rounding (float64 running sums instead of librosa's float32 ones).  Each
    pass over the chunks decodes the file again (4 passes with the ``original`` VAD, 3 with ``energy``).

    Raises:
        ValueError: unknown ``kind`` or ``vad`` (checked before decoding).
        AudioError: whatever :func:`voiceprint.audio.load_audio` rejects; reason ``no_speech`` when the energy
            VAD finds none; reason ``too_short`` when the VAD leaves fewer than 2 frames (<= 400 samples at
            16 kHz): a single, zero-padded frame is not a usable utterance (and the trim can shrink a file a lot).
    """
    fn = _check_kind(kind)
    _check_vad(vad)
    with open_audio(path) as fh:
        chunked = fh.frames / fh.samplerate > long_file_seconds
        if not chunked:
            y = decode(fh, path, sample_rate, min_seconds, max_clipped_fraction=max_clipped_fraction)
    if chunked:
        return _featurize_chunked(path, kind, sample_rate, min_seconds, vad, max_clipped_fraction, chunk_seconds)
    try:
        speech = apply_vad(y, vad, sample_rate)
    except NoSpeechError as exc:
        raise AudioError(path, "no_speech", str(exc)) from None
    frame_len, frame_step = _frame_params(sample_rate)
    n = num_frames(speech.shape[0], frame_len, frame_step)
    if speech.shape[0] <= frame_len or n < MIN_FRAMES:
        raise _too_short(path, speech.shape[0], vad, frame_len)
    return fn(speech, sample_rate=sample_rate), mfcc_stats(speech, sample_rate)


_BLAS_LIMITER = None  # keeps the worker's threadpool limit alive


def _init_worker() -> None:
    # One BLAS/OpenMP thread per worker: N processes x N threads would
    # oversubscribe the cores.  The env vars cover libraries loaded later; the
    # already-loaded ones (numpy's OpenBLAS, inherited via fork) need threadpoolctl.
    global _BLAS_LIMITER
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    from threadpoolctl import threadpool_limits

    _BLAS_LIMITER = threadpool_limits(limits=1)


def _featurize_one(task):
    """Worker body: never raises; returns (index, feats, baseline, reason, message)."""
    index, path, kind, sample_rate, min_seconds, vad, max_clipped_fraction = task
    try:
        feats, base = featurize_file(path, kind, sample_rate=sample_rate, min_seconds=min_seconds, vad=vad,
                                     max_clipped_fraction=max_clipped_fraction)
        return index, feats, base, None, None
    except AudioError as exc:
        return index, None, None, exc.reason, str(exc)
    except Exception as exc:  # noqa: BLE001 -- one bad file must not stop a corpus
        return index, None, None, "error", f"{path}: {type(exc).__name__}: {exc}"


def featurize_many(
    paths: Iterable,
    kind: str,
    *,
    workers: int,
    sample_rate: int = 16000,
    min_seconds: float = 0.0,
    vad: str = "original",
    max_clipped_fraction: float | None = None,
    progress: bool = True,
    start_method: str | None = None,
) -> Iterator[tuple[int, np.ndarray | None, np.ndarray | None, str | None, str | None]]:
    """Featurize many files, yielding ``(index, features, baseline, reason, message)`` in input order.

    Good files give ``(i, feats, baseline_vec, None, None)``; a rejected file gives
    ``(i, None, None, reason, message)`` with the AudioError reason code, or
    ``'error'`` for an unexpected exception (message names the file).  One bad
    file never stops the run.  ``vad`` and ``max_clipped_fraction`` as in :func:`featurize_file`.

    ``workers <= 1`` computes in this process (with the same 1-thread BLAS
    limit); otherwise a multiprocessing Pool of ``workers`` processes
    (``start_method``: None = the platform default context, or 'fork',
    'spawn', 'forkserver').  ``kind`` and ``vad`` are validated up front (ValueError).
    """
    _check_kind(kind)
    _check_vad(vad)
    paths = [str(p) for p in paths]
    tasks = [(i, p, kind, sample_rate, min_seconds, vad, max_clipped_fraction) for i, p in enumerate(paths)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc=f"features[{kind}]", unit="file")
    try:
        if workers <= 1 or len(tasks) <= 1:
            from threadpoolctl import ThreadpoolController

            # Limit BLAS only while computing, not while the consumer runs
            # between yields (a generator must not leak a process-wide setting).
            controller = ThreadpoolController()
            for task in tasks:
                with controller.limit(limits=1):
                    result = _featurize_one(task)
                if bar is not None:
                    bar.update(1)
                yield result
            return
        ctx = multiprocessing.get_context(start_method)
        # Chunks amortise IPC but keep ordering latency / load balance reasonable.
        chunksize = max(1, min(32, len(tasks) // (workers * 8)))
        with ctx.Pool(processes=workers, initializer=_init_worker) as pool:
            for result in pool.imap(_featurize_one, tasks, chunksize=chunksize):
                if bar is not None:
                    bar.update(1)
                yield result
    finally:
        if bar is not None:
            bar.close()

"""Frame-level features, voice activity detection and batch feature extraction (no TensorFlow).

Two feature kinds share one framing convention (25 ms window = 400 samples,
10 ms hop = 160 samples, no centre padding, zero-padded tail, frame count
``1 + ceil((N - 400) / 160)``, 1 frame when ``N <= 400``):

* ``fbank_norm`` -- the original Deep Speaker features, numerically matching
  ``python_speech_features.fbank(signal, 16000, nfilt=64)`` energies followed
  by per-frame normalisation (the original implementation's ``deep_speaker/audio.py``,
  https://github.com/philipperemy/deep-speaker).
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

The spectra of all three run in one compiled (numba) kernel that transforms 64 frames at a time; the trim's
percentile is a compiled histogram search.  Kernels compile on first use (~10 s once; later processes load them
from numba's cache in __pycache__).

Two engines compute the same features (:func:`engine`): ``numba`` (the kernels above; what the pipeline uses,
bit for bit as ever) and ``numpy`` (numpy's FFT on framed blocks; numba is never imported). Loading numba and its
cached kernels costs ~1.2 s of CPU in every new process, most of a cold ``voiceprint verify``, so the ONNX runtime
computes its features with ``numpy``: the same values up to float64 round-off in the spectra (trim and
normalisation bit-identical), tests/test_runtime.py. The default (``auto``) is ``numba`` when it is installed.

This module runs inside multiprocessing workers, before TF is imported anywhere.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator

import numpy as np

from voiceprint import portable_math as pm
from voiceprint.audio import AudioError, ChunkedAudio, decode, open_audio
from voiceprint.errors import WorkerDiedError

# ---------------------------------------------------------------------------
# Engines: numba kernels, compiled lazily, or numpy
# ---------------------------------------------------------------------------

ENGINES = ("auto", "numba", "numpy")
_ENGINE = contextvars.ContextVar("voiceprint_features_engine", default="auto")   # per thread / task
_KERNELS: list[str] = []       # the names of the numba kernels below, compiled together on first use


def _njit(fn):
    """``numba.njit(cache=True)``, applied on the first call of any kernel: importing this module does not import
    numba. All kernels are compiled together (``numba.njit`` is lazy itself), because kernels call each other
    through this module's globals, which must then be numba dispatchers."""
    _KERNELS.append(fn.__name__)

    @functools.wraps(fn)
    def first_call(*args):
        _compile_kernels()
        return globals()[fn.__name__](*args)

    first_call.py_func = fn
    return first_call


def _compile_kernels() -> None:
    import numba

    g = globals()
    for name in _KERNELS:
        if not hasattr(g[name], "signatures"):     # still the lazy wrapper, not a numba dispatcher
            g[name] = numba.njit(cache=True)(g[name].py_func)


@functools.lru_cache(maxsize=1)
def _numba_installed() -> bool:
    return importlib.util.find_spec("numba") is not None


def _use_numba() -> bool:
    chosen = _ENGINE.get()
    return chosen == "numba" or (chosen == "auto" and _numba_installed())


@contextlib.contextmanager
def engine(name: str):
    """``with engine("numpy"): ...``: compute features in this thread with ``name`` (``auto``: numba when it is
    installed, ``numba``, ``numpy``); see the module docstring."""
    if name not in ENGINES:
        raise ValueError(f"feature engine {name!r}: expected one of {', '.join(ENGINES)}")
    token = _ENGINE.set(name)
    try:
        yield
    finally:
        _ENGINE.reset(token)

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
# Files longer than LONG_FILE_SECONDS are featurized in chunks of CHUNK_SECONDS.  Whole-file extraction of 5 min
# of audio peaks at 52 MB (tracemalloc: the decoded audio, float64 filterbank energies, the 8 MB of features) and
# grows with the length; in 20 s chunks it peaks at 16-19 MB, at half the speed (every pass decodes again).
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

    Finite float32 signals (all decoded audio) take a compiled path with the same result: the percentile's two
    neighbouring order statistics from a histogram instead of partitioning a copy of the whole signal.
    """
    signal = np.asarray(signal)
    if signal.shape[0] == 0:
        return signal
    if signal.dtype == np.float32 and signal.ndim == 1 and _use_numba():
        contiguous = np.ascontiguousarray(signal)
        n = signal.shape[0]
        virtual = (n - 1) * np.true_divide(95, 100)  # np.percentile's float64 arithmetic
        lower = int(np.floor(virtual))
        finite, a_bits, b_bits = _order_statistics(contiguous.view(np.uint32), lower)
        if finite:
            a, b = np.array([a_bits, b_bits], np.uint32).view(np.float32)
            gamma = float(virtual - lower)
            # np.percentile's interpolation, in float32 as it does it (a Python float weight keeps float32): the
            # threshold can round onto b, so it is not simply "louder than a".
            threshold = b - (b - a) * (1 - gamma) if gamma >= 0.5 else a + (b - a) * gamma
            first, last = _loud_bounds(contiguous, threshold)
            return signal[first:last] if last > first else signal
    energy = np.abs(signal)
    threshold = np.percentile(energy, 95)
    loud = np.flatnonzero(energy > threshold)
    if loud.shape[0] < 2:
        return signal
    return signal[loud[0] : loud[-1]]


@_njit
def _order_statistics(bits, k):
    """(finite, |x|_(k), |x|_(k+1)) for float32 x given as its uint32 bit patterns; order statistics 0-based,
    returned as bit patterns, k + 1 clipped to the last one.  finite is False when x holds Inf or NaN.

    With the sign bit cleared, bit patterns sort like the magnitudes: a histogram of their top 16 bits finds the
    bins holding both statistics, and only those bins' values are sorted.
    """
    n = bits.shape[0]
    counts = np.zeros(1 << 16, np.int64)
    for i in range(n):
        counts[(bits[i] & 0x7FFFFFFF) >> 16] += 1
    if counts[0x7F80:].sum() > 0:  # exponent all ones: Inf or NaN
        return False, np.uint32(0), np.uint32(0)
    below, low = 0, 0
    while below + counts[low] <= k:
        below += counts[low]
        low += 1
    high = low
    if below + counts[low] == k + 1 and k + 1 < n:  # x_(k+1) is the smallest value of the next non-empty bin
        high = low + 1
        while counts[high] == 0:
            high += 1
    members = np.empty(counts[low] + (counts[high] if high != low else 0), np.uint32)
    m = 0
    for i in range(n):
        v = bits[i] & 0x7FFFFFFF
        if v >> 16 == low or v >> 16 == high:
            members[m] = v
            m += 1
    members.sort()  # a bin holds a small share of the samples (all of them only for a near-constant signal)
    r = k - below
    return True, members[r], members[min(r + 1, members.shape[0] - 1)]


@_njit
def _loud_bounds(signal, threshold):
    """(first, last) indices with |x| > threshold; last <= first when fewer than 2 samples are that loud."""
    n = signal.shape[0]
    first = 0
    while first < n and not abs(signal[first]) > threshold:
        first += 1
    last = n - 1
    while last > first and not abs(signal[last]) > threshold:
        last -= 1
    return first, last


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
        return 10.0 * pm.log10(energy + 1e-10)  # 1e-10: digital silence at -100 dB, not -inf


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
# Filterbank energies of frames: one compiled kernel, FFTs batched across frames
# ---------------------------------------------------------------------------
#
# fbank_norm, logmel_cmn and the MFCC baseline all compute "frames x window -> |rfft|^2 -> triangular
# filterbank".  numpy/scipy transform one frame at a time, which was most of the feature time; this kernel
# transforms FFT_LANES frames together, the frames being the innermost axis of every butterfly (so the compiler
# vectorises across frames), and sums only each filter's non-zero weights.  Everything is float64: fbank_norm's
# float32 result is the original float64 computation's (zero differing values over LibriSpeech-mini, tested).

FFT_LANES = 64  # frames per batch (measured best of 16-128): 2 work arrays of (nfft/2, 64) complex = 512 KiB in L2


@functools.lru_cache(maxsize=8)
def _fft_plan(nfft: int) -> tuple[np.ndarray, ...]:
    """Stockham plan of the complex FFT of nfft/2 points, plus the twiddles unpacking it into an nfft-point rfft.

    (radices, offsets, twiddles, unpack twiddles): stage s (radix p, after sub-transforms of size l) multiplies
    input t of butterfly j by w_(l p)^(j t), stored at offsets[s] + j p + t.
    """
    half, radices = nfft // 2, []
    rest = half
    for radix in (4, 2, 5):
        while rest > 1 and rest % radix == 0:
            radices.append(radix)
            rest //= radix
    if nfft < 2 or nfft % 2 or rest != 1:
        raise ValueError(f"FFT size {nfft} is not supported (the kernel needs 2 x 2^a x 5^b)")
    twiddles, offsets, size = [np.zeros(0, complex)], [0], 1
    for radix in radices:
        j, t = np.meshgrid(np.arange(size), np.arange(radix), indexing="ij")
        twiddles.append(pm.expi(-2.0 * np.pi * (j * t) / (size * radix)).ravel())  # portable: CPU-independent
        offsets.append(offsets[-1] + j.size)
        size *= radix
    plan = (np.array(radices, np.int64), np.array(offsets, np.int64), np.concatenate(twiddles),
            pm.expi(-2.0 * np.pi * np.arange(half + 1) / nfft))
    for array in plan:
        array.setflags(write=False)
    return plan


def _sparse_bands(filterbank: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first bin, weight offsets, weights) of each column of a (bins, bands) filterbank: its weights from the
    first to the last non-zero one.  Skipping zero weights leaves the sums unchanged (powers are finite)."""
    starts, offsets, weights = [], [0], []
    for band in np.asarray(filterbank, dtype=np.float64).T:
        nonzero = np.flatnonzero(band)
        lo, hi = (nonzero[0], nonzero[-1] + 1) if nonzero.size else (0, 0)
        starts.append(lo)
        weights.append(band[lo:hi])
        offsets.append(offsets[-1] + hi - lo)
    sparse = (np.array(starts, np.int64), np.array(offsets, np.int64), np.concatenate(weights))
    for array in sparse:
        array.setflags(write=False)
    return sparse


# The butterflies take rows of lanes (one complex value per frame) and loop over the lanes: loops the compiler
# vectorises.  Complex (interleaved) rows, not separate real and imaginary ones: with half the pointers, LLVM
# vectorises the radix-5 loop too (3.5x faster than the scalar loop it made of the split version).


@_njit
def _radix2(x0, x1, y0, y1, w1):
    for b in range(x0.shape[0]):
        a1 = x1[b] * w1
        y0[b] = x0[b] + a1
        y1[b] = x0[b] - a1


@_njit
def _radix4(x0, x1, x2, x3, y0, y1, y2, y3, w1, w2, w3):
    for b in range(x0.shape[0]):
        a0, a1, a2, a3 = x0[b], x1[b] * w1, x2[b] * w2, x3[b] * w3
        s02, d02, s13, d13 = a0 + a2, a0 - a2, a1 + a3, a1 - a3
        y0[b] = s02 + s13
        y1[b] = complex(d02.real + d13.imag, d02.imag - d13.real)  # d02 - i d13
        y2[b] = s02 - s13
        y3[b] = complex(d02.real - d13.imag, d02.imag + d13.real)  # d02 + i d13


# portable_math, not numpy: numpy's float64 sin/cos differ in the last bit between CPUs (docs/reproducibility.md)
_COS1, _COS2 = float(pm.cos(2 * np.pi / 5)), float(pm.cos(4 * np.pi / 5))
_SIN1, _SIN2 = float(pm.sin(2 * np.pi / 5)), float(pm.sin(4 * np.pi / 5))


@_njit
def _radix5(x0, x1, x2, x3, x4, y0, y1, y2, y3, y4, w1, w2, w3, w4):
    for b in range(x0.shape[0]):
        a0, a1, a2, a3, a4 = x0[b], x1[b] * w1, x2[b] * w2, x3[b] * w3, x4[b] * w4
        p14, m14, p23, m23 = a1 + a4, a1 - a4, a2 + a3, a2 - a3
        c1 = a0 + _COS1 * p14 + _COS2 * p23
        c2 = a0 + _COS2 * p14 + _COS1 * p23
        s1 = _SIN1 * m14 + _SIN2 * m23
        s2 = _SIN2 * m14 - _SIN1 * m23
        y0[b] = a0 + p14 + p23
        y1[b] = complex(c1.real + s1.imag, c1.imag - s1.real)  # c1 - i s1
        y2[b] = complex(c2.real + s2.imag, c2.imag - s2.real)
        y3[b] = complex(c2.real - s2.imag, c2.imag + s2.real)  # c2 + i s2
        y4[b] = complex(c1.real - s1.imag, c1.imag + s1.real)


@_njit
def _fft_lanes(z, work, radices, offsets, twiddles):
    """Complex FFT along axis 0 of an (n, lanes) array, one transform per lane (column); Stockham autosort, so the
    two buffers alternate and no bit reversal is needed.  Returns the buffer holding the result.

    Stage s combines `radix` transforms of `size` points into one of size * radix: output point j + q size of
    transform k is sum_t w_radix^(q t) w_(size radix)^(j t) x_t, x_t = point j of input transform k + t count.
    """
    size, count = 1, z.shape[0]
    src, dst = z, work
    for s in range(radices.shape[0]):
        radix = radices[s]
        count //= radix
        span = count * size  # between the inputs of one butterfly
        for j in range(size):
            w = offsets[s] + j * radix
            for k in range(count):
                i, q = j + k * size, j + k * size * radix
                if radix == 4:
                    _radix4(src[i], src[i + span], src[i + 2 * span], src[i + 3 * span],
                            dst[q], dst[q + size], dst[q + 2 * size], dst[q + 3 * size],
                            twiddles[w + 1], twiddles[w + 2], twiddles[w + 3])
                elif radix == 2:
                    _radix2(src[i], src[i + span], dst[q], dst[q + size], twiddles[w + 1])
                else:
                    _radix5(src[i], src[i + span], src[i + 2 * span], src[i + 3 * span], src[i + 4 * span],
                            dst[q], dst[q + size], dst[q + 2 * size], dst[q + 3 * size], dst[q + 4 * size],
                            twiddles[w + 1], twiddles[w + 2], twiddles[w + 3], twiddles[w + 4])
        size *= radix
        src, dst = dst, src
    return src


@_njit
def _sample(signal, i, emphasis):
    """signal[i], or its pre-emphasis (python_speech_features': the first sample unchanged) if emphasis != 0."""
    if emphasis == 0 or i == 0:
        return signal[i]
    return signal[i] - emphasis * signal[i - 1]


@_njit
def _band_energies_kernel(signal, emphasis, start, step, frame_len, window, nfft, radices, offsets, twiddles,
                          unpack, starts, woffsets, weights, out):
    """out[t, j] = sum_k weights_j[k] |rfft(frame_t * window, nfft)[k]|^2, frame t = x[start + t step :][:
    frame_len], samples outside the signal being zeros (frames longer than nfft are cut, as rfft does).
    x = the signal, or its pre-emphasis x[i] - emphasis x[i - 1] (in the signal's dtype) if emphasis != 0.
    Each frame's arithmetic is the same wherever it sits in a batch, so results never depend on how a signal was
    split into calls."""
    count, n = out.shape[0], signal.shape[0]
    used = min(frame_len, nfft)
    half = nfft // 2
    lanes = FFT_LANES
    z = np.empty((half, lanes), np.complex128)
    work = np.empty((half, lanes), np.complex128)
    power = np.empty((half + 1, lanes))
    acc = np.empty(lanes)
    for first in range(0, count, lanes):
        rows = min(lanes, count - first)
        z[used // 2:] = 0.0  # zero padding to nfft (the FFT used z as a buffer): rows the frames never fill
        if rows < lanes:
            z[:, rows:] = 0.0  # the unused lanes of the last batch
        for b in range(rows):  # rfft of n real points = FFT of n/2 complex ones (even + i odd samples)
            base = start + (first + b) * step
            if base >= 0 and base + used <= n:
                for i in range(used // 2):
                    z[i, b] = complex(np.float64(_sample(signal, base + 2 * i, emphasis)) * window[2 * i],
                                      np.float64(_sample(signal, base + 2 * i + 1, emphasis)) * window[2 * i + 1])
                if used & 1:
                    z[used // 2, b] = np.float64(_sample(signal, base + used - 1, emphasis)) * window[used - 1]
            else:  # a frame reaching past either end: zeros there
                z[: (used + 1) // 2, b] = 0.0
                for i in range(max(0, -base), min(used, n - base)):
                    v = np.float64(_sample(signal, base + i, emphasis)) * window[i]
                    old = z[i >> 1, b]
                    z[i >> 1, b] = complex(old.real, v) if i & 1 else complex(v, old.imag)
        spectrum = _fft_lanes(z, work, radices, offsets, twiddles)
        for k in range(half + 1):  # rfft bin k = E + w^k O from bins k and half - k (E, O: even, odd samples)
            za, zc, w = spectrum[k % half], spectrum[(half - k) % half], unpack[k]
            for b in range(lanes):
                er = 0.5 * (za[b].real + zc[b].real)
                ei = 0.5 * (za[b].imag - zc[b].imag)
                orr = 0.5 * (za[b].imag + zc[b].imag)
                oi = -0.5 * (za[b].real - zc[b].real)
                xr = er + (orr * w.real - oi * w.imag)
                xi = ei + (orr * w.imag + oi * w.real)
                power[k, b] = xr * xr + xi * xi
        for j in range(starts.shape[0]):
            acc[:] = 0.0
            for q in range(woffsets[j], woffsets[j + 1]):
                k = starts[j] + q - woffsets[j]
                w = weights[q]
                for b in range(lanes):
                    acc[b] += w * power[k, b]
            for b in range(rows):
                out[first + b, j] = acc[b]


def _band_energies(signal: np.ndarray, start: int, count: int, step: int, window: np.ndarray, nfft: int,
                   bands, emphasis: float = 0.0) -> np.ndarray:
    """(count, bands) float64 filterbank energies (``bands``: _sparse_bands) of |rfft(frame * window, nfft)|^2 for
    the frames of len(window) samples every ``step`` from ``start`` (negative: zeros before the signal), zero-padded
    past its end, of the signal or (``emphasis`` != 0) its pre-emphasis.  No frame matrix is built."""
    out = np.empty((count, bands[0].shape[0]))
    if not _use_numba():
        return _band_energies_numpy(signal, signal.dtype.type(emphasis), start, step, window, nfft, bands, out)
    _band_energies_kernel(signal, signal.dtype.type(emphasis), start, step, window.shape[0], window, nfft,
                          *_fft_plan(nfft), *bands, out)
    return out


NUMPY_BLOCK_FRAMES = 2048   # frames per numpy FFT block: (2048, 512) float64 frames = 8 MiB


@functools.lru_cache(maxsize=16)
def _dense_bands(bands_key: tuple, nbins: int) -> np.ndarray:
    starts, offsets, weights = (np.frombuffer(b, dtype) for b, dtype in zip(bands_key, (np.int64, np.int64, float)))
    dense = np.zeros((nbins, starts.shape[0]))
    for j in range(starts.shape[0]):
        dense[starts[j]:starts[j] + offsets[j + 1] - offsets[j], j] = weights[offsets[j]:offsets[j + 1]]
    dense.setflags(write=False)
    return dense


def _band_energies_numpy(signal, emphasis, start, step, window, nfft, bands, out) -> np.ndarray:
    """What _band_energies_kernel computes, with numpy: frames (zeros outside the signal; pre-emphasis in the
    signal's dtype, the first sample unchanged) x window in float64, |rfft|^2, dense filterbank product."""
    frame_len, n = window.shape[0], signal.shape[0]
    used = min(frame_len, nfft)
    if emphasis != 0:
        x = np.empty_like(signal)
        if n:
            x[0] = signal[0]
            np.subtract(signal[1:], emphasis * signal[:-1], out=x[1:])
    else:
        x = signal
    # Pad so that every frame lies inside: `before` zeros for a negative start, enough after for the last frame.
    before = max(0, -start)
    after = max(0, start + (out.shape[0] - 1) * step + used - n)
    padded = np.concatenate([np.zeros(before, x.dtype), x, np.zeros(after, x.dtype)]) if before or after else x
    dense = _dense_bands(tuple(np.ascontiguousarray(b).tobytes() for b in bands), nfft // 2 + 1)
    win = np.asarray(window[:used], dtype=np.float64)
    for first in range(0, out.shape[0], NUMPY_BLOCK_FRAMES):
        count = min(NUMPY_BLOCK_FRAMES, out.shape[0] - first)
        offsets = before + start + (first + np.arange(count)) * step
        frames = padded[offsets[:, None] + np.arange(used)].astype(np.float64) * win
        spectrum = np.fft.rfft(frames, nfft)
        power = spectrum.real ** 2 + spectrum.imag ** 2
        np.matmul(power, dense, out=out[first:first + count])
    return out


_EPS = float(np.finfo(np.float64).eps)  # python_speech_features' stand-in for zero energies
_PAIRWISE_BLOCK = 128  # numpy sums up to 128 values with 8 interleaved partial sums (PW_BLOCKSIZE)


@_njit
def _pairwise_sum(x, n):
    """sum(x[:n]) for n <= 128 in numpy's order (np.sum / np.mean of a short row), so results are bit-equal."""
    if n < 8:
        total = 0.0
        for i in range(n):
            total += x[i]
        return total
    r0, r1, r2, r3, r4, r5, r6, r7 = x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]
    i = 8
    while i < n - n % 8:
        r0, r1, r2, r3 = r0 + x[i], r1 + x[i + 1], r2 + x[i + 2], r3 + x[i + 3]
        r4, r5, r6, r7 = r4 + x[i + 4], r5 + x[i + 5], r6 + x[i + 6], r7 + x[i + 7]
        i += 8
    total = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        total += x[i]
        i += 1
    return total


@_njit
def _normalize_rows_kernel(feat, out):
    """out = float32 of each row's (v - mean) / max(std, 1e-12), zeros replaced by float64 eps first: the original
    per-frame loop (np.mean, np.std) with numpy's exact operations and summation order."""
    n = feat.shape[1]
    squares = np.empty(n)
    for t in range(feat.shape[0]):
        row = feat[t]
        for i in range(n):
            if row[i] == 0.0:
                row[i] = _EPS
        mean = _pairwise_sum(row, n) / n
        for i in range(n):
            d = row[i] - mean
            squares[i] = d * d
        std = max(np.sqrt(_pairwise_sum(squares, n) / n), 1e-12)
        for i in range(n):
            out[t, i] = (row[i] - mean) / std



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


@functools.lru_cache(maxsize=16)
def _psf_bands(num_bands: int, sample_rate: int):
    # The power spectrum's 1/NFFT is folded into the weights (a power of two: bit-identical, one pass less).
    return _sparse_bands(_psf_filterbank(num_bands, NFFT, sample_rate, 1.0 / NFFT))


@functools.lru_cache(maxsize=4)
def _ones(n: int) -> np.ndarray:
    w = np.ones(n)
    w.setflags(write=False)
    return w


def _normalize_frames(feat: np.ndarray) -> np.ndarray:
    """Per frame (row): (v - mean) / max(std, 1e-12) across the bands, as the original; zeros -> eps first.
    float64 in (modified in place), float32 out."""
    if feat.shape[1] > _PAIRWISE_BLOCK or not _use_numba():  # numpy's own sums: the same (see the kernel)
        feat[feat == 0] = _EPS
        mean = feat.mean(axis=1, keepdims=True)
        return ((feat - mean) / np.maximum(feat.std(axis=1, keepdims=True), 1e-12)).astype(np.float32)
    out = np.empty(feat.shape, np.float32)
    _normalize_rows_kernel(feat, out)
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


# ---------------------------------------------------------------------------
# Log-mel with per-utterance mean normalisation
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _librosa_mel(sample_rate: int, n_fft: int, n_mels: int, fmin: float):
    """Sparse (see _sparse_bands) float32 Slaney mel filters: ``librosa.filters.mel(sr=sample_rate, n_fft=n_fft,
    n_mels=n_mels, fmin=fmin, fmax=sample_rate / 2, dtype=np.float32)``, computed as librosa does but with
    portable_math's log and exp, so the weights are the same on every CPU; cached."""
    mel = _slaney_mel(sample_rate, n_fft, n_mels, fmin, sample_rate / 2)
    return _sparse_bands(mel.T)


_SLANEY_HZ_PER_MEL = 200.0 / 3  # linear below 1 kHz ...
_SLANEY_LOG_HZ = 1000.0
_SLANEY_LOG_STEP = float(pm.log(6.4)) / 27.0  # ... logarithmic above


def _slaney_mel(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """librosa.filters.mel (Slaney scale and norm), float32 (n_mels, 1 + n_fft // 2), step by step as librosa 0.11."""
    def hz_to_mel(hz):
        mels = hz / _SLANEY_HZ_PER_MEL
        if hz >= _SLANEY_LOG_HZ:
            mels = _SLANEY_LOG_HZ / _SLANEY_HZ_PER_MEL + float(pm.log(hz / _SLANEY_LOG_HZ)) / _SLANEY_LOG_STEP
        return mels

    mels = np.linspace(hz_to_mel(float(fmin)), hz_to_mel(float(fmax)), n_mels + 2)
    mel_f = _SLANEY_HZ_PER_MEL * mels
    log_mel = _SLANEY_LOG_HZ / _SLANEY_HZ_PER_MEL
    log_region = mels >= log_mel
    mel_f[log_region] = _SLANEY_LOG_HZ * pm.exp(_SLANEY_LOG_STEP * (mels[log_region] - log_mel))
    fftfreqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fftfreqs)
    weights = np.zeros((n_mels, 1 + n_fft // 2), np.float32)
    for i in range(n_mels):
        weights[i] = np.maximum(0, np.minimum(-ramps[i] / fdiff[i], ramps[i + 2] / fdiff[i + 1]))
    weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, np.newaxis]
    return weights


@functools.lru_cache(maxsize=4)
def _hann(n: int) -> np.ndarray:
    # Periodic Hann, float64: scipy.signal.get_window('hann', n), librosa's stft window.
    w = 0.5 - 0.5 * pm.cos(2.0 * np.pi * np.arange(n) / n)
    w.setflags(write=False)
    return w


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
    feat -= feat.mean(axis=0, dtype=np.float64)  # a float64 mean: float32 sums over long files drift ~1e-5
    return feat


def _logmel_of_frames(sig: np.ndarray, start: int, count: int, sample_rate: int, num_bands: int) -> np.ndarray:
    """logmel_cmn before the mean normalisation: the ``count`` frames from ``start`` -> float32 log-mel."""
    frame_len, frame_step = _frame_params(sample_rate)
    energies = _band_energies(sig, start, count, frame_step, _hann(frame_len), NFFT,
                              _librosa_mel(sample_rate, NFFT, num_bands, 20.0))
    energies += 1e-6
    return pm.log(energies).astype(np.float32)  # portable: numpy's log differs in the last bit between CPUs


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
MFCC_BANDS = 64


def mfcc_stats(signal: np.ndarray, sample_rate: int = 16000, n_mfcc: int = 20) -> np.ndarray:
    """[mean over time, std over time] of librosa MFCCs (n_fft 400, hop 160, 64 mels): float32 (2*n_mfcc,).

    ``librosa.feature.mfcc(y=signal, sr=sample_rate, n_mfcc=n_mfcc, n_fft=400, hop_length=160, n_mels=64)``
    (centred zero-padded frames, periodic Hann, power spectrum, Slaney mels, power_to_db with top_db 80,
    orthonormal DCT-II), computed with the batched kernel in float64: equal to librosa's statistics up to its
    float32 rounding (relative differences ~1e-6).
    """
    y = np.asarray(signal, dtype=np.float32)
    # librosa's centred frames: frame t starts at t hop - n_fft/2, zeros beyond both ends
    db = _mfcc_db_of_frames(y, -(MFCC_N_FFT // 2), 1 + y.shape[0] // MFCC_HOP, sample_rate)
    np.maximum(db, db.max() - MFCC_TOP_DB, out=db)
    mfcc = _dct_rows(db, _dct_ortho(MFCC_BANDS, n_mfcc))
    return np.concatenate([mfcc.mean(axis=0), mfcc.std(axis=0)]).astype(np.float32)


def _mfcc_db_of_frames(y: np.ndarray, start: int, count: int, sample_rate: int) -> np.ndarray:
    """librosa's melspectrogram + power_to_db (before its top_db clamp) of the ``count`` 400-sample frames every
    160 from ``start``, float64."""
    mel = _band_energies(y, start, count, MFCC_HOP, _hann(MFCC_N_FFT), MFCC_N_FFT,
                         _librosa_mel(sample_rate, MFCC_N_FFT, MFCC_BANDS, 0.0))
    np.maximum(mel, 1e-10, out=mel)
    mel = pm.log10(mel)
    mel *= 10.0
    return mel


def _dct_rows(db: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """db @ matrix, summed over the inner index in a fixed order: BLAS picks its kernel (and so its summation
    order) by CPU, which changes the last bit of the product from machine to machine."""
    out = np.zeros((db.shape[0], matrix.shape[1]))
    for k in range(matrix.shape[0]):
        out += db[:, k, None] * matrix[k]
    return out


@functools.lru_cache(maxsize=4)
def _dct_ortho(n_in: int, n_out: int) -> np.ndarray:
    """(n_in, n_out): x @ it = scipy.fft.dct(x, type=2, norm='ortho')[..., :n_out] (what librosa.feature.mfcc uses),
    to within 2e-15 (tested). Written out with portable_math's cosine rather than taken from scipy: the same bits on
    every CPU, and the runtime (which needs the statistics for a bundle with a statistics branch) needs no scipy."""
    from voiceprint import portable_math

    n, k = np.arange(n_in, dtype=np.float64)[:, None], np.arange(n_out, dtype=np.float64)[None, :]
    matrix = portable_math.cos(np.pi * (2.0 * n + 1.0) * k / (2.0 * n_in))
    matrix *= np.where(k == 0, np.sqrt(1.0 / n_in), np.sqrt(2.0 / n_in))
    matrix = np.ascontiguousarray(matrix)
    matrix.setflags(write=False)
    return matrix



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
    ``frame_step``, after ``left_pad`` zeros), each once, as soon as it is complete: as ``(buffer, count)``, the
    frames being ``buffer[t * frame_step :][:frame_len]`` for t < count."""

    def __init__(self, frame_len: int, frame_step: int, left_pad: int = 0):
        self.frame_len, self.frame_step = frame_len, frame_step
        self._buf = np.zeros(left_pad, np.float32)
        self.emitted = 0

    def push(self, x: np.ndarray) -> tuple[np.ndarray, int] | None:
        buf = np.concatenate([self._buf, x]) if self._buf.size else x
        if buf.shape[0] < self.frame_len:
            self._buf = buf
            return None
        k = 1 + (buf.shape[0] - self.frame_len) // self.frame_step
        self._buf = buf[k * self.frame_step :]
        self.emitted += k
        return buf, k

    def finish_zero_padded(self, total_frames: int) -> tuple[np.ndarray, int] | None:
        """The remaining frames up to ``total_frames``; the feature kernel reads zeros past the buffer's end."""
        remaining = total_frames - self.emitted
        if remaining <= 0:
            return None
        self.emitted += remaining
        return self._buf, remaining


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


def _chunked_features(chunks: Iterable[np.ndarray], segments, kind: str, sample_rate: int, num_bands: int = 64,
                      with_mfcc_stats: bool = True):
    """Features and mfcc_stats of the ``segments`` of a signal, with one chunk in memory (plus the features).

    ``chunks`` is iterated twice (each time giving the same chunks): features and the MFCC log-mel maximum
    (power_to_db's top_db reference), then the MFCC statistics. ``with_mfcc_stats=False``: features only, one
    pass, stats None.
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

    def features(cut):
        nonlocal filled
        if cut is None:
            return
        buf, rows = cut
        if kind == "fbank_norm":
            out[filled : filled + rows] = _fbank_of_frames(buf, 0, rows, sample_rate, num_bands)
        else:
            out[filled : filled + rows] = _logmel_of_frames(buf, 0, rows, sample_rate, num_bands)
        filled += rows

    def mfcc_max(cut):
        nonlocal mel_max
        if cut is not None and with_mfcc_stats:
            buf, rows = cut
            mel_max = max(mel_max, float(_mfcc_db_of_frames(buf, 0, rows, sample_rate).max()))

    for piece in _select(chunks, segments):
        if kind == "fbank_norm":  # fbank_original's pre-emphasis (same float32 operations), across pieces
            if previous is None:
                emph = _preemphasis(piece)
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
        out -= out.mean(axis=0, dtype=np.float64)  # as logmel_cmn
    if not with_mfcc_stats:
        return out, None

    stats = _MeanStd()
    floor_db = mel_max - MFCC_TOP_DB
    cutter = _FrameCutter(MFCC_N_FFT, MFCC_HOP, left_pad=MFCC_N_FFT // 2)

    def mfcc_add(cut):
        if cut is not None:
            buf, rows = cut
            db = np.maximum(_mfcc_db_of_frames(buf, 0, rows, sample_rate), floor_db)
            stats.add(_dct_rows(db, _dct_ortho(MFCC_BANDS, 20)))

    for piece in _select(chunks, segments):
        mfcc_add(cutter.push(piece))
    mfcc_add(cutter.push(np.zeros(MFCC_N_FFT // 2, np.float32)))
    return out, stats.result()


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def _too_short(path, samples: int, vad: str, frame_len: int) -> AudioError:
    return AudioError(path, "too_short", f"{samples} samples left by the {vad!r} VAD, need > {frame_len}")


def _featurize_chunked(path, kind, sample_rate, min_seconds, vad, max_clipped_fraction, chunk_seconds,
                       with_mfcc_stats=True):
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
    return _chunked_features(audio, segments, kind, sample_rate, with_mfcc_stats=with_mfcc_stats)


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
    with_mfcc_stats: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """File -> (features (frames, 64) float32 of ``kind``, mfcc_stats vector): the one way to make model input.

    load_audio -> VAD (``vad``: ``original`` = trim_silence_original, ``energy`` = vad_energy) ->
    (FEATURE_KINDS[kind], mfcc_stats).  ``min_seconds`` applies to the decoded audio, before the VAD;
    ``max_clipped_fraction`` as in :func:`voiceprint.audio.load_audio` (None: no check).

    A file longer than ``long_file_seconds`` (by its header) is decoded and featurized in chunks of
    ``chunk_seconds``, never holding more than one chunk of audio: same features (bit-identical in tests), and
    the same mfcc_stats up to float rounding (merged per-chunk float64 sums instead of one mean and std).  Each
    pass over the chunks decodes the file again (4 passes with the ``original`` VAD, 3 with ``energy``).

    ``with_mfcc_stats=False`` (the runtime, which only embeds): the same features, mfcc_stats None, and neither
    their compute nor scipy's import (a cold start's ~0.3 s), nor the chunked path's extra pass.

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
        return _featurize_chunked(path, kind, sample_rate, min_seconds, vad, max_clipped_fraction, chunk_seconds,
                                  with_mfcc_stats=with_mfcc_stats)
    speech = _speech(y, path, sample_rate, vad)
    return fn(speech, sample_rate=sample_rate), (mfcc_stats(speech, sample_rate) if with_mfcc_stats else None)


def _speech(y: np.ndarray, path, sample_rate: int, vad: str) -> np.ndarray:
    """The VAD's output, refused (AudioError naming ``path``) when no speech or too little is left."""
    try:
        speech = apply_vad(y, vad, sample_rate)
    except NoSpeechError as exc:
        raise AudioError(path, "no_speech", str(exc)) from None
    frame_len, frame_step = _frame_params(sample_rate)
    n = num_frames(speech.shape[0], frame_len, frame_step)
    if speech.shape[0] <= frame_len or n < MIN_FRAMES:
        raise _too_short(path, speech.shape[0], vad, frame_len)
    return speech


def featurize_signal(y: np.ndarray, kind: str, sample_rate: int = 16000, *, vad: str = "original",
                     name: str = "<array>", with_stats: bool = False):
    """Features of a signal already loaded and checked (:func:`voiceprint.audio.load_signal` / ``load_bytes``):
    the model-input half of :func:`featurize_file` (VAD, then ``kind``), with the same errors naming ``name``.
    ``with_stats``: ``(features, mfcc_stats)`` as :func:`featurize_file` returns (the statistics cost a second
    pass, so only callers that use them ask)."""
    fn = _check_kind(kind)
    _check_vad(vad)
    speech = _speech(y, name, sample_rate, vad)
    features = fn(speech, sample_rate=sample_rate)
    return (features, mfcc_stats(speech, sample_rate)) if with_stats else features


def _warm_up(kind: str, sample_rate: int) -> None:
    """Run every compiled kernel ``kind`` uses once, on a short noise signal of the dtypes and layouts real input
    has.  Numba compiles on first use (seconds; later processes load the cache)."""
    noise = np.random.default_rng(0).standard_normal(2 * FRAME_LEN).astype(np.float32)
    speech = trim_silence_original(noise)
    FEATURE_KINDS[kind](speech, sample_rate=sample_rate)
    mfcc_stats(speech, sample_rate)


_BLAS_LIMITER = None  # keeps the worker's threadpool limit alive
# In a worker: the shared array holding, per worker, the index of the file it is on (-1: none), and its slot.
_SLOTS, _SLOT = None, -1


def _init_worker(slots=None, counter=None) -> None:
    # One BLAS/OpenMP thread per worker: N processes x N threads would
    # oversubscribe the cores.  The env vars cover libraries loaded later; the
    # already-loaded ones (numpy's OpenBLAS, inherited via fork) need threadpoolctl.
    global _BLAS_LIMITER, _SLOTS, _SLOT
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    from threadpoolctl import threadpool_limits

    _BLAS_LIMITER = threadpool_limits(limits=1)
    if slots is not None:
        with counter.get_lock():
            _SLOT, counter.value = counter.value, counter.value + 1
        _SLOTS = slots
        # When one worker dies, the executor stops the others with SIGTERM: they clear their slot first, so only
        # the one that died on its own (kill -9, the OOM killer, a crash) still names its file.
        signal.signal(signal.SIGTERM, _stop_worker)


def _stop_worker(signum, frame):
    _SLOTS[_SLOT] = -1
    os._exit(128 + signum)


def _featurize_tracked(task):
    _SLOTS[_SLOT] = task[0]
    result = _featurize_one(task)
    _SLOTS[_SLOT] = -1
    return result


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
    limit); otherwise a process pool of ``workers`` processes
    (``start_method``: None = the platform default context, or 'fork',
    'spawn', 'forkserver').  ``kind`` and ``vad`` are validated up front (ValueError).
    A worker that dies (kill -9, the out-of-memory killer, a crash) raises WorkerDiedError naming the file it
    was on: a concurrent.futures pool reports a lost worker, where multiprocessing.Pool waited forever.
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
        _warm_up(kind, sample_rate)  # compile (or load) the kernels once here: forked workers inherit them
        ctx = multiprocessing.get_context(start_method)
        # Chunks amortise IPC but keep ordering latency / load balance reasonable.
        chunksize = max(1, min(32, len(tasks) // (workers * 8)))
        slots = ctx.Array("q", [-1] * workers, lock=False)
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                   initargs=(slots, ctx.Value("i", 0)))
        try:
            for result in pool.map(_featurize_tracked, tasks, chunksize=chunksize):
                if bar is not None:
                    bar.update(1)
                yield result
        except BrokenProcessPool:
            pool.shutdown(wait=True, cancel_futures=True)   # every worker has exited: the slots are final
            lost = ", ".join(paths[i] for i in slots if i >= 0) or "(none: it died between files)"
            raise WorkerDiedError(f"a features worker process died (killed: out of memory, kill -9, or a "
                                    f"crash) while processing {lost}") from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        if bar is not None:
            bar.close()

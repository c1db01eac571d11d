"""Frame-level features and batch feature extraction (no TensorFlow).

Two feature kinds share one framing convention (25 ms window = 400 samples,
10 ms hop = 160 samples, no centre padding, zero-padded tail, frame count
``1 + ceil((N - 400) / 160)``, 1 frame when ``N <= 400``):

* ``fbank_norm`` -- the original Deep Speaker features, numerically matching
  ``python_speech_features.fbank(signal, 16000, nfilt=64)`` energies followed
  by per-frame normalisation (see PROTOCOL.md section 2).
* ``logmel_cmn`` -- log-mel energies (Hann window) with per-utterance mean
  normalisation of each band; a more conventional alternative.

Plus ``mfcc_stats``, a 40-dim utterance vector (MFCC means and stds) used as a
no-training baseline.

This module runs inside multiprocessing workers, before TF is imported anywhere.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
from typing import Callable, Iterable, Iterator

import numpy as np
import scipy.fft

from voiceprint.audio import AudioError, load_audio

__all__ = [
    "FRAME_LEN",
    "FRAME_STEP",
    "NFFT",
    "FEATURE_KINDS",
    "num_frames",
    "trim_silence_original",
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
    frames = _frames(sig, frame_len, frame_step) * _hann(frame_len)
    # scipy's pocketfft keeps float32 (complex64) and is ~2.5x faster here than numpy's.
    spec = scipy.fft.rfft(frames, NFFT, axis=1, overwrite_x=True)
    pspec = np.square(np.abs(spec))  # float32; faster than re**2 + im**2 here
    feat = pspec @ _librosa_mel(sample_rate, NFFT, num_bands, 20.0)
    np.log(feat + np.float32(1e-6), out=feat)
    feat -= feat.mean(axis=0, keepdims=True)
    return feat


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

FEATURE_KINDS: dict[str, Callable[..., np.ndarray]] = {
    "fbank_norm": fbank_original,
    "logmel_cmn": logmel_cmn,
}


def _check_kind(kind: str) -> Callable[..., np.ndarray]:
    try:
        return FEATURE_KINDS[kind]
    except KeyError:
        raise ValueError(
            f"unknown feature kind {kind!r}; valid kinds: {', '.join(sorted(FEATURE_KINDS))}"
        ) from None


def extract(signal: np.ndarray, kind: str, sample_rate: int = 16000) -> np.ndarray:
    """trim_silence_original, then the feature function registered as ``kind``."""
    fn = _check_kind(kind)
    return fn(trim_silence_original(signal), sample_rate=sample_rate)


# ---------------------------------------------------------------------------
# No-training baseline vector
# ---------------------------------------------------------------------------


def mfcc_stats(signal: np.ndarray, sample_rate: int = 16000, n_mfcc: int = 20) -> np.ndarray:
    """[mean over time, std over time] of librosa MFCCs (n_fft 400, hop 160, 64 mels): float32 (2*n_mfcc,)."""
    import librosa

    mfcc = librosa.feature.mfcc(
        y=np.asarray(signal, dtype=np.float32),
        sr=sample_rate,
        n_mfcc=n_mfcc,
        n_fft=400,
        hop_length=160,
        n_mels=64,
    )
    return np.concatenate([mfcc.mean(axis=1), mfcc.std(axis=1)]).astype(np.float32)


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def featurize_file(
    path, kind: str, sample_rate: int = 16000, min_seconds: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """load_audio -> trim_silence_original -> (extract(kind), mfcc_stats).

    ``min_seconds`` applies to the decoded audio, before trimming.

    Raises:
        ValueError: unknown ``kind`` (checked before decoding).
        AudioError: whatever :func:`voiceprint.audio.load_audio` rejects, and
            reason ``too_short`` when the *trimmed* signal gives fewer than
            2 frames (<= 400 samples at 16 kHz): a single, zero-padded frame is
            not a usable utterance (and the trim can shrink a file a lot).
    """
    fn = _check_kind(kind)
    y = load_audio(path, sample_rate=sample_rate, min_seconds=min_seconds)
    trimmed = trim_silence_original(y)
    frame_len, frame_step = _frame_params(sample_rate)
    n = num_frames(trimmed.shape[0], frame_len, frame_step)
    if trimmed.shape[0] <= frame_len or n < MIN_FRAMES:
        raise AudioError(
            path, "too_short", f"{trimmed.shape[0]} samples after silence trim, need > {frame_len}"
        )
    return fn(trimmed, sample_rate=sample_rate), mfcc_stats(trimmed, sample_rate)


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
    index, path, kind, sample_rate, min_seconds = task
    try:
        feats, base = featurize_file(path, kind, sample_rate=sample_rate, min_seconds=min_seconds)
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
    progress: bool = True,
    start_method: str | None = None,
) -> Iterator[tuple[int, np.ndarray | None, np.ndarray | None, str | None, str | None]]:
    """Featurize many files, yielding ``(index, features, baseline, reason, message)`` in input order.

    Good files give ``(i, feats, baseline_vec, None, None)``; a rejected file gives
    ``(i, None, None, reason, message)`` with the AudioError reason code, or
    ``'error'`` for an unexpected exception (message names the file).  One bad
    file never stops the run.

    ``workers <= 1`` computes in this process (with the same 1-thread BLAS
    limit); otherwise a multiprocessing Pool of ``workers`` processes
    (``start_method``: None = the platform default context, or 'fork',
    'spawn', 'forkserver').  ``kind`` is validated up front (ValueError).
    """
    _check_kind(kind)
    paths = [str(p) for p in paths]
    tasks = [(i, p, kind, sample_rate, min_seconds) for i, p in enumerate(paths)]
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

"""Filterbanks and windows, cached: python_speech_features' HTK-mel triangles (``fbank_norm``) and librosa's
Slaney mel filters (``logmel_cmn``, the MFCC statistics), both in the sparse form the band-energy kernel takes."""

from __future__ import annotations

import functools

import numpy as np

from voiceprint.core import portable_math as pm
from voiceprint.features.framing import NFFT
from voiceprint.features.kernels import _sparse_bands

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


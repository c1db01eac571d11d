"""The no-training baseline: ``mfcc_stats``, a 40-dim utterance vector (the means and stds of 20 MFCCs), as
librosa computes it, from the same batched band-energy kernel as the features."""

from __future__ import annotations

import functools

import numpy as np

from voiceprint.core import portable_math as pm
from voiceprint.features.filterbanks import _hann, _librosa_mel
from voiceprint.features.kernels import _band_energies


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
    from voiceprint.core import portable_math

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


"""Audio intake: decode, mix to mono, resample, validate.

Every way a file can be unusable is turned into an :class:`AudioError` with a
short machine-friendly ``reason`` code, so that batch feature extraction can
record rejected files (``rejected.csv``) instead of crashing on them.

No TensorFlow here: this runs inside multiprocessing workers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf

__all__ = ["AudioError", "REASONS", "load_audio"]

# Reason codes an AudioError can carry (stable: they end up in rejected.csv).
REASONS = {
    "missing": "file does not exist",
    "unreadable": "cannot be decoded",
    "empty": "contains no samples",
    "non_finite": "contains NaN or Inf samples",
    "silent": "is digital silence (all samples are zero)",
    "too_short": "is too short",
}


class AudioError(ValueError):
    """A file that cannot be used as speech audio.

    Attributes:
        path: the offending file (as given).
        reason: short code, one of :data:`REASONS` keys.
        detail: optional human-readable detail (decoder message, durations...).
    """

    def __init__(self, path, reason: str, detail: str | None = None):
        self.path = str(path)
        self.reason = reason
        self.detail = detail
        text = REASONS.get(reason, reason)
        msg = f"{self.path}: {text}" + (f" ({detail})" if detail else "")
        super().__init__(msg)

    def __reduce__(self):
        # Custom __init__ signature: make it survive pickling across processes.
        return (type(self), (self.path, self.reason, self.detail))


def _resample(y: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    # soxr "HQ" through librosa: a proper band-limited resampler (what
    # librosa.load itself uses by default), so 8 kHz corpora are not aliased.
    import librosa

    return librosa.resample(y, orig_sr=orig_sr, target_sr=target_sr, res_type="soxr_hq").astype(
        np.float32, copy=False
    )


def load_audio(path, sample_rate: int = 16000, min_seconds: float = 0.0) -> np.ndarray:
    """Decode ``path`` to a float32 mono signal at ``sample_rate``, values in [-1, 1].

    For a file already at ``sample_rate`` whose samples are integer PCM (FLAC,
    16-bit WAV, ...) the result equals
    ``librosa.load(path, sr=sample_rate, mono=True, dtype=np.float32)[0]``
    exactly (what the original implementation used).  Float files with samples
    outside [-1, 1] are clipped (the resampler can also overshoot slightly).

    Raises:
        AudioError: reason ``missing``, ``unreadable``, ``empty``, ``non_finite``,
            ``silent`` or ``too_short`` (shorter than ``min_seconds`` after
            resampling).
    """
    p = Path(path)
    if not p.exists():
        raise AudioError(path, "missing")
    try:
        if os.path.getsize(p) == 0:
            raise AudioError(path, "empty", "zero-byte file")
        data, sr = sf.read(str(p), dtype="float32", always_2d=True)
    except AudioError:
        raise
    except (sf.SoundFileError, RuntimeError, OSError, ValueError, TypeError) as exc:
        # libsndfile's errors (unknown format, truncated header, ...) and OS errors.
        raise AudioError(path, "unreadable", f"{type(exc).__name__}: {exc}") from exc

    if data.shape[0] == 0:
        raise AudioError(path, "empty")
    # Mean over channels, like librosa.to_mono (for 1 channel this is exact).
    y = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.float32)
    if not np.isfinite(y).all():
        raise AudioError(path, "non_finite")
    if not y.any():
        raise AudioError(path, "silent")

    if sr != sample_rate:
        y = _resample(y, sr, sample_rate)
    # PCM decodes are already within [-1, 1) so this is a no-op for them.
    np.clip(y, -1.0, 1.0, out=y)

    duration = y.shape[0] / float(sample_rate)
    if duration < min_seconds:
        raise AudioError(path, "too_short", f"{duration:.3f} s < {min_seconds:g} s")
    return y

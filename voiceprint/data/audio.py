"""Audio intake: decode, mix to mono, resample, validate.

Every way a file can be unusable is turned into an :class:`AudioError` with a
short machine-friendly ``reason`` code, so that batch feature extraction can
record rejected files (``rejected.csv``) instead of crashing on them.

Short files are decoded whole (:func:`load_audio`); long ones (hours) are read
chunk by chunk (:class:`ChunkedAudio`) with a streaming resampler, so memory
stays at one chunk.  Both give the same samples and apply the same checks.

No TensorFlow here: this runs inside multiprocessing workers.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import soundfile as sf

from voiceprint.core.errors import VoiceprintError

__all__ = [
    "AUDIO_EXTENSIONS",
    "AudioError",
    "Audio",
    "ChunkedAudio",
    "FULL_SCALE",
    "REASONS",
    "decode",
    "load_audio",
    "load_bytes",
    "load_signal",
    "open_audio",
]

# Reason codes an AudioError can carry (stable: they end up in rejected.csv).
REASONS = {
    "missing": "file does not exist",
    "unreadable": "cannot be decoded",
    "empty": "contains no samples",
    "non_finite": "contains NaN or Inf samples",
    "silent": "is digital silence (all samples are zero)",
    "too_short": "is too short",
    "too_long": "is longer than allowed",
    "not_audio": "is not an audio file this build decodes",
    "permission_denied": "cannot be read (permission denied)",
    "clipped": "is clipped (too many samples at full scale)",
    "no_speech": "has no detectable speech (energy VAD)",
}

# Extensions of the formats the pinned libsndfile (soundfile 0.14, libsndfile 1.2.2) decodes, MP3 and Opus
# included; tests decode wav, flac, ogg, opus and mp3.  A file with another extension is "not_audio".
AUDIO_EXTENSIONS = frozenset(
    {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".caf", ".w64"}
)

# A sample "at full scale": int16 PCM decodes its rails to -1.0 and 32767/32768; anything at least that loud
# (24-bit rails, float files at or beyond +-1) counts too.  Clipping policy (features.max_clipped_fraction,
# default 1%): peak-normalised clean speech reaches full scale at isolated samples only (none at all in
# LibriSpeech-mini, FSDD and the synthetic corpus); clipping 1% of the samples moves log-mel features by 0.7 dB
# on average and 3 dB in the most affected frames, 0.1% by 0.1 dB (bench/clipping_effect.py), so files below 1%
# are kept (their distortion is smaller than channel differences) and files above it rejected.  Lossy codecs
# smear clipped runs below full scale, so an MP3 or Ogg file can be clipped and still pass.
FULL_SCALE = 32767.0 / 32768.0


class AudioError(VoiceprintError, ValueError):
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


def open_audio(path) -> sf.SoundFile:
    """Open ``path`` for decoding (caller closes it), mapping every failure to an :class:`AudioError`.

    Reasons: ``missing``, ``permission_denied``, ``empty`` (zero bytes), ``not_audio`` (undecodable and the
    extension is not in :data:`AUDIO_EXTENSIONS`), ``unreadable`` (undecodable audio file: corrupt, truncated
    header...).
    """
    p = Path(path)
    try:
        if os.path.getsize(p) == 0:
            raise AudioError(path, "empty", "zero-byte file")
        # Opening it ourselves first turns an unreadable file into a PermissionError rather than a libsndfile
        # message that only says "System error".
        with open(p, "rb"):
            pass
        # As bytes: soundfile encodes a str path strictly, which fails on a name that is not valid UTF-8.
        return sf.SoundFile(os.fsencode(p))
    except AudioError:
        raise
    except FileNotFoundError:
        raise AudioError(path, "missing") from None
    except PermissionError as exc:
        raise AudioError(path, "permission_denied", str(exc)) from None
    except (sf.SoundFileError, RuntimeError, OSError, ValueError, TypeError) as exc:
        # libsndfile's errors (unknown format, truncated header, ...) and OS errors (a folder, ...).
        reason = "unreadable" if p.suffix.lower() in AUDIO_EXTENSIONS else "not_audio"
        raise AudioError(path, reason, f"{type(exc).__name__}: {exc}") from exc


def _check_clipping(path, clipped: int, total: int, max_clipped_fraction: float | None) -> None:
    if max_clipped_fraction is not None and total and clipped / total > max_clipped_fraction:
        raise AudioError(path, "clipped", f"{clipped / total:.2%} of samples at full scale > "
                                          f"{max_clipped_fraction:.2%} allowed")


def _check_duration(path, samples: int, sample_rate: int, min_seconds: float) -> None:
    duration = samples / float(sample_rate)
    if duration < min_seconds:
        raise AudioError(path, "too_short", f"{duration:.3f} s < {min_seconds:g} s")


def _mono(data: np.ndarray) -> np.ndarray:
    # Mean over channels, like librosa.to_mono (for 1 channel this is exact).
    y = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
    return np.ascontiguousarray(y, dtype=np.float32)


def _resample(y: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    # soxr "HQ": a proper band-limited resampler (what librosa.load uses by default), so 8 kHz corpora are not
    # aliased. Called directly, with librosa.resample's length fix (ceil(n * ratio), zero-padded or cut), which
    # gives librosa's result bit for bit without importing librosa (seconds of a cold start).
    import soxr

    n_out = int(np.ceil(y.shape[0] * (float(target_sr) / orig_sr)))
    out = soxr.resample(y, orig_sr, target_sr, quality="soxr_hq")[:n_out]
    if out.shape[0] < n_out:
        out = np.pad(out, (0, n_out - out.shape[0]))
    return out.astype(np.float32, copy=False)


def load_audio(
    path, sample_rate: int = 16000, min_seconds: float = 0.0, *, max_clipped_fraction: float | None = None
) -> np.ndarray:
    """Decode ``path`` to a float32 mono signal at ``sample_rate``, values in [-1, 1].

    For a file already at ``sample_rate`` whose samples are integer PCM (FLAC,
    16-bit WAV, ...) the result equals
    ``librosa.load(path, sr=sample_rate, mono=True, dtype=np.float32)[0]``
    exactly (what the original implementation used).  Float files with samples
    outside [-1, 1] are clipped (the resampler can also overshoot slightly).
    A truncated file whose decoder stops cleanly at the cut (WAV, Ogg, MP3) gives
    the audio up to the cut; one whose decoder fails (FLAC) is ``unreadable``.

    ``max_clipped_fraction``: reject (reason ``clipped``) a file where more than this
    share of the decoded samples sits at full scale; None (default) = no check.

    Raises:
        AudioError: reason ``missing``, ``permission_denied``, ``not_audio``,
            ``unreadable``, ``empty``, ``non_finite``, ``silent``, ``clipped`` or
            ``too_short`` (shorter than ``min_seconds`` after resampling).
    """
    with open_audio(path) as fh:
        return decode(fh, path, sample_rate, min_seconds, max_clipped_fraction=max_clipped_fraction)


def decode(
    fh: sf.SoundFile, path, sample_rate: int = 16000, min_seconds: float = 0.0, *,
    max_clipped_fraction: float | None = None,
) -> np.ndarray:
    """:func:`load_audio` of a file already opened with :func:`open_audio` (``path`` names it in errors)."""
    try:
        data = fh.read(dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, ValueError) as exc:
        raise AudioError(path, "unreadable", f"{type(exc).__name__}: {exc}") from exc
    return _prepare(data, fh.samplerate, path, sample_rate, min_seconds, max_clipped_fraction)


def _prepare(data: np.ndarray, sr: int, path, sample_rate: int, min_seconds: float,
             max_clipped_fraction: float | None) -> np.ndarray:
    """Decoded float32 (samples, channels) at ``sr`` -> checked mono at ``sample_rate``: the one intake rule for
    files, encoded bytes and arrays alike."""
    if data.shape[0] == 0:
        raise AudioError(path, "empty")
    if not np.isfinite(data).all():
        raise AudioError(path, "non_finite")
    y = _mono(data)
    if not y.any():
        raise AudioError(path, "silent")
    if max_clipped_fraction is not None:
        _check_clipping(path, np.count_nonzero(np.abs(data) >= FULL_SCALE), data.size, max_clipped_fraction)
    del data

    if sr != sample_rate:
        y = _resample(y, sr, sample_rate)
    # PCM decodes are already within [-1, 1) so this is a no-op for them.
    np.clip(y, -1.0, 1.0, out=y)

    _check_duration(path, y.shape[0], sample_rate, min_seconds)
    return y


@dataclass(frozen=True)
class Audio:
    """Audio already in memory, for the places that otherwise take a file path.

    ``samples``: either decoded samples, a numpy array of shape ``(samples,)`` (mono) or ``(samples, channels)``
    (the layout ``soundfile.read`` returns), with ``sample_rate`` in Hz; or the encoded content of an audio file
    (``bytes``: WAV, FLAC, Ogg, MP3, ... whatever :data:`AUDIO_EXTENSIONS` lists), with ``sample_rate=None`` (the
    header says it). ``name`` is what errors call it (default ``<array>`` or ``<bytes>``).
    See :func:`load_signal` and :func:`load_bytes` for how each is turned into the model's input.
    """

    samples: object
    sample_rate: int | None = None
    name: str | None = None

    def load(self, sample_rate: int = 16000, min_seconds: float = 0.0, *,
             max_clipped_fraction: float | None = None) -> np.ndarray:
        """Float32 mono at ``sample_rate``, checked as files are (:func:`load_audio`)."""
        if isinstance(self.samples, (bytes, bytearray, memoryview)):
            if self.sample_rate is not None:
                raise AudioError(self.name or "<bytes>", "unreadable",
                                 "encoded bytes carry their own sample rate: give sample_rate=None")
            return load_bytes(self.samples, sample_rate, min_seconds, max_clipped_fraction=max_clipped_fraction,
                              name=self.name or "<bytes>")
        return load_signal(self.samples, self.sample_rate, sample_rate, min_seconds,
                           max_clipped_fraction=max_clipped_fraction, name=self.name or "<array>")


# libsndfile's limit; a 2-D array with more "channels" than this (or than samples) is almost surely
# (channels, samples): refused rather than averaged over the wrong axis.
MAX_CHANNELS = 1024


def _as_float_frames(samples, name) -> np.ndarray:
    """``(samples,)`` or ``(samples, channels)`` numbers -> float32 (samples, channels), integers scaled to [-1, 1)
    by their type's range as soundfile reads integer PCM (int16 / 32768, int32 / 2**31, uint8 (x - 128) / 128)."""
    data = np.asarray(samples)
    if data.dtype.kind not in "iuf":
        raise AudioError(name, "unreadable", f"expected an array of integer or float samples, got dtype "
                                             f"{data.dtype}")
    if data.ndim == 1:
        data = data[:, None]
    if data.ndim != 2 or (data.shape[0] and not 1 <= data.shape[1] <= min(MAX_CHANNELS, data.shape[0])):
        raise AudioError(name, "unreadable", f"array of shape {np.shape(samples)}: expected (samples,) or "
                                             "(samples, channels) like soundfile.read (transpose a (channels, "
                                             "samples) array)")
    if data.dtype.kind == "f":
        return data.astype(np.float32, copy=False)
    bits = 8 * data.dtype.itemsize
    offset = 2 ** (bits - 1) if data.dtype.kind == "u" else 0
    # Powers of two: the scaling is exact, so int16 input matches a 16-bit file's decode bit for bit.
    out = data.astype(np.float32) if not offset else (data.astype(np.float64) - offset).astype(np.float32)
    out *= np.float32(2.0 ** -(bits - 1))
    return out


def load_signal(samples, sr, sample_rate: int = 16000, min_seconds: float = 0.0, *,
                max_clipped_fraction: float | None = None, name: str = "<array>") -> np.ndarray:
    """:func:`load_audio` for samples already in memory at ``sr`` Hz (any rate: resampled as files are).

    ``samples``: ``(samples,)`` mono or ``(samples, channels)`` (soundfile's layout), mixed to mono by the mean
    over channels like a multi-channel file; float values as they are (a file's float samples), integers scaled by
    their type's range (int16 / 32768 ...). The same samples as a file therefore give the same signal, and the
    same checks apply with the same reasons (``empty``, ``non_finite``, ``silent``, ``clipped``, ``too_short``);
    a wrong shape, a non-numeric dtype or a bad ``sr`` is ``unreadable``. ``name`` is what errors call it.
    """
    if isinstance(sr, bool) or not isinstance(sr, (int, np.integer)) or sr <= 0:
        raise AudioError(name, "unreadable", f"sample rate must be a whole number of Hz > 0, got {sr!r}")
    return _prepare(_as_float_frames(samples, name), int(sr), name, sample_rate, min_seconds, max_clipped_fraction)


def load_bytes(data, sample_rate: int = 16000, min_seconds: float = 0.0, *,
               max_clipped_fraction: float | None = None, name: str = "<bytes>") -> np.ndarray:
    """:func:`load_audio` for the encoded content of an audio file (e.g. an upload). Reasons as for files:
    ``empty`` (no bytes), ``unreadable`` when ``name`` ends in an audio extension, else ``not_audio``, ..."""
    data = bytes(data)
    if not data:
        raise AudioError(name, "empty", "zero bytes")
    try:
        fh = sf.SoundFile(io.BytesIO(data))
    except (sf.SoundFileError, RuntimeError, OSError, ValueError, TypeError) as exc:
        reason = "unreadable" if Path(name).suffix.lower() in AUDIO_EXTENSIONS else "not_audio"
        raise AudioError(name, reason, f"{type(exc).__name__}: {exc}") from exc
    with fh:
        return decode(fh, name, sample_rate, min_seconds, max_clipped_fraction=max_clipped_fraction)


class ChunkedAudio:
    """A (long) file as float32 mono chunks at ``sample_rate``, never holding more than one chunk.

    Each ``iter(...)`` decodes the file again from the start and yields the same chunks (same samples as
    :func:`load_audio`; the soxr stream resampler gives exactly the one-shot result), so callers can make several
    passes.  A pass raises ``non_finite`` at the first bad block; after one complete pass, :meth:`validate` applies
    :func:`load_audio`'s remaining checks from statistics gathered on the way.

    Chunks hold about ``chunk_seconds`` of audio; their boundaries are identical in every pass.
    """

    def __init__(self, path, sample_rate: int = 16000, chunk_seconds: float = 60.0):
        if not chunk_seconds > 0:
            raise ValueError(f"chunk_seconds must be > 0, got {chunk_seconds}")
        self.path = path
        self.sample_rate = sample_rate
        self.chunk_seconds = chunk_seconds
        self.samples: int | None = None  # output samples, known after a complete pass
        self._stats: tuple[int, int, int, bool] | None = None  # (decoded values, clipped, frames, any nonzero)

    def __iter__(self) -> Iterator[np.ndarray]:
        import soxr

        with open_audio(self.path) as fh:
            sr = fh.samplerate
            block = max(1, int(round(self.chunk_seconds * sr)))
            stream = None if sr == self.sample_rate else soxr.ResampleStream(
                sr, self.sample_rate, 1, dtype="float32", quality="HQ")
            values = clipped = frames = produced = 0
            nonzero = False
            while True:
                try:
                    data = fh.read(block, dtype="float32", always_2d=True)
                except (sf.SoundFileError, RuntimeError, ValueError) as exc:
                    raise AudioError(self.path, "unreadable", f"{type(exc).__name__}: {exc}") from exc
                last = data.shape[0] < block
                if not np.isfinite(data).all():
                    raise AudioError(self.path, "non_finite")
                values += data.size
                clipped += np.count_nonzero(np.abs(data) >= FULL_SCALE)
                frames += data.shape[0]
                y = _mono(data)
                nonzero = nonzero or bool(y.any())
                if stream is not None:
                    y = stream.resample_chunk(y, last=last)
                    if last:
                        # librosa.resample's length: ceil(n * ratio), zero-padded or cut (fix_length).
                        want = math.ceil(frames * (self.sample_rate / sr)) - produced
                        y = y[:want] if y.shape[0] >= want else np.pad(y, (0, want - y.shape[0]))
                np.clip(y, -1.0, 1.0, out=y)
                produced += y.shape[0]
                if y.shape[0]:
                    yield y
                if last:
                    break
        self.samples = produced
        self._stats = (values, clipped, frames, nonzero)

    def validate(self, min_seconds: float = 0.0, max_clipped_fraction: float | None = None) -> int:
        """After one complete pass: :func:`load_audio`'s checks (``empty``, ``silent``, ``clipped``,
        ``too_short``); returns the number of output samples."""
        if self._stats is None:
            raise RuntimeError("ChunkedAudio.validate() needs one complete pass over the chunks first")
        values, clipped, frames, nonzero = self._stats
        if frames == 0:
            raise AudioError(self.path, "empty")
        if not nonzero:
            raise AudioError(self.path, "silent")
        _check_clipping(self.path, clipped, values, max_clipped_fraction)
        _check_duration(self.path, self.samples, self.sample_rate, min_seconds)
        return self.samples

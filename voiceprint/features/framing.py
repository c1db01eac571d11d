"""The framing convention every feature kind shares (25 ms window = 400 samples, 10 ms hop = 160 samples at
16 kHz, no centre padding, zero-padded tail, ``1 + ceil((N - 400) / 160)`` frames, 1 frame when ``N <= 400``), and
the streaming path's helpers that cut pieces of a signal into exactly those frames."""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

# At 16 kHz: 25 ms window, 10 ms hop. python_speech_features rounds half-up
# winlen*sr and winstep*sr; for 16 kHz these are exact.
FRAME_LEN = 400
FRAME_STEP = 160
NFFT = 512


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

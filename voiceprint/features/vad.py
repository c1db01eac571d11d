"""Voice activity detection: which samples get featurized (``vad``).

* ``original`` -- the original recipe's crude trim (:func:`trim_silence_original`), the default, so existing
  features stay identical.
* ``energy`` -- :func:`vad_energy`: 10 ms block energies against a noise floor and a speech level estimated per
  utterance, with hangover; removes inner silences too.

Each also has a streaming form for files read in chunks (:class:`_StreamedTrim`, :class:`_BlockEnergy` +
:func:`_energy_segments`), with the same result as on the whole signal.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from voiceprint.core import portable_math as pm
from voiceprint.features import kernels
from voiceprint.features.framing import _round_half_up

VAD_KINDS = ("original", "energy")



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
    if signal.dtype == np.float32 and signal.ndim == 1 and kernels._use_numba():
        contiguous = np.ascontiguousarray(signal)
        n = signal.shape[0]
        virtual = (n - 1) * np.true_divide(95, 100)  # np.percentile's float64 arithmetic
        lower = int(np.floor(virtual))
        finite, a_bits, b_bits = kernels._order_statistics(contiguous.view(np.uint32), lower)
        if finite:
            a, b = np.array([a_bits, b_bits], np.uint32).view(np.float32)
            gamma = float(virtual - lower)
            # np.percentile's interpolation, in float32 as it does it (a Python float weight keeps float32): the
            # threshold can round onto b, so it is not simply "louder than a".
            threshold = b - (b - a) * (1 - gamma) if gamma >= 0.5 else a + (b - a) * gamma
            first, last = kernels._loud_bounds(contiguous, threshold)
            return signal[first:last] if last > first else signal
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

"""Deterministic, offline generator of a multi-speaker, speech-like corpus.

Real corpora cannot be downloaded here, so the pipeline's default data source is
synthesised.  It is meant to be an *honest* stand-in for read speech recorded
over many different channels: a speaker is never identified by a label that a
trivial statistic can read off (a fixed tone, a fixed EQ, a fixed level), only
by physiology, and every recording has its own channel, so that the long-term
spectrum of an utterance says as much about the microphone and room as about
the talker.

Model of speech (source-filter)
-------------------------------
* Source.  A Rosenberg glottal-flow pulse train (its time derivative, which
  folds in lip radiation) driven by an f0 contour: speaker mean f0 and range,
  declination, pitch accents on stressed vowels, slow drift, cycle-to-cycle
  jitter (period) and shimmer (amplitude).  Open and speed quotients shape the
  pulse; an LF-style return-phase low-pass sets the source's spectral tilt;
  pitch-synchronous aspiration noise sets breathiness.
* Filter.  A cascade of eight two-pole formant resonators (Klatt style, unit
  gain at DC), a nasal pole/zero pair driven by velopharyngeal coupling, the
  oral antiresonance of nasal consonants and the piriform-fossa antiresonance
  (a speaker-specific dip at ~4-5 kHz).  Formant targets come from a vowel
  table (Peterson & Barney) and consonant loci, scaled by the speaker's
  vocal-tract length (0.8-1.25), per-formant anatomical offsets and per-vowel
  "accent" shifts.  Targets are smoothed across segments, which gives
  coarticulation and formant transitions.  Each utterance also varies the
  speaker's state a little (f0, rate, tilt, breathiness), as real sessions do.
* Phones.  Random syllables (onset, vowel or diphthong, optional coda) grouped
  into words and phrases with short pauses.  Fricatives are noise through a
  band-pass (plus voicing for voiced ones), stops are closure + burst
  (+ aspiration), nasals are murmur with antiresonances, approximants are
  voiced formant glides.  Speaking rate scales all durations.
* The time-varying filter is applied in the short-time Fourier domain (512-point
  frames, 8 ms hop, weighted overlap-add): per frame, the exact complex
  frequency response of the resonator cascade multiplies the excitation's
  spectrum.  This is the frame-wise equivalent of running
  ``scipy.signal.lfilter`` with coefficients updated every 8 ms, but vectorised.

Model of the channel (independent per utterance)
------------------------------------------------
Light reverberation (1-3 early reflections plus an exponentially decaying noise
tail, RT60 0.1-0.5 s, direct-to-reverberant ratio 3-15 dB), coloured background
noise (random spectral slope, white to brown), a random microphone/line EQ
(spectral tilt plus 1-3 peaking bands), random band limits (low cut 50-300 Hz,
high cut 3.4-8 kHz), an SNR of 10-30 dB as measured on the recording (speech
part vs noise, both after the EQ) and a random gain (peak -20..-1 dBFS).
Each file also has 0.1-0.4 s of leading and trailing silence (only background
noise), so silence trimming matters.  With ``channel=False`` all of this is
switched off (the silence then holds only a -60 dB noise floor and the peak is
fixed at -3 dBFS): the speech itself is unchanged, which makes it possible to
show that the channel is what hides the speaker from simple statistics.

Determinism
-----------
Every random draw comes from a ``numpy.random.Generator`` built from
``SeedSequence(seed, spawn_key=...)``: one per speaker (its traits) and one per
utterance (split into content, source-noise and channel streams), so the
output is byte-identical for the same arguments whatever ``workers`` is.

It is also byte-identical across x86-64 CPUs (AVX-512, AVX2 or neither): every
exp/log/sin/cos/power is :mod:`voiceprint.core.portable_math`'s (numpy's run SIMD
kernels that differ in the last bit from CPU to CPU), complex products are
rounded term by term (numpy fuses them with FMA where the CPU has it), and
nothing goes through BLAS.  What remains is code compiled once for all x86-64
CPUs (pocketfft, scipy.ndimage, numpy's random generators and basic
arithmetic); see docs/reproducibility.md.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.fft as sfft
import soundfile as sf
from scipy.ndimage import correlate1d

from voiceprint.core import portable_math as pm

__all__ = ["SAMPLE_RATE", "generate", "speaker_traits"]

SAMPLE_RATE = 16000

# --- short-time Fourier synthesis -------------------------------------------------
_NFFT = 512  # 32 ms frames: long enough to resolve formants of a low-pitched voice
_HOP = 128  # 8 ms control rate for all time-varying parameters (75 % overlap)
_FREQS = np.fft.rfftfreq(_NFFT, 1.0 / SAMPLE_RATE)
# Periodic Hann: its squares overlap-add to a constant at 75 % overlap.  The STFT
# path runs in float32 (twice as fast; far below 16-bit resolution anyway).
_WINDOW = (0.5 - 0.5 * pm.cos(2.0 * np.pi * np.arange(_NFFT) / _NFFT)).astype(np.float32)

# Distinct first words of the spawn keys keep the speaker and utterance streams
# apart (SeedSequence pads short keys with zeros, so lengths alone would not).
_SPEAKER_STREAM = 0
_UTTERANCE_STREAM = 1

# --- phone inventory -------------------------------------------------------------
# F1-F3 (Hz) of a reference adult vocal tract: Peterson & Barney (1952), men.
_VOWELS = {
    "iy": (270, 2290, 3010),
    "ih": (390, 1990, 2550),
    "eh": (530, 1840, 2480),
    "ae": (660, 1720, 2410),
    "ah": (520, 1190, 2390),
    "aa": (730, 1090, 2440),
    "ao": (570, 840, 2410),
    "uh": (440, 1020, 2240),
    "uw": (300, 870, 2240),
    "er": (490, 1350, 1690),
}
_VOWEL_NAMES = tuple(_VOWELS)
_DIPHTHONGS = {
    "ay": ("aa", "iy"), "aw": ("aa", "uw"), "ey": ("eh", "iy"), "ow": ("ao", "uw"), "oy": ("ao", "iy"),
}
# F4 and up: little phonetic, much anatomical information.  F6-F8 are there
# because a cascade truncated at F5 loses 20-40 dB at 3-8 kHz (Klatt's
# "higher-pole correction"); a real tract keeps resonating up to the Nyquist.
_HIGHER_FORMANTS = (3500.0, 4500.0, 5500.0, 6500.0, 7500.0)
_BANDWIDTHS = np.array([80.0, 90.0, 120.0, 200.0, 280.0, 350.0, 400.0, 450.0])

# Formant loci of consonant places of articulation (where transitions point to).
_LOCI = {
    "labial": (250, 900, 2200),
    "dental": (280, 1450, 2600),
    "alveolar": (260, 1700, 2600),
    "postalveolar": (260, 1950, 2500),
    "velar": (260, 2000, 2300),
}
# Fricatives: place, voiced, noise band centre (Hz), band-pass Q, amplitude.
_FRICATIVES = {
    "f": ("labial", False, 4500, 0.4, 0.25),
    "th": ("dental", False, 5000, 0.4, 0.2),
    "s": ("alveolar", False, 5800, 1.6, 1.0),
    "sh": ("postalveolar", False, 3000, 1.2, 1.0),
    "v": ("labial", True, 4500, 0.4, 0.15),
    "dh": ("dental", True, 5000, 0.4, 0.12),
    "z": ("alveolar", True, 5800, 1.6, 0.5),
    "zh": ("postalveolar", True, 3000, 1.2, 0.5),
}
# Stops: place, voiced, burst centre (Hz), burst Q.
_STOPS = {
    "p": ("labial", False, 900, 0.35),
    "t": ("alveolar", False, 4500, 0.8),
    "k": ("velar", False, 2200, 1.3),
    "b": ("labial", True, 900, 0.35),
    "d": ("alveolar", True, 4500, 0.8),
    "g": ("velar", True, 2200, 1.3),
}
# Nasals: place, frequency of the oral-cavity antiresonance (Hz).
_NASALS = {"m": ("labial", 1100), "n": ("alveolar", 1700), "ng": ("velar", 2600)}
# Approximants: F1-F3 targets (Hz).
_APPROXIMANTS = {
    "l": (360, 1300, 2700), "r": (420, 1250, 1650), "w": (300, 650, 2200), "y": (280, 2200, 3000),
}

_ONSETS = tuple(_FRICATIVES) + tuple(_STOPS) + ("m", "n") + tuple(_APPROXIMANTS) + ("h",)
_CODAS = tuple(_FRICATIVES) + tuple(_STOPS) + tuple(_NASALS) + ("l", "r")

# Relative loudness of the noise excitation paths (the voiced path has unit RMS),
# set by measurement so that, relative to a vowel, /s/ and /sh/ are ~12 dB down,
# nasals ~10, /f/ and /h/ ~18-20, and stop bursts peak 5-15 dB down: roughly the
# level differences of real speech, so no phone class dominates the features.
_FRIC_GAIN = 1.0
_ASP_GAIN = 0.5


# =================================================================================
# Speakers
# =================================================================================
def speaker_traits(seed: int, speaker_index: int) -> dict:
    """Physiological parameters of one speaker (deterministic in seed and index).

    Keys: ``sex`` ('f'/'m', only to correlate the traits realistically),
    ``vtl_scale`` (formant scale factor, ~0.8-1.25; >1 means a shorter vocal tract),
    ``formant_offsets`` (F1-F5 multipliers from individual anatomy; F6-F8 follow F5),
    ``vowel_shifts`` (vowel -> (F1, F2) multipliers: accent/idiolect),
    ``bandwidth_scale``, ``f0_mean_hz`` (80-260), ``f0_range_semitones``,
    ``jitter`` and ``shimmer`` (relative cycle-to-cycle perturbations),
    ``open_quotient`` and ``speed_quotient`` (Rosenberg pulse shape),
    ``source_tilt_hz`` (corner of the glottal return-phase low-pass: lower is a
    steeper, laxer source), ``breathiness`` (aspiration-to-voicing ratio),
    ``speaking_rate`` (1 = reference), ``nasality`` (velopharyngeal coupling on
    vowels, 0-0.6), ``nasal_pole_hz`` and ``nasal_zero_hz`` (Klatt's nasal
    pole/zero pair: the zero moves from the pole towards ``nasal_zero_hz`` as the
    coupling goes from 0 to 1), ``piriform_zero_hz``/``piriform_bandwidth_hz``
    (hypopharyngeal antiresonance) and ``fricative_scale`` (front-cavity size).
    """
    rng = np.random.default_rng(
        np.random.SeedSequence(_check_seed(seed), spawn_key=(_SPEAKER_STREAM, int(speaker_index)))
    )
    female = bool(rng.random() < 0.5)
    # Vocal-tract length and f0 are correlated through body size and sex;
    # within each sex they still vary independently.
    vtl_scale = float(np.clip(rng.normal(1.10 if female else 0.90, 0.055), 0.80, 1.25))
    f0_mean = float(np.clip(pm.exp(rng.normal(pm.log(200.0 if female else 115.0), 0.17)), 80.0, 260.0))
    formant_offsets = pm.exp(rng.normal(0.0, [0.05, 0.05, 0.06, 0.07, 0.07]))
    vowel_shifts = pm.exp(rng.normal(0.0, 0.07, size=(len(_VOWEL_NAMES), 2)))
    nasal_pole = float(rng.uniform(230.0, 320.0))
    return {
        "speaker_index": int(speaker_index),
        "sex": "f" if female else "m",
        "vtl_scale": vtl_scale,
        "formant_offsets": [float(x) for x in formant_offsets],
        "vowel_shifts": {v: (float(a), float(b)) for v, (a, b) in zip(_VOWEL_NAMES, vowel_shifts)},
        "bandwidth_scale": float(rng.uniform(0.75, 1.4)),
        "f0_mean_hz": f0_mean,
        "f0_range_semitones": float(rng.uniform(2.0, 8.0)),
        "jitter": float(rng.uniform(0.004, 0.02)),
        "shimmer": float(rng.uniform(0.02, 0.08)),
        "open_quotient": float(rng.uniform(0.4, 0.7)),
        "speed_quotient": float(rng.uniform(2.0, 4.0)),
        "source_tilt_hz": float(pm.exp(rng.uniform(pm.log(1500.0), pm.log(6000.0)))),
        "breathiness": float(rng.uniform(0.02, 0.35)),
        "speaking_rate": float(rng.uniform(0.75, 1.35)),
        "nasality": float(rng.uniform(0.0, 0.6)),
        # Spectral features fixed by anatomy, stable across phones and hence
        # channel-robust speaker cues: the nasal branch's resonance and where its
        # zero moves when the velum opens, and the antiresonance of the piriform
        # fossae (a dip at ~4-5 kHz in all voiced sounds).
        "nasal_pole_hz": nasal_pole,
        "nasal_zero_hz": nasal_pole + float(rng.uniform(250.0, 600.0)),
        "piriform_zero_hz": float(4500.0 * math.sqrt(vtl_scale) * pm.exp(rng.normal(0.0, 0.08))),
        "piriform_bandwidth_hz": float(rng.uniform(300.0, 700.0)),
        "fricative_scale": float(pm.exp(rng.normal(0.0, 0.06))),
    }


# =================================================================================
# Utterance content: a sequence of segments with formant/excitation targets
# =================================================================================
# Columns of the per-segment parameter table (one row per segment):
# frames: duration in control frames; f1-f3: formant targets (Hz); voice, asp,
# fric: amplitudes of the three excitations; fric_fc, fric_q: frication band;
# nasal: velopharyngeal coupling 0-1; zero_hz, zero_on: oral antiresonance of a
# nasal consonant; accent: pitch-accent height (x the speaker's f0 range).
_COLS = (
    "frames", "f1", "f2", "f3", "voice", "asp", "fric", "fric_fc", "fric_q", "nasal", "zero_hz", "zero_on", "accent",
)
_C = {name: i for i, name in enumerate(_COLS)}


def _segment(frames, formants, **kw) -> list:
    row = [0.0] * len(_COLS)
    row[_C["frames"]] = max(1, int(round(frames)))
    row[_C["f1"]], row[_C["f2"]], row[_C["f3"]] = formants
    row[_C["fric_fc"]], row[_C["fric_q"]], row[_C["zero_hz"]] = 4000.0, 1.0, 1000.0
    for k, v in kw.items():
        row[_C[k]] = v
    return row


def _plan_segments(rng: np.random.Generator, n_frames: int, traits: dict, rate: float) -> np.ndarray:
    """Random phone sequence covering at least ``n_frames`` control frames."""
    fps = SAMPLE_RATE / _HOP  # control frames per second

    def dur(ms):  # durations shrink with speaking rate and vary a little per token
        return ms / 1000.0 * fps / rate * float(pm.exp(rng.normal(0.0, 0.15)))

    def vowel_formants(v):
        f1, f2, f3 = _VOWELS[v]
        s1, s2 = traits["vowel_shifts"][v]
        return (f1 * s1, f2 * s2, f3)

    nasality = traits["nasality"]
    segs: list[list] = []
    total = 0
    while total < n_frames:
        start = len(segs)
        # one word of 1-3 syllables, one of them stressed (longer, louder, pitch accent)
        n_syl = int(rng.choice([1, 2, 3], p=[0.45, 0.4, 0.15]))
        stressed = int(rng.integers(n_syl))
        for syl in range(n_syl):
            if rng.random() < 0.8:
                segs += _consonant(rng, str(rng.choice(_ONSETS)), dur, onset=True)
            stress = syl == stressed
            amp = 1.25 if stress else 0.9
            accent = rng.uniform(0.5, 1.2) if stress else 0.0  # pitch-accent height (x f0 range)
            ms = rng.uniform(110, 190) if stress else rng.uniform(60, 120)
            if rng.random() < 0.15:  # diphthong: two targets, the smoothing makes the glide
                a, b = _DIPHTHONGS[str(rng.choice(list(_DIPHTHONGS)))]
                for v in (a, b):
                    segs.append(_segment(dur(ms * 0.7), vowel_formants(v), voice=amp, nasal=nasality,
                                         accent=accent))
            else:
                v = str(rng.choice(_VOWEL_NAMES))
                segs.append(_segment(dur(ms), vowel_formants(v), voice=amp, nasal=nasality, accent=accent))
            if rng.random() < 0.45:
                segs += _consonant(rng, str(rng.choice(_CODAS)), dur, onset=False)
        if rng.random() < 0.25:  # pause between words / phrases
            segs.append(_segment(dur(rng.uniform(80, 250)), (500, 1500, 2500)))
        total += sum(s[0] for s in segs[start:])
    return np.array(segs, dtype=np.float64)


def _consonant(rng, c: str, dur, onset: bool) -> list:
    if c in _FRICATIVES:
        place, voiced, fc, q, amp = _FRICATIVES[c]
        return [_segment(dur(rng.uniform(70, 120)), _LOCI[place], voice=0.35 if voiced else 0.0,
                         fric=amp, fric_fc=fc, fric_q=q)]
    if c in _STOPS:
        place, voiced, fc, q = _STOPS[c]
        closure = list(_LOCI[place])
        closure[0] = 180.0  # closed tract: F1 falls; voiced stops keep a weak voice bar
        segs = [_segment(dur(rng.uniform(40, 80)), closure, voice=0.06 if voiced else 0.0),
                _segment(1, _LOCI[place], fric=1.5 if voiced else 2.5, fric_fc=fc, fric_q=q)]
        if not voiced and onset:  # aspiration: noise through the vocal tract
            segs.append(_segment(dur(rng.uniform(25, 55)), _LOCI[place], asp=0.5))
        return segs
    if c in _NASALS:
        place, zero = _NASALS[c]
        f = list(_LOCI[place])
        f[0] = 280.0
        return [_segment(dur(rng.uniform(50, 80)), f, voice=0.4, nasal=1.0, zero_hz=zero, zero_on=1.0)]
    if c in _APPROXIMANTS:
        return [_segment(dur(rng.uniform(45, 75)), _APPROXIMANTS[c], voice=0.6)]
    if c == "h":
        return [_segment(dur(rng.uniform(40, 70)), (500, 1500, 2500), asp=0.5)]
    raise ValueError(f"unknown phone {c!r}")


# =================================================================================
# Speech synthesis
# =================================================================================
def _white(rng: np.random.Generator, n: int) -> np.ndarray:
    """Unit-variance white noise.  Uniform rather than Gaussian: 3x cheaper, and
    after any filtering (formants, band-pass, STFT) it is Gaussian to the ear and
    to every spectral feature."""
    return (rng.random(n, dtype=np.float32) - np.float32(0.5)) * np.float32(math.sqrt(12.0))


def _frames_to_samples(track: np.ndarray, n: int) -> np.ndarray:
    """Linear interpolation of a control track (one value per hop) to samples."""
    return np.interp(np.arange(n, dtype=np.float64), np.arange(track.size) * _HOP, track)


def _glottal_source(rng, f0_s: np.ndarray, traits: dict) -> tuple[np.ndarray, np.ndarray]:
    """Rosenberg glottal-flow derivative with jitter and shimmer, and the flow itself."""
    n = f0_s.size
    # Jitter is a per-cycle perturbation of the period: find the cycle each sample
    # belongs to on the unperturbed phase, then integrate the perturbed frequency.
    phase0 = np.cumsum(f0_s) / SAMPLE_RATE
    n_cycles = int(phase0[-1] * 1.2) + 8
    jit = 1.0 + traits["jitter"] * np.clip(rng.standard_normal(n_cycles), -3, 3)
    phase = np.cumsum(f0_s * jit[np.minimum(phase0.astype(np.int64), n_cycles - 1)]) / SAMPLE_RATE
    cycle = np.minimum(phase.astype(np.int64), n_cycles - 1)
    frac = phase - np.floor(phase)
    oq, sq = traits["open_quotient"], traits["speed_quotient"]
    tp = oq * sq / (1.0 + sq)  # opening phase (fraction of the period)
    tn = oq - tp  # closing phase
    opening = frac < tp
    closing = (~opening) & (frac < oq)
    flow = np.zeros(n)
    dflow = np.zeros(n)
    flow[opening] = 0.5 * (1.0 - pm.cos(np.pi * frac[opening] / tp))
    dflow[opening] = 0.5 * np.pi / tp * pm.sin(np.pi * frac[opening] / tp)
    x = (frac[closing] - tp) / tn
    flow[closing] = pm.cos(0.5 * np.pi * x)
    dflow[closing] = -0.5 * np.pi / tn * pm.sin(0.5 * np.pi * x)
    shimmer = np.clip(1.0 + traits["shimmer"] * rng.standard_normal(n_cycles), 0.3, None)
    dflow *= shimmer[cycle]
    return dflow / (np.sqrt(np.mean(dflow**2)) + 1e-12), flow


def _radius(bandwidth_hz):
    """Pole/zero radius of a resonance of the given -3 dB bandwidth."""
    return pm.exp(-np.pi * np.asarray(bandwidth_hz) / SAMPLE_RATE)


def _biquads(freqs: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Per-frame coefficients [1, a1, a2] of 2-pole sections, normalised to unit gain at DC.

    ``freqs`` (Hz) and radii ``r``: (frames, k) -> (frames, k, 3), divided by the
    DC gain so that a resonator (used as denominator) or an antiresonance (used
    as numerator) leaves 0 Hz untouched, as in Klatt's cascade synthesiser.
    Radius 0 gives the identity section [1, 0, 0], so scaling a radius by a
    0..1 weight fades a resonance in and out smoothly.
    """
    coeffs = np.stack([np.ones_like(r), -2.0 * r * pm.cos(2.0 * np.pi * freqs / SAMPLE_RATE), r * r], axis=-1)
    return coeffs / coeffs.sum(axis=-1, keepdims=True)


def _poly_product(sections: np.ndarray) -> np.ndarray:
    """Multiply per-frame polynomials in z^-1: (frames, k, 3) -> (frames, 2k + 1)."""
    out = sections[:, 0, :]
    for k in range(1, sections.shape[1]):  # a handful of sections, each a vectorised convolution
        nxt = np.zeros((out.shape[0], out.shape[1] + 2))
        for j in range(3):
            nxt[:, j : j + out.shape[1]] += out * sections[:, k, j, None]
        out = nxt
    return out


def _frequency_response(zeros: np.ndarray, poles: np.ndarray) -> np.ndarray:
    """Complex response on the STFT bins of the per-frame IIR filter B(z)/A(z).

    The response of a filter on the unit circle is the ratio of the DFTs of its
    coefficient vectors, so one short FFT per frame replaces per-sample filtering.
    """
    num = np.fft.rfft(_poly_product(zeros), n=_NFFT, axis=1)
    den = np.fft.rfft(_poly_product(poles), n=_NFFT, axis=1)
    return _divide(num, den).astype(np.complex64)


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den for complex arrays, one rounded real operation at a time (numpy's complex division may
    fuse them, depending on the CPU).  The denominators here are filter responses, far from 0 and overflow."""
    return pm.complex_multiply(num, np.conj(den)) / (den.real * den.real + den.imag * den.imag)


def _gaussian_filter1d(x: np.ndarray, sigma: float, mode: str = "reflect") -> np.ndarray:
    """scipy.ndimage.gaussian_filter1d (truncated at 4 sigma), with a kernel from portable exp (scipy's
    comes from numpy's, whose last bit depends on the CPU)."""
    radius = int(4.0 * sigma + 0.5)
    k = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = pm.exp(-0.5 / (sigma * sigma) * (k * k))
    weights /= weights.sum()
    return correlate1d(x, weights, mode=mode)


def _stft(x: np.ndarray, n_frames: int) -> np.ndarray:
    """Frames centred on samples 0, HOP, 2*HOP, ... (zero padded at both ends)."""
    xp = np.zeros((n_frames - 1) * _HOP + _NFFT, dtype=np.float32)
    xp[_NFFT // 2 : _NFFT // 2 + x.size] = x
    frames = np.lib.stride_tricks.sliding_window_view(xp, _NFFT)[::_HOP][:n_frames]
    return sfft.rfft(frames * _WINDOW, axis=1)


def _istft(spec: np.ndarray, n: int) -> np.ndarray:
    """Weighted overlap-add inverse of :func:`_stft` (exact for an unmodified spectrum)."""
    n_frames = spec.shape[0]
    frames = sfft.irfft(spec, n=_NFFT, axis=1) * _WINDOW
    out = np.zeros((n_frames + 3) * _HOP)
    norm = np.zeros_like(out)
    w2 = _WINDOW**2
    for q in range(_NFFT // _HOP):  # HOP = NFFT/4: add each quarter of all frames at once
        out[q * _HOP : (q + n_frames) * _HOP] += frames[:, q * _HOP : (q + 1) * _HOP].ravel()
        norm[q * _HOP : (q + n_frames) * _HOP] += np.tile(w2[q * _HOP : (q + 1) * _HOP], n_frames)
    out = out[_NFFT // 2 : _NFFT // 2 + n]
    return out / np.maximum(norm[_NFFT // 2 : _NFFT // 2 + n], 1e-3)


def _synthesise_speech(traits: dict, content_rng, noise_rng, n: int) -> np.ndarray:
    """``n`` samples of speech (unit RMS over voiced/active regions, no silence padding)."""
    # Per-utterance state of the speaker (mood, effort, rate): real within-speaker
    # variability on top of the channel.
    rate = traits["speaking_rate"] * float(pm.exp(content_rng.normal(0.0, 0.06)))
    f0_mean = traits["f0_mean_hz"] * float(pm.exp2(content_rng.normal(0.0, 1.5) / 12.0))
    f0_range = traits["f0_range_semitones"] * float(pm.exp(content_rng.normal(0.0, 0.25)))
    tilt_hz = traits["source_tilt_hz"] * float(pm.exp2(content_rng.normal(0.0, 0.35)))
    breathiness = traits["breathiness"] * float(pm.exp(content_rng.normal(0.0, 0.3)))

    # Frames centred on 0, HOP, ... past the end, so every sample gets full overlap-add.
    n_frames = (n - 1) // _HOP + 4
    segs = _plan_segments(content_rng, n_frames, traits, rate)
    reps = segs[:, _C["frames"]].astype(np.int64)
    track = {name: np.repeat(segs[:, _C[name]], reps)[:n_frames] for name in _COLS[1:]}

    # Coarticulation: formants move smoothly between targets (log-frequency
    # smoothing over ~20 ms); excitation amplitudes change faster (~5 ms).
    sigma_f = 0.020 * SAMPLE_RATE / _HOP / rate
    offsets = np.asarray(traits["formant_offsets"])
    scale = traits["vtl_scale"] * np.concatenate([offsets, np.full(3, offsets[-1])])
    formants = np.empty((n_frames, 8))
    for k, name in enumerate(("f1", "f2", "f3")):
        formants[:, k] = pm.exp(_gaussian_filter1d(pm.log(track[name]), sigma_f, mode="nearest"))
    formants[:, 3:] = _HIGHER_FORMANTS
    formants *= scale
    # Resonances at or above ~Nyquist are left out (radius 0, below).
    in_band = formants < 0.47 * SAMPLE_RATE
    amp = {name: _gaussian_filter1d(track[name], 0.6, mode="nearest") for name in ("voice", "asp", "fric")}
    nasal = np.clip(_gaussian_filter1d(track["nasal"], sigma_f, mode="nearest"), 0.0, 1.0)

    # Intonation: declination + pitch accents on stressed vowels + slow drift.
    t = np.arange(n_frames) / n_frames
    st = f0_range * (0.3 - 0.6 * t)
    st += f0_range * _gaussian_filter1d(track["accent"], 5.0, mode="nearest")
    st += _gaussian_filter1d(content_rng.standard_normal(n_frames), 12.0) * 3.0
    f0 = np.clip(f0_mean * pm.exp2(st / 12.0), 55.0, 450.0)

    # Excitation of the vocal tract: voiced pulses + pitch-synchronous breath noise
    # + aspiration (h, stop release).  Frication is a separate noise path that
    # bypasses the formant cascade (it is generated in front of the constriction).
    dflow, flow = _glottal_source(noise_rng, _frames_to_samples(f0, n), traits)
    breath = np.diff(_white(noise_rng, n + 1)) / math.sqrt(2.0) * (0.3 + 0.7 * flow)
    voiced = dflow + breathiness * 2.0 * breath
    e_tract = _frames_to_samples(amp["voice"], n) * voiced
    e_tract += _frames_to_samples(amp["asp"], n) * _ASP_GAIN * _white(noise_rng, n)
    e_fric = _frames_to_samples(amp["fric"], n) * _FRIC_GAIN * _white(noise_rng, n)

    # Vocal tract per frame: 8 formants; the piriform-fossa antiresonance; Klatt's
    # nasal pole/zero pair (they cancel while the velum is closed, the zero moves
    # up with the coupling, giving the low-frequency peak + dip of nasalisation);
    # and the antiresonance of the closed oral cavity during nasal consonants.
    bws = np.broadcast_to(_BANDWIDTHS * traits["bandwidth_scale"], formants.shape).copy()
    bws[:, 0] *= 1.0 + nasal  # nasal coupling damps F1
    ones = np.ones(n_frames)
    fnp, fnz = traits["nasal_pole_hz"], traits["nasal_zero_hz"]
    poles = _biquads(np.column_stack([formants, fnp * ones]),
                     np.column_stack([_radius(bws) * in_band, _radius(100.0) * ones]))
    zeros = _biquads(
        np.column_stack([fnp + nasal * (fnz - fnp), track["zero_hz"] * traits["vtl_scale"],
                         traits["piriform_zero_hz"] * ones]),
        np.column_stack([_radius(100.0) * ones, track["zero_on"] * _radius(150.0),
                         _radius(traits["piriform_bandwidth_hz"]) * ones]))
    tract = _frequency_response(zeros, poles)
    # Source spectral tilt: LF-model return phase = first-order low-pass.
    w = _FREQS / tilt_hz  # 1 / (1 + i w) = (1 - i w) / (1 + w^2)
    tilt = np.empty(w.shape, np.complex64)
    tilt.real, tilt.imag = 1.0 / (1.0 + w * w), -w / (1.0 + w * w)
    tract = pm.complex_multiply(tract, tilt)

    # Frication: band-pass noise (peak gain 1) centred on the constriction's
    # resonance; two 2-pole sections give the steep low-frequency skirt of sibilants.
    fc = (track["fric_fc"] * traits["fricative_scale"] * float(pm.power(traits["vtl_scale"], 0.7))).astype(np.float32)
    q = track["fric_q"].astype(np.float32)
    f = np.maximum(_FREQS, 1.0).astype(np.float32)
    fric_filter = 1.0 / (1.0 + (q[:, None] * (f / fc[:, None] - fc[:, None] / f)) ** 2)

    spec = (pm.complex_multiply(_stft(e_tract, n_frames), tract)
            + pm.complex_multiply(_stft(e_fric, n_frames), fric_filter))
    speech = _istft(spec, n)
    # 15 ms raised-cosine fades: the phone sequence is cut to length, so avoid clicks.
    fade = min(int(0.015 * SAMPLE_RATE), n // 4)
    ramp = 0.5 - 0.5 * pm.cos(np.pi * np.arange(fade) / fade)
    speech[:fade] *= ramp
    speech[n - fade :] *= ramp[::-1]
    active = np.abs(speech) > 0.05 * np.abs(speech).max()
    return speech / (np.sqrt(np.mean(speech[active] ** 2)) + 1e-12)


# =================================================================================
# Channel
# =================================================================================
def _apply_channel(x: np.ndarray, n_speech: int, rng: np.random.Generator) -> np.ndarray:
    """Reverb + background noise + EQ + band limits of one random recording channel.

    ``x`` is the padded clean utterance, ``n_speech`` the number of its samples
    that are speech (the SNR refers to those).  Everything linear is applied in
    one FFT of the whole utterance (zero-padded, so the reverb does not wrap).
    """
    n = x.size
    # Room: direct path plus exponentially decaying noise tail (light reverb).
    rt60 = rng.uniform(0.1, 0.5)
    ir_len = int(rt60 * SAMPLE_RATE)
    t = np.arange(ir_len) / SAMPLE_RATE
    tail = _white(rng, ir_len) * pm.exp(-6.91 * t / rt60)
    tail[: int(0.002 * SAMPLE_RATE)] = 0.0  # a couple of ms before the first reflections
    drr_db = rng.uniform(3.0, 15.0)  # direct-to-reverberant energy ratio (the wet mix)
    tail *= math.sqrt(float(pm.power(10.0, -drr_db / 10.0)) / np.sum(tail**2))
    ir = tail
    ir[0] = 1.0
    # Early reflections (desk, nearby walls): discrete echoes a few ms after the
    # direct sound, which comb-filter the spectrum as real rooms do.
    for _ in range(int(rng.integers(1, 4))):
        ir[int(rng.uniform(0.001, 0.008) * SAMPLE_RATE)] += rng.uniform(0.1, 0.6) * rng.choice([-1.0, 1.0])

    nfft = _next_fast_len(n + ir_len)
    freqs = np.fft.rfftfreq(nfft, 1.0 / SAMPLE_RATE)
    f = np.maximum(freqs, 1.0)
    speech = pm.complex_multiply(sfft.rfft(x, nfft), sfft.rfft(ir, nfft))

    # Background noise, coloured by a random spectral slope (white .. brown),
    # generated straight in the frequency domain (stationary over the file).
    slope_db_oct = rng.uniform(-6.0, 0.0)
    shape = pm.power(np.maximum(f, 50.0) / 1000.0, slope_db_oct / 6.02)  # amplitude ~ f^a is 6.02a dB/oct
    noise = pm.complex_multiply(_white(rng, 2 * freqs.size).astype(np.float64).view(np.complex128), shape)
    snr_db = rng.uniform(10.0, 30.0)

    # Microphone / line: tilt, 1-3 peaking bands (log-Gaussian bumps), band limits.
    octaves = pm.log2(f / 1000.0)
    gain_db = rng.uniform(-4.0, 4.0) * octaves
    for _ in range(int(rng.integers(1, 4))):
        centre = rng.uniform(float(pm.log2(0.15)), float(pm.log2(6.0)))  # octaves re 1 kHz
        width_oct = rng.uniform(0.2, 1.5)
        gain_db += rng.uniform(-12.0, 12.0) * pm.exp(-0.5 * ((octaves - centre) / width_oct) ** 2)
    low_cut = float(pm.exp(rng.uniform(pm.log(50.0), pm.log(300.0))))
    high_cut = rng.uniform(3400.0, 8000.0)
    response = pm.power(10.0, gain_db / 20.0)
    response /= np.sqrt(1.0 + np.square(np.square(low_cut / f)))  # 2nd-order high-pass
    if high_cut < 7900.0:
        r2 = np.square(f / high_cut)
        r8 = np.square(np.square(r2))
        response /= np.sqrt(1.0 + r8 * r8)  # 8th-order low-pass: (f / high_cut)^16 by exact squarings
    response[0] = 0.0  # no DC
    speech = pm.complex_multiply(speech, response)
    noise = pm.complex_multiply(noise, response)

    # SNR as it would be measured on the recording: speech power over the speech
    # part vs noise power, both after the microphone (Parseval on the spectra).
    p_speech = np.sum(_power(speech)) / n_speech
    p_noise = np.sum(_power(noise)) / nfft
    speech += pm.complex_multiply(noise, math.sqrt(p_speech / p_noise * float(pm.power(10.0, -snr_db / 10.0))))
    return sfft.irfft(speech, nfft)[:n]


def _power(z: np.ndarray) -> np.ndarray:
    """|z|^2 (numpy's complex abs differs in the last bit between CPUs)."""
    return z.real * z.real + z.imag * z.imag


def _next_fast_len(n: int) -> int:
    return sfft.next_fast_len(n, real=True)


# =================================================================================
# One utterance -> one FLAC file
# =================================================================================
def _utterance_audio(seed: int, spk: int, utt: int, min_s: float, max_s: float, channel: bool) -> np.ndarray:
    traits = speaker_traits(seed, spk)
    ss = np.random.SeedSequence(seed, spawn_key=(_UTTERANCE_STREAM, spk, utt))
    # Separate streams so switching the channel off leaves the speech untouched.
    content_rng, noise_rng, channel_rng = (np.random.default_rng(s) for s in ss.spawn(3))

    lo, hi = math.ceil(min_s * SAMPLE_RATE), math.floor(max_s * SAMPLE_RATE)
    n_total = int(np.clip(round(content_rng.uniform(min_s, max_s) * SAMPLE_RATE), lo, hi))
    pads = content_rng.uniform(0.1, 0.4, size=2) * SAMPLE_RATE
    pads *= min(1.0, 0.4 * n_total / pads.sum())  # silence never takes more than 40 %
    lead, trail = (int(p) for p in pads)
    n_speech = n_total - lead - trail

    x = np.zeros(n_total)
    x[lead : lead + n_speech] = _synthesise_speech(traits, content_rng, noise_rng, n_speech)
    if channel:
        y = _apply_channel(x, n_speech, channel_rng)
        peak_dbfs = channel_rng.uniform(-20.0, -1.0)
    else:
        y = x + _white(noise_rng, n_total) * 1e-3  # -60 dB noise floor
        peak_dbfs = -3.0
    y *= float(pm.power(10.0, peak_dbfs / 20.0)) / np.abs(y).max()
    return np.clip(y, -1.0, 32767.0 / 32768.0)


def _make_utterance(job: tuple) -> dict:
    out_dir, seed, spk, utt, min_s, max_s, channel = job
    y = _utterance_audio(seed, spk, utt, min_s, max_s, channel)
    speaker = _speaker_name(spk)
    utterance = f"{speaker}-{utt:04d}"
    rel = f"{speaker}/{utterance}.flac"
    final = Path(out_dir) / rel
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        # FLAC level 0 (libsndfile's compression_level 0.0): fixed integer predictors only.  From level 3 up,
        # libFLAC fits LPC predictors in floating point with CPU-dispatched code (an FMA kernel where the CPU
        # has FMA), so the same samples could be encoded to different bytes; level 0 costs ~9 % in size.
        sf.write(tmp, y, SAMPLE_RATE, format="FLAC", subtype="PCM_16", compression_level=0.0)
        os.replace(tmp, final)  # readers never see a half-written file
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": rel, "speaker": speaker, "utterance": utterance,
            "duration": y.size / SAMPLE_RATE, "sample_rate": SAMPLE_RATE}


def _speaker_name(idx: int) -> str:
    return f"spk{idx:04d}"


def _worker_init() -> None:
    # One process per core: keep BLAS/OpenMP pools from oversubscribing the CPU.
    # The variables cover libraries loaded from now on; threadpoolctl (when
    # installed) those already loaded, e.g. numpy's BLAS inherited through fork.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass


# =================================================================================
# Public entry point
# =================================================================================
def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def generate(
    out_dir: str | Path,
    *,
    num_speakers: int,
    utterances_per_speaker: int,
    min_seconds: float,
    max_seconds: float,
    seed: int,
    workers: int = 1,
    progress: bool = False,
    channel: bool = True,
) -> pd.DataFrame:
    """Write ``<out_dir>/<speaker>/<speaker>-<utt:04d>.flac`` and return the manifest.

    Files are 16 kHz mono PCM_16 FLAC.  Each file's total duration (speech plus
    its 0.1-0.4 s of leading and trailing silence) lies in
    ``[min_seconds, max_seconds]``; the padding is included, not added on top
    (it is shrunk to at most 40 % of the file for very short files).

    The manifest has one row per utterance, sorted by speaker then utterance,
    with columns ``path`` (str, relative to ``out_dir``, posix), ``speaker``
    (e.g. ``'spk0007'``), ``utterance`` (e.g. ``'spk0007-0003'``),
    ``duration`` (float seconds of the written file) and ``sample_rate`` (int).

    The output is a deterministic function of the arguments other than
    ``out_dir``, ``workers`` and ``progress``.  ``channel=False`` switches the
    per-utterance recording channel off (same speech, clean), for diagnostics.
    """
    num_speakers = _check_int("num_speakers", num_speakers, 2)
    utterances_per_speaker = _check_int("utterances_per_speaker", utterances_per_speaker, 2)
    workers = _check_int("workers", workers, 1)
    seed = _check_seed(seed)
    try:
        min_seconds, max_seconds = float(min_seconds), float(max_seconds)
    except (TypeError, ValueError):
        raise ValueError(
            f"min_seconds and max_seconds must be numbers, got {min_seconds!r}, {max_seconds!r}"
        ) from None
    if not (math.isfinite(min_seconds) and min_seconds > 0):
        raise ValueError(f"min_seconds must be > 0, got {min_seconds!r}")
    if min_seconds < 0.25:
        raise ValueError(f"min_seconds must be >= 0.25 (room for speech and silence), got {min_seconds!r}")
    if not (math.isfinite(max_seconds) and max_seconds >= min_seconds):
        raise ValueError(
            f"max_seconds must be finite and >= min_seconds ({min_seconds}), got {max_seconds!r}"
        )

    out = Path(out_dir)
    for spk in range(num_speakers):  # created up front so workers never race on mkdir
        (out / _speaker_name(spk)).mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), seed, spk, utt, min_seconds, max_seconds, bool(channel))
            for spk in range(num_speakers) for utt in range(utterances_per_speaker)]

    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="synthetic corpus", unit="utt", disable=not progress)
    rows = []
    try:
        if workers == 1:
            for job in jobs:
                rows.append(_make_utterance(job))
                bar.update()
        else:
            # 'fork' where available: cheap start and no need for a __main__ guard in the caller.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            ctx = multiprocessing.get_context(method)
            with ctx.Pool(min(workers, len(jobs)), initializer=_worker_init) as pool:
                for row in pool.imap(_make_utterance, jobs, chunksize=8):  # imap keeps job order
                    rows.append(row)
                    bar.update()
    finally:
        bar.close()
    manifest = pd.DataFrame(rows, columns=["path", "speaker", "utterance", "duration", "sample_rate"])
    manifest["duration"] = manifest["duration"].astype(float)
    manifest["sample_rate"] = manifest["sample_rate"].astype(int)
    return manifest.sort_values(["speaker", "utterance"], ignore_index=True)

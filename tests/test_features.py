"""Tests for voiceprint.features: parity with the original features, known values, batch extraction."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from voiceprint import features as F
from voiceprint.data.audio import AudioError, load_audio
from voiceprint.features import framing, kernels, kinds, runner, vad as V
from voiceprint.features import (
    FEATURE_KINDS,
    extract,
    fbank_original,
    featurize_file,
    featurize_many,
    logmel_cmn,
    mfcc_stats,
    num_frames,
    trim_silence_original,
)


def _shared_dir() -> Path:
    return Path(os.environ.get("VOICEPRINT_SHARED", Path(__file__).resolve().parents[2] / "shared"))


SHARED = _shared_dir()
PARITY = SHARED / "reference" / "parity"
META = json.loads((PARITY / "meta.json").read_text()) if (PARITY / "meta.json").is_file() else None
needs_shared = pytest.mark.skipif(META is None, reason=f"shared reference data not found at {SHARED}")


def _speechy(seconds: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    """Noise bursts with a harmonic tone, between quiet gaps: trims and featurizes like speech."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    envelope = (np.sin(2 * np.pi * 2.0 * t) > 0).astype(np.float32) * 0.5 + 0.01
    x = envelope * (np.sin(2 * np.pi * (150 + 50 * seed) * t) + 0.3 * rng.standard_normal(n))
    return (0.4 * x / np.abs(x).max()).astype(np.float32)


# --- parity with the original implementation ------------------------------------


@needs_shared
@pytest.mark.parametrize("key", sorted(META["files"]) if META else [])
def test_fbank_norm_matches_original_fixture(key):
    reference = np.load(PARITY / "features" / f"{key}.npy")
    signal = load_audio(SHARED / META["files"][key], 16000)
    got = fbank_original(trim_silence_original(signal), 16000)
    assert got.dtype == np.float32
    assert got.shape == reference.shape == (META["frames"][key], 64)
    np.testing.assert_array_equal(got, reference)  # bit-exact: the original's own float32 values
    # the registry path and featurize_file give the same thing
    np.testing.assert_array_equal(extract(signal, "fbank_norm"), got)
    feats, base = featurize_file(SHARED / META["files"][key], "fbank_norm")
    np.testing.assert_array_equal(feats, got)
    assert base.shape == (40,)


# --- framing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, expected", [(1, 1), (100, 1), (399, 1), (400, 1), (401, 2), (560, 2), (561, 3), (720, 3), (721, 4)]
)
def test_frame_count(n, expected):
    assert num_frames(n) == expected
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    assert fbank_original(x).shape == (expected, 64)
    assert logmel_cmn(x).shape == (expected, 64)


def test_frame_count_formula_on_long_signal():
    for n in range(16000, 16400, 37):
        assert num_frames(n) == 1 + int(np.ceil((n - 400) / 160))


# --- fbank_original ----------------------------------------------------------------


def test_fbank_per_frame_normalisation():
    feats = fbank_original(_speechy(1.0))
    assert feats.dtype == np.float32 and feats.shape == (99, 64)
    np.testing.assert_allclose(feats.mean(axis=1), 0.0, atol=1e-5)
    np.testing.assert_allclose(feats.std(axis=1), 1.0, atol=1e-5)


def test_fbank_zero_signal_gives_zero_frames():
    # all-zero energies -> eps everywhere -> std 0 -> divided by 1e-12 -> zeros (no NaN)
    feats = fbank_original(np.zeros(1000, dtype=np.float32))
    assert np.array_equal(feats, np.zeros((5, 64), dtype=np.float32))


def _htk_band_of(freq: float, num_bands: int = 64, sr: int = 16000) -> int:
    """Index of the HTK-mel triangle whose centre is nearest to freq (independent of the implementation)."""
    mel = 2595 * np.log10(1 + freq / 700)
    spacing = 2595 * np.log10(1 + (sr / 2) / 700) / (num_bands + 1)
    return int(round(mel / spacing)) - 1


@pytest.mark.parametrize("freq", [250, 1000, 3000, 6000])
def test_fbank_pure_tone_peaks_in_expected_band(freq):
    t = np.arange(16000) / 16000
    x = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    feats = fbank_original(x)
    assert np.all(feats.argmax(axis=1) == _htk_band_of(freq))


def test_fbank_float64_input_and_int_input():
    x = _speechy(0.5)
    np.testing.assert_allclose(fbank_original(x.astype(np.float64)), fbank_original(x), atol=1e-4)
    assert fbank_original((x * 32767).astype(np.int16)).shape == fbank_original(x).shape


def _psf_filterbank(nfilt: int, nfft: int = 512, sr: int = 16000) -> np.ndarray:
    """python_speech_features 0.6 get_filterbanks (nfilt, nfft//2 + 1), transcribed."""
    melpoints = np.linspace(2595 * np.log10(1 + 0 / 700.0), 2595 * np.log10(1 + (sr / 2) / 700.0), nfilt + 2)
    edges = np.floor((nfft + 1) * (700 * (10 ** (melpoints / 2595.0) - 1)) / sr)
    fbank = np.zeros([nfilt, nfft // 2 + 1])
    for j in range(nfilt):
        for i in range(int(edges[j]), int(edges[j + 1])):
            fbank[j, i] = (i - edges[j]) / (edges[j + 1] - edges[j])
        for i in range(int(edges[j + 1]), int(edges[j + 2])):
            fbank[j, i] = (edges[j + 2] - i) / (edges[j + 2] - edges[j + 1])
    return fbank


def _psf_reference(signal: np.ndarray, num_bands: int = 64) -> np.ndarray:
    """python_speech_features.fbank(signal, 16000, nfilt=num_bands) + the original per-frame loop, transcribed
    (python_speech_features itself is only a benchmark dependency)."""
    emph = np.append(signal[0], signal[1:] - 0.97 * signal[:-1])
    n = num_frames(len(emph))
    padded = np.concatenate([emph, np.zeros((n - 1) * 160 + 400 - len(emph))])
    frames = padded[np.arange(400)[None, :] + 160 * np.arange(n)[:, None]]
    pspec = 1.0 / 512 * np.square(np.abs(np.fft.rfft(frames, 512)))
    feat = np.dot(pspec, _psf_filterbank(num_bands).T)
    feat = np.where(feat == 0, np.finfo(float).eps, feat)
    return np.array([(v - np.mean(v)) / max(np.std(v), 1e-12) for v in feat], dtype=np.float32)


@pytest.mark.parametrize("seconds", [0.025, 0.4, 0.65, 0.66, 1.3, 7.0])  # 1, 39, 64, 65, 129, 699 frames
def test_fbank_equals_the_original_formula_bit_for_bit(seconds):
    # frame counts around the kernel's batch of FFT_LANES frames: a frame's result must not depend on its batch
    x = _speechy(seconds, seed=3)
    np.testing.assert_array_equal(fbank_original(x), _psf_reference(x))


def test_fbank_num_bands_other_than_64_and_above_the_pairwise_block():
    x = _speechy(0.5, seed=1)
    for bands in (5, 40, 130):  # 130 > 128: numpy's recursive pairwise sum, done by numpy itself
        np.testing.assert_array_equal(fbank_original(x, num_bands=bands), _psf_reference(x, bands))


@pytest.mark.parametrize("nfft, frame_len, step, start", [(512, 400, 160, 0), (400, 400, 160, -200),
                                                          (512, 600, 100, -650), (16, 10, 3, 5)])
def test_band_energies_kernel_equals_numpy_power_spectrum(nfft, frame_len, step, start):
    rng = np.random.default_rng(nfft + frame_len)
    signal = rng.standard_normal(step * kernels.FFT_LANES + 1000).astype(np.float32)
    count = (signal.shape[0] - start) // step + 2  # the last frames reach past the end
    window = rng.uniform(0.5, 1.0, frame_len)
    filterbank = rng.uniform(0, 1, (nfft // 2 + 1, 7)) * (rng.random((nfft // 2 + 1, 7)) < 0.3)
    got = kernels._band_energies(signal, start, count, step, window, nfft, kernels._sparse_bands(filterbank))
    # frame t = signal[start + t step :][:frame_len], zeros outside the signal; rfft(x, nfft) zero-pads shorter
    # frames and cuts longer ones
    padded = np.concatenate([np.zeros(max(0, -start)), signal, np.zeros(count * step + frame_len)])
    first = start + max(0, -start)
    frames = padded[first + step * np.arange(count)[:, None] + np.arange(frame_len)[None, :]]
    expected = np.abs(np.fft.rfft(frames * window, nfft)) ** 2 @ filterbank
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12 * expected.max())


def test_band_energies_rejects_fft_sizes_it_cannot_do():
    with pytest.raises(ValueError, match="FFT size 514"):
        kernels._fft_plan(514)  # 257 points: a prime


def test_frame_normalisation_is_numpys_bit_for_bit():
    rng = np.random.default_rng(0)
    for bands in (3, 8, 13, 64, 128, 200):
        feat = rng.exponential(1.0, (50, bands)) * rng.uniform(1e-6, 1e6, (50, 1))
        feat[0, :2] = 0.0  # zero energies become float eps first
        expected = np.where(feat == 0, np.finfo(float).eps, feat)
        expected = np.array([(v - np.mean(v)) / max(np.std(v), 1e-12) for v in expected], dtype=np.float32)
        np.testing.assert_array_equal(kinds._normalize_frames(feat), expected)


# --- logmel_cmn ----------------------------------------------------------------------


def test_logmel_cmn_zero_mean_per_band():
    feats = logmel_cmn(_speechy(2.0))
    assert feats.dtype == np.float32 and feats.shape == (num_frames(32000), 64)
    np.testing.assert_allclose(feats.mean(axis=0), 0.0, atol=1e-4)
    assert feats.std(axis=0).min() > 0  # not degenerate


def test_logmel_cmn_is_the_float64_computation_rounded_to_float32():
    x = _speechy(30.0, seed=2)  # long: a float32 mean over 3,000 frames would drift by ~1e-5
    librosa = pytest.importorskip("librosa")
    n = num_frames(len(x))
    padded = np.concatenate([x, np.zeros((n - 1) * 160 + 400 - len(x), np.float32)]).astype(np.float64)
    frames = padded[np.arange(400)[None, :] + 160 * np.arange(n)[:, None]]
    frames *= 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    mel = np.abs(np.fft.rfft(frames, 512)) ** 2 @ librosa.filters.mel(
        sr=16000, n_fft=512, n_mels=64, fmin=20, fmax=8000, dtype=np.float32).T.astype(np.float64)
    expected = np.log(mel + 1e-6)
    expected -= expected.mean(axis=0)
    np.testing.assert_allclose(logmel_cmn(x), expected, rtol=0, atol=4 * np.spacing(np.float32(16)))


def test_logmel_cmn_matches_librosa_computation():
    librosa = pytest.importorskip("librosa")
    n = 400 + 160 * 49  # exactly 50 frames, no tail padding
    x = _speechy(1.0)[:n]
    # librosa centres the 400-sample window in a 512-sample frame: pad 56 zeros each side
    # so that its frame t covers exactly our samples [160 t, 160 t + 400).
    padded = np.pad(x, (56, 56))
    stft = librosa.stft(padded, n_fft=512, hop_length=160, win_length=400, window="hann", center=False)
    mel = librosa.feature.melspectrogram(S=np.abs(stft) ** 2, sr=16000, n_mels=64, fmin=20, fmax=8000)
    expected = np.log(mel + 1e-6).T
    expected -= expected.mean(axis=0)
    got = logmel_cmn(x)
    assert got.shape == expected.shape == (50, 64)
    np.testing.assert_allclose(got, expected, atol=2e-3)


# --- trimming --------------------------------------------------------------------------


def test_trim_keeps_span_between_first_and_last_loud_sample():
    x = np.full(1000, 0.001, dtype=np.float32)
    x[100], x[300], x[700] = 0.5, -0.8, 0.3  # 3 loud samples < 5%: threshold = 0.001
    trimmed = trim_silence_original(x)
    np.testing.assert_array_equal(trimmed, x[100:700])  # last loud sample excluded, as in the original


def test_trim_threshold_is_95th_percentile():
    x = np.full(1000, 0.001, dtype=np.float32)
    x[200:260] = 0.5  # 6% loud: threshold interpolates to 0.5, nothing strictly above it...
    x[210], x[250] = 0.9, 0.9  # ...except these two
    np.testing.assert_array_equal(trim_silence_original(x), x[210:250])


def _trim_reference(signal: np.ndarray) -> np.ndarray:
    energy = np.abs(signal)
    loud = np.flatnonzero(energy > np.percentile(energy, 95))
    return signal if loud.shape[0] < 2 else signal[loud[0] : loud[-1]]


def test_trim_equals_the_percentile_formula_on_random_signals():
    rng = np.random.default_rng(7)
    for trial in range(600):
        n = int(rng.integers(1, 4000))
        x = (rng.standard_normal(n) * rng.uniform(1e-4, 0.5)).astype(np.float32)
        if trial % 3 == 1:
            x = (np.round(x * 40) / 40).astype(np.float32)  # ties at the threshold
        if trial % 3 == 2:  # magnitudes a few float32 steps apart: the interpolation's rounding matters
            base = np.float32(rng.uniform(0.01, 0.9))
            x = (base + np.spacing(base) * rng.integers(-6, 7, n)).astype(np.float32) * rng.choice([-1, 1], n)
            x = x.astype(np.float32)
        np.testing.assert_array_equal(trim_silence_original(x), _trim_reference(x))


def test_trim_threshold_can_round_onto_the_next_sample():
    # 22 samples: np.percentile interpolates 95% of the way from 0.5 to the next float32, which rounds onto it;
    # so the two samples at that value are NOT louder than the threshold and nothing is trimmed
    a = np.float32(0.5)
    b = np.nextafter(a, np.float32(1))
    x = np.full(22, 0.001, np.float32)
    x[2], x[10], x[18] = b, a, -b
    assert np.percentile(np.abs(x), 95) == b
    np.testing.assert_array_equal(trim_silence_original(x), x)
    x[10] = 0.25  # now the threshold falls strictly between 0.25 and b: both b samples are loud
    np.testing.assert_array_equal(trim_silence_original(x), x[2:18])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_trim_non_finite_and_float64_signals_follow_the_formula(bad):
    x = _speechy(0.2)
    x[100] = bad
    np.testing.assert_array_equal(trim_silence_original(x), _trim_reference(x))
    y = _speechy(0.2).astype(np.float64)
    np.testing.assert_array_equal(trim_silence_original(y), _trim_reference(y))


@pytest.mark.parametrize("case", ["zeros", "one_loud", "constant", "empty"])
def test_trim_degenerate_cases_return_input(case):
    x = {
        "zeros": np.zeros(500, dtype=np.float32),
        "one_loud": np.eye(1, 500, 123, dtype=np.float32)[0],
        "constant": np.full(500, 0.2, dtype=np.float32),
        "empty": np.zeros(0, dtype=np.float32),
    }[case]
    np.testing.assert_array_equal(trim_silence_original(x), x)


# --- registry and baseline ---------------------------------------------------------------


def test_registry_and_extract():
    assert set(FEATURE_KINDS) == {"fbank_norm", "logmel_cmn"}
    x = _speechy(1.0)
    trimmed = trim_silence_original(x)
    np.testing.assert_array_equal(extract(x, "fbank_norm"), fbank_original(trimmed))
    np.testing.assert_array_equal(extract(x, "logmel_cmn"), logmel_cmn(trimmed))
    with pytest.raises(ValueError, match="fbank_norm.*logmel_cmn"):
        extract(x, "mfcc39")


@pytest.mark.parametrize("seconds, n_mfcc", [(1.0, 20), (0.1, 20), (12.0, 13)])
def test_mfcc_stats_is_mean_and_std_of_librosa_mfcc(seconds, n_mfcc):
    librosa = pytest.importorskip("librosa")
    x = _speechy(seconds)
    vec = mfcc_stats(x, n_mfcc=n_mfcc)
    assert vec.dtype == np.float32 and vec.shape == (2 * n_mfcc,)
    m = librosa.feature.mfcc(y=x, sr=16000, n_mfcc=n_mfcc, n_fft=400, hop_length=160, n_mels=64)
    np.testing.assert_allclose(vec, np.concatenate([m.mean(axis=1), m.std(axis=1)]), rtol=1e-5, atol=1e-4)


# --- files ------------------------------------------------------------------------------


def _write_wav(path: Path, x: np.ndarray, sr: int = 16000) -> str:
    sf.write(str(path), x, sr, subtype="PCM_16")
    return str(path)


def test_featurize_file_shapes_and_kinds(tmp_path):
    p = _write_wav(tmp_path / "a.wav", _speechy(1.5))
    y = load_audio(p)
    for kind in FEATURE_KINDS:
        feats, base = featurize_file(p, kind)
        np.testing.assert_array_equal(feats, extract(y, kind))
        np.testing.assert_array_equal(base, mfcc_stats(trim_silence_original(y)))
    with pytest.raises(ValueError, match="valid kinds"):
        featurize_file(p, "nope")


def test_featurize_file_too_short_after_trim(tmp_path):
    x = np.full(8000, 0.001, dtype=np.float32)
    x[1000:1300] = 0.5 * np.sin(np.arange(300))  # loud span of ~300 samples: 1 frame after trim
    p = _write_wav(tmp_path / "click.wav", x)
    with pytest.raises(AudioError) as info:
        featurize_file(p, "fbank_norm")
    assert info.value.reason == "too_short" and p in str(info.value)


def _mixed_corpus(tmp_path: Path) -> tuple[list[str], dict[int, str]]:
    paths, bad = [], {}
    for i in range(6):
        paths.append(_write_wav(tmp_path / f"good{i}.wav", _speechy(0.8 + 0.1 * i, seed=i)))
    text = tmp_path / "text.wav"
    text.write_text("not audio")
    bad[2] = "unreadable"
    paths.insert(2, str(text))
    bad[5] = "silent"
    paths.insert(5, _write_wav(tmp_path / "silent.wav", np.zeros(8000, dtype=np.float32)))
    bad[8] = "missing"
    paths.insert(8, str(tmp_path / "missing.wav"))
    return paths, bad


def test_featurize_many_reports_bad_files_and_continues(tmp_path):
    paths, bad = _mixed_corpus(tmp_path)
    results = list(featurize_many(paths, "fbank_norm", workers=1, progress=False))
    assert [r[0] for r in results] == list(range(len(paths)))
    for index, feats, base, reason, message in results:
        if index in bad:
            assert feats is None and base is None
            assert reason == bad[index] and paths[index] in message
        else:
            assert reason is None and message is None
            np.testing.assert_array_equal(feats, featurize_file(paths[index], "fbank_norm")[0])
            assert base.shape == (40,)


def test_featurize_many_workers_2_equals_workers_1(tmp_path):
    paths, _ = _mixed_corpus(tmp_path)
    one = list(featurize_many(paths, "logmel_cmn", workers=1, progress=False))
    two = list(featurize_many(paths, "logmel_cmn", workers=2, progress=False))
    assert len(one) == len(two) == len(paths)
    for a, b in zip(one, two):
        assert a[0] == b[0] and a[3:] == b[3:]
        for x, y in ((a[1], b[1]), (a[2], b[2])):
            assert (x is None) == (y is None)
            if x is not None:
                np.testing.assert_array_equal(x, y)


def test_featurize_many_unexpected_exception_becomes_error(tmp_path, monkeypatch):
    paths = [_write_wav(tmp_path / "a.wav", _speechy(1.0)), _write_wav(tmp_path / "b.wav", _speechy(1.0, seed=1))]

    def boom(path, *args, **kwargs):
        if path.endswith("a.wav"):
            raise RuntimeError("kaboom")
        return np.zeros((2, 64), np.float32), np.zeros(40, np.float32)

    monkeypatch.setattr(runner, "featurize_file", boom)
    results = list(featurize_many(paths, "fbank_norm", workers=1, progress=False))
    assert results[0][3] == "error" and "kaboom" in results[0][4] and paths[0] in results[0][4]
    assert results[1][3] is None


def test_featurize_many_rejects_unknown_kind_up_front():
    with pytest.raises(ValueError, match="valid kinds"):
        next(featurize_many(["x.wav"], "nope", workers=1, progress=False))


# --- energy VAD ---------------------------------------------------------------------------------------


def _bursts(sr: int = 16000, seed: int = 0) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """0.5 s quiet, then three 0.4 s tone bursts separated by 0.6 s of quiet noise, then 0.5 s quiet."""
    rng = np.random.default_rng(seed)
    x = (1e-3 * rng.standard_normal(int(3.7 * sr))).astype(np.float32)
    bursts = []
    for start_s in (0.5, 1.5, 2.5):
        start, stop = int(start_s * sr), int((start_s + 0.4) * sr)
        t = np.arange(stop - start) / sr
        x[start:stop] += (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
        bursts.append((start, stop))
    return x, bursts


def test_energy_vad_removes_silences_and_keeps_hangover():
    x, bursts = _bursts()
    speech = F.vad_energy(x)
    # each burst plus 50 ms before and 100 ms after (the bursts sit on 10 ms block boundaries)
    expected = np.concatenate([x[start - 800 : stop + 1600] for start, stop in bursts])
    np.testing.assert_array_equal(speech, expected)
    assert speech.shape[0] == 3 * (6400 + 2400)
    # the original trim keeps the inner silences
    assert trim_silence_original(x).shape[0] > int(2.3 * 16000)


def test_energy_vad_merges_short_pauses():
    x, _ = _bursts()
    x[int(0.9 * 16000) : int(1.4 * 16000)] += 0.5 * np.sin(np.arange(8000) / 3)  # first gap: 0.1 s quiet left
    speech = F.vad_energy(x)
    # bursts 1-2 now one run 0.5..1.9 s (0.1 s pause < 150 ms of hangover), burst 3 alone
    assert speech.shape[0] == (int(1.4 * 16000) + 2400) + (6400 + 2400)


@pytest.mark.parametrize("signal", ["white_noise", "tone"])
def test_energy_vad_rejects_noise_and_steady_tones(tmp_path, signal):
    rng = np.random.default_rng(0)
    t = np.arange(32000) / 16000
    x = (0.1 * rng.standard_normal(32000) if signal == "white_noise" else 0.3 * np.sin(2 * np.pi * 300 * t))
    with pytest.raises(F.NoSpeechError, match="span only .* dB"):
        F.vad_energy(x.astype(np.float32))
    p = _write_wav(tmp_path / "n.wav", x.astype(np.float32))
    with pytest.raises(AudioError) as info:
        featurize_file(p, "logmel_cmn", vad="energy")
    assert info.value.reason == "no_speech" and p in str(info.value)
    assert featurize_file(p, "logmel_cmn")[0].shape[0] > 2  # the original trim keeps it: noise passes as speech


def test_energy_vad_keeps_at_least_the_loudest_tenth():
    # 10 ms blocks of constant level (mean square = level^2): 88 at -70 dB, 4 at -65 dB, 8 at -50 dB.
    levels_db = np.array([-70.0] * 40 + [-65.0] * 4 + [-50.0] * 8 + [-70.0] * 48)
    x = np.repeat(10 ** (levels_db / 20), 160).astype(np.float32)
    # floor -70, speech level -50: threshold -64 dB would keep 8% of the blocks; the fallback keeps the -65 dB ones
    speech = F.vad_energy(x)
    assert speech.shape[0] == (4 + 8 + 5 + 10) * 160
    np.testing.assert_array_equal(speech, x[35 * 160 : 62 * 160])


def test_energy_vad_drops_clicks():
    x, bursts = _bursts()
    x[int(3.3 * 16000) : int(3.3 * 16000) + 160] = 0.5  # a 10 ms click in the final silence
    np.testing.assert_array_equal(F.vad_energy(x), F.vad_energy(_bursts()[0]))


def test_vad_choice_in_extract_and_featurize(tmp_path):
    x, _ = _bursts()
    p = _write_wav(tmp_path / "b.wav", x)
    y = load_audio(p)
    feats, base = featurize_file(p, "fbank_norm", vad="energy")
    np.testing.assert_array_equal(feats, extract(y, "fbank_norm", vad="energy"))
    np.testing.assert_array_equal(feats, fbank_original(F.vad_energy(y)))
    np.testing.assert_array_equal(base, mfcc_stats(F.vad_energy(y)))
    np.testing.assert_array_equal(featurize_file(p, "fbank_norm")[0], extract(y, "fbank_norm"))
    with pytest.raises(ValueError, match="unknown vad 'webrtc'; valid: original, energy"):
        featurize_file(p, "fbank_norm", vad="webrtc")
    with pytest.raises(ValueError, match="unknown vad"):
        next(featurize_many([p], "fbank_norm", workers=1, vad="webrtc", progress=False))
    results = list(featurize_many([p], "fbank_norm", workers=1, vad="energy", progress=False))
    np.testing.assert_array_equal(results[0][1], feats)


def test_featurize_many_reports_clipping_and_no_speech(tmp_path):
    x, _ = _bursts()
    clipped = x.copy()
    clipped[:2000] = 1.0
    paths = [_write_wav(tmp_path / "ok.wav", x), _write_wav(tmp_path / "clipped.wav", clipped),
             _write_wav(tmp_path / "noise.wav", (0.1 * np.random.default_rng(1).standard_normal(16000)).astype(
                 np.float32))]
    results = list(featurize_many(paths, "logmel_cmn", workers=1, vad="energy", max_clipped_fraction=0.01,
                                  progress=False))
    assert [r[3] for r in results] == [None, "clipped", "no_speech"]


# --- chunked extraction of long files -----------------------------------------------------------------


def test_streamed_trim_equals_trim_silence_original():
    rng = np.random.default_rng(3)
    for trial in range(40):
        n = int(rng.integers(1, 5000))
        x = (rng.standard_normal(n) * rng.uniform(0.01, 0.5)).astype(np.float32)
        if trial % 3 == 0:
            x = np.round(x * 50) / 50  # many ties at the threshold
        if trial % 7 == 0:
            x[:] = x[0]  # constant: returned unchanged
        cuts = np.sort(rng.integers(0, n, size=int(rng.integers(0, 6))))
        chunks = [c for c in np.split(x, cuts) if c.size]
        trim = V._StreamedTrim()
        for chunk in chunks:
            trim.push(chunk)
        start, stop = trim.segment(chunks)
        np.testing.assert_array_equal(x[start:stop], trim_silence_original(x))


def _long_speechy_file(path: Path, seconds: int, sr: int = 16000, channels: int = 1) -> str:
    """Speech-like bursts with pauses, written second by second (the generator stays small too)."""
    rng = np.random.default_rng(seconds)
    with sf.SoundFile(str(path), "w", sr, channels, subtype="PCM_16") as fh:
        for i in range(seconds):
            t = np.arange(sr) / sr
            x = 0.3 * np.sin(2 * np.pi * (120 + 15 * (i % 5)) * t) * (np.sin(2 * np.pi * 1.3 * t) > 0)
            x = (x + 0.003 * rng.standard_normal(sr)).astype(np.float32)
            fh.write(np.stack([x, 0.5 * x], axis=1) if channels == 2 else x)
    return str(path)


@pytest.mark.parametrize("vad", F.VAD_KINDS)
def test_chunked_features_equal_whole_file(tmp_path, vad):
    p = _long_speechy_file(tmp_path / "long.wav", 150, sr=8000, channels=2)  # resampling and mixing too
    for kind in FEATURE_KINDS:
        whole, whole_base = featurize_file(p, kind, vad=vad)  # 150 s < LONG_FILE_SECONDS: one piece
        chunked, chunked_base = featurize_file(p, kind, vad=vad, long_file_seconds=0, chunk_seconds=1.7)
        np.testing.assert_array_equal(chunked, whole)
        # float64 running sums instead of librosa's float32 mean/std
        np.testing.assert_allclose(chunked_base, whole_base, rtol=1e-5, atol=1e-4)


def test_chunked_memory_does_not_grow_with_length(tmp_path):
    import tracemalloc

    extra = {}
    for seconds in (60, 240):
        p = _long_speechy_file(tmp_path / f"{seconds}.wav", seconds)
        featurize_file(p, "fbank_norm", long_file_seconds=0, chunk_seconds=2.0)  # warm the caches
        tracemalloc.start()
        feats, _ = featurize_file(p, "fbank_norm", long_file_seconds=0, chunk_seconds=2.0)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        extra[seconds] = peak - feats.nbytes  # beyond the features returned
    assert extra[240] < 8e6  # the 240 s file alone is 15 MB of float32 audio, 0.4 GB when processed whole
    assert abs(extra[240] - extra[60]) < 1e6


def test_only_files_longer_than_long_file_seconds_go_chunked(tmp_path, monkeypatch):
    p = _long_speechy_file(tmp_path / "x.wav", 3)
    monkeypatch.setattr(runner, "_featurize_chunked", lambda *args, **kwargs: ("chunked", args[-1]))
    assert F.LONG_FILE_SECONDS == 300.0 and F.CHUNK_SECONDS == 20.0
    assert isinstance(featurize_file(p, "fbank_norm")[0], np.ndarray)
    assert isinstance(featurize_file(p, "fbank_norm", long_file_seconds=3.0)[0], np.ndarray)
    assert featurize_file(p, "fbank_norm", long_file_seconds=2.9) == ("chunked", 20.0)
    assert featurize_file(p, "fbank_norm", long_file_seconds=2.9, chunk_seconds=0.5) == ("chunked", 0.5)


def test_dct_matrix_equals_scipys_dct_ii_ortho():
    scipy_fft = pytest.importorskip("scipy.fft")
    from voiceprint.features.mfcc import MFCC_BANDS, _dct_ortho

    expected = scipy_fft.dct(np.eye(MFCC_BANDS), type=2, norm="ortho", axis=0)[:20].T
    np.testing.assert_allclose(_dct_ortho(MFCC_BANDS, 20), expected, rtol=0, atol=2e-15)


class _DiffBlockEnergy(F.FeatureKind):
    """A toy kind, registered by the tests below: the log energy of 6-sample blocks of each frame of the signal's
    first difference (state the streaming path must carry across pieces), minus the utterance's maximum
    (per-utterance normalisation, applied once all frames are known)."""

    def frames(self, signal, start, count, sample_rate, num_bands):
        frame_len, frame_step = framing._frame_params(sample_rate)
        positions = start + frame_step * np.arange(count)[:, None] + np.arange(6 * num_bands)
        padded = np.zeros(max(positions.max() + 1, signal.shape[0]))     # zeros past the end, as the kernel
        padded[: signal.shape[0]] = signal
        blocks = padded[positions].reshape(count, num_bands, 6)
        return np.log(1e-6 + np.square(blocks).sum(axis=2)).astype(np.float32)

    def normalize(self, features):
        features -= features.max()
        return features

    def stream(self, sample_rate=16000, num_bands=64):
        return _DiffStream(self, sample_rate, num_bands)

    def whole(self, signal, sample_rate=16000, num_bands=64):    # written apart from the stream on purpose
        x = np.asarray(signal, np.float32)
        diff = np.concatenate([x[:1], np.diff(x)])
        return self.normalize(self.frames(diff, 0, num_frames(x.shape[0]), sample_rate, num_bands))


class _DiffStream(F.KindStream):
    def __init__(self, kind, sample_rate, num_bands):
        super().__init__(kind, sample_rate, num_bands)
        self.previous = None

    def prepare(self, piece):
        head = piece[:1] if self.previous is None else piece[:1] - self.previous
        self.previous = piece[-1]
        return np.concatenate([head, np.subtract(piece[1:], piece[:-1])])


@pytest.fixture
def toy_kind():
    kind = F.register_feature_kind("toy_diff_energy", _DiffBlockEnergy())
    try:
        yield kind
    finally:
        del F.FEATURE_KINDS["toy_diff_energy"]


@pytest.mark.parametrize("vad", F.VAD_KINDS)
def test_a_kind_registered_at_test_time_streams_long_files_through_its_own_object(tmp_path, monkeypatch, toy_kind,
                                                                                   vad):
    p = _long_speechy_file(tmp_path / "long.wav", 4)
    whole, whole_base = featurize_file(p, "toy_diff_energy", vad=vad)       # 4 s < 300 s: one piece
    chunked_calls = []
    real_chunked = runner._featurize_chunked
    monkeypatch.setattr(runner, "_featurize_chunked", lambda *a, **k: chunked_calls.append(a) or real_chunked(*a, **k))
    monkeypatch.setattr(runner, "LONG_FILE_SECONDS", 1.0)
    monkeypatch.setattr(runner, "CHUNK_SECONDS", 0.7)        # pieces that cut frames and the first difference
    chunked, chunked_base = featurize_file(p, "toy_diff_energy", vad=vad)
    assert len(chunked_calls) == 1 and chunked_calls[0][-1] == 0.7
    np.testing.assert_array_equal(chunked, whole)
    assert chunked.max() == 0.0 and chunked.shape[1] == 64                   # the kind's normalisation ran
    np.testing.assert_allclose(chunked_base, whole_base, rtol=1e-5, atol=1e-4)
    logmel, _ = featurize_file(p, "logmel_cmn", vad=vad)
    assert not np.allclose(chunked, logmel)                                   # not the log-mel fallback of old


def test_feature_kinds_are_registered_objects_and_validation_lists_the_registry(toy_kind):
    from voiceprint.serving.bundle import parse_features
    from voiceprint.core.contracts import FeatureParams
    from voiceprint.core.params import Params

    params = {"kind": "logmel_cmn", "min_seconds": 0.5, "vad": "original", "max_clipped_fraction": 0.01}
    assert list(F.FEATURE_KINDS) == ["fbank_norm", "logmel_cmn", "toy_diff_energy"]
    assert all(isinstance(k, F.FeatureKind) and k.name == name for name, k in F.FEATURE_KINDS.items())
    assert FeatureParams.read(Params({"features": {**params, "kind": "toy_diff_energy"}})).kind == "toy_diff_energy"
    assert parse_features({**F.FeatureSettings().to_dict(), "kind": "toy_diff_energy"}, "t").kind == "toy_diff_energy"
    with pytest.raises(ValueError, match="registered already"):
        F.register_feature_kind("toy_diff_energy", _DiffBlockEnergy())
    with pytest.raises(ValueError, match="valid kinds: fbank_norm, logmel_cmn, toy_diff_energy"):
        featurize_file("never-read.wav", "nope")

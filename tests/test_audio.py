"""Tests for voiceprint.audio: decoding, mono mixing, resampling, rejection reasons."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from voiceprint.audio import AudioError, load_audio


def _shared_dir() -> Path:
    return Path(os.environ.get("VOICEPRINT_SHARED", Path(__file__).resolve().parents[2] / "shared"))


SHARED = _shared_dir()
META = SHARED / "reference" / "parity" / "meta.json"
needs_shared = pytest.mark.skipif(not META.is_file(), reason=f"shared reference data not found at {SHARED}")


def _tone(freq: float, seconds: float, sr: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _write(path: Path, data, sr: int, subtype: str) -> Path:
    sf.write(str(path), data, sr, subtype=subtype)
    return path


# --- decoding -----------------------------------------------------------------


def test_int16_wav_matches_librosa_load(tmp_path):
    librosa = pytest.importorskip("librosa")
    x = _tone(440, 0.5, 16000)
    p = _write(tmp_path / "a.wav", x, 16000, "PCM_16")
    y = load_audio(p)
    assert y.dtype == np.float32 and y.ndim == 1 and y.shape == (8000,)
    np.testing.assert_array_equal(y, librosa.load(p, sr=16000, mono=True, dtype=np.float32)[0])
    # int16 PCM is scaled by 1/32768
    np.testing.assert_allclose(y, x, atol=1.0 / 32768)


def test_float_wav_round_trips_exactly(tmp_path):
    x = _tone(300, 0.25, 16000, amp=0.9)
    p = _write(tmp_path / "f.wav", x, 16000, "FLOAT")
    np.testing.assert_array_equal(load_audio(p), x)


def test_float_wav_out_of_range_is_clipped(tmp_path):
    x = _tone(300, 0.25, 16000, amp=1.5)
    y = load_audio(_write(tmp_path / "loud.wav", x, 16000, "FLOAT"))
    assert y.max() == 1.0 and y.min() == -1.0


def test_stereo_is_mixed_to_mono_by_mean(tmp_path):
    librosa = pytest.importorskip("librosa")
    left = _tone(440, 0.5, 16000, amp=0.6)
    right = _tone(1000, 0.5, 16000, amp=0.2)
    p = _write(tmp_path / "st.wav", np.stack([left, right], axis=1), 16000, "PCM_16")
    y = load_audio(p)
    assert y.shape == (8000,)
    decoded = sf.read(str(p), dtype="float32")[0]
    np.testing.assert_array_equal(y, ((decoded[:, 0] + decoded[:, 1]) / 2).astype(np.float32))
    np.testing.assert_array_equal(y, librosa.load(p, sr=16000, mono=True, dtype=np.float32)[0])


def test_resample_8k_to_16k_keeps_length_and_frequency(tmp_path):
    p = _write(tmp_path / "8k.wav", _tone(1000, 1.0, 8000), 8000, "PCM_16")
    y = load_audio(p, sample_rate=16000)
    assert y.dtype == np.float32 and y.shape == (16000,)
    spectrum = np.abs(np.fft.rfft(y * np.hanning(y.size)))
    peak_hz = np.argmax(spectrum) * 16000 / y.size
    assert abs(peak_hz - 1000) <= 1
    # band-limited resampler: nothing (no image at 7 kHz) outside the tone
    assert spectrum[4000:].max() < 1e-3 * spectrum.max()


def test_downsample_44k1_to_16k(tmp_path):
    p = _write(tmp_path / "44k.flac", _tone(2000, 0.5, 44100), 44100, "PCM_16")
    y = load_audio(p)
    assert y.shape == (8000,)
    peak_hz = np.argmax(np.abs(np.fft.rfft(y))) * 16000 / y.size
    assert abs(peak_hz - 2000) <= 2


# --- rejections ---------------------------------------------------------------


def _assert_rejected(path: Path, reason: str, **kwargs):
    with pytest.raises(AudioError) as info:
        load_audio(path, **kwargs)
    err = info.value
    assert err.reason == reason
    assert err.path == str(path)
    assert str(path) in str(err)
    assert isinstance(err, ValueError)
    return err


def test_reject_text_file_named_wav(tmp_path):
    p = tmp_path / "notes.wav"
    p.write_text("this is not audio\n" * 20)
    err = _assert_rejected(p, "unreadable")
    assert err.detail  # decoder's message is kept


def test_reject_zero_byte_file(tmp_path):
    p = tmp_path / "zero.wav"
    p.write_bytes(b"")
    _assert_rejected(p, "empty")


def test_reject_wav_without_samples(tmp_path):
    p = _write(tmp_path / "nosamples.wav", np.zeros(0, dtype=np.float32), 16000, "PCM_16")
    _assert_rejected(p, "empty")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_reject_non_finite_samples(tmp_path, bad):
    x = _tone(440, 0.2, 16000)
    x[100] = bad
    _assert_rejected(_write(tmp_path / "nan.wav", x, 16000, "FLOAT"), "non_finite")


def test_reject_digital_silence(tmp_path):
    p = _write(tmp_path / "silent.wav", np.zeros(16000, dtype=np.int16), 16000, "PCM_16")
    _assert_rejected(p, "silent")


def test_reject_too_short(tmp_path):
    p = _write(tmp_path / "short.wav", _tone(440, 0.5, 16000), 16000, "PCM_16")
    err = _assert_rejected(p, "too_short", min_seconds=1.0)
    assert "0.500" in str(err)
    assert load_audio(p, min_seconds=0.5).shape == (8000,)  # boundary is inclusive


def test_reject_missing_file(tmp_path):
    _assert_rejected(tmp_path / "nope.flac", "missing")


def test_audio_error_pickles():
    err = AudioError("/x/y.wav", "silent", "detail")
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.reason, back.detail, str(back)) == (err.path, err.reason, err.detail, str(err))


# --- parity with the original decoder ----------------------------------------------


@needs_shared
def test_fixture_files_decode_like_librosa_load():
    librosa = pytest.importorskip("librosa")
    meta = json.loads(META.read_text())
    for rel in meta["files"].values():
        path = SHARED / rel
        expected = librosa.load(path, sr=16000, mono=True, dtype=np.float32)[0]
        np.testing.assert_array_equal(load_audio(path), expected)

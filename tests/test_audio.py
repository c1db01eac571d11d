"""Tests for voiceprint.data.audio: decoding, mono mixing, resampling, rejection reasons."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from voiceprint.data.audio import AudioError, ChunkedAudio, load_audio


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


# --- formats, intake robustness -------------------------------------------------------------------------


def test_pinned_soundfile_decodes_mp3_and_ogg():
    formats = sf.available_formats()
    assert {"WAV", "FLAC", "OGG", "MP3"} <= set(formats)


@pytest.mark.parametrize("ext, kwargs, exact", [
    ("wav", dict(subtype="PCM_24"), True),
    ("flac", dict(format="FLAC"), True),
    ("ogg", dict(format="OGG", subtype="VORBIS"), False),
    ("opus", dict(format="OGG", subtype="OPUS"), False),
    ("mp3", dict(format="MP3"), False),
])
def test_formats_decode_to_16k_mono(tmp_path, ext, kwargs, exact):
    x = _tone(440, 1.0, 48000 if ext == "opus" else 22050)
    sr = 48000 if ext == "opus" else 22050
    p = tmp_path / f"a.{ext}"
    sf.write(str(p), np.stack([x, x], axis=1), sr, **kwargs)  # stereo in
    y = load_audio(p)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(y.shape[0] - 16000) <= (0 if exact else 1200)  # lossy codecs pad a few frames
    peak_hz = np.argmax(np.abs(np.fft.rfft(y))) * 16000 / y.size
    assert abs(peak_hz - 440) <= 3


def test_non_audio_extension_is_not_audio(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello\n" * 50)
    _assert_rejected(p, "not_audio")


def test_truncated_flac_is_unreadable_and_truncated_wav_keeps_what_is_there(tmp_path):
    x = _tone(440, 1.0, 16000)
    flac = _write(tmp_path / "a.flac", x, 16000, "PCM_16")
    data = flac.read_bytes()
    cut_flac = tmp_path / "cut.flac"
    cut_flac.write_bytes(data[: len(data) // 2])
    err = _assert_rejected(cut_flac, "unreadable")
    assert "lost sync" in err.detail or "seek" in err.detail
    wav = _write(tmp_path / "a.wav", x, 16000, "PCM_16")
    cut_wav = tmp_path / "cut.wav"
    cut_wav.write_bytes(wav.read_bytes()[: 44 + 2 * 6000])  # header + 6000 samples
    np.testing.assert_array_equal(load_audio(cut_wav), load_audio(wav)[:6000])


def test_permission_denied(tmp_path, monkeypatch):
    import voiceprint.data.audio as audio_module

    p = _write(tmp_path / "locked.wav", _tone(440, 0.5, 16000), 16000, "PCM_16")

    def deny(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    # Root may read anything, so refuse the open itself (where a chmod 000 file fails for other users).
    monkeypatch.setattr(audio_module, "open", deny, raising=False)
    err = _assert_rejected(p, "permission_denied")
    assert "Permission denied" in err.detail


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied_for_real(tmp_path):
    p = _write(tmp_path / "locked.wav", _tone(440, 0.5, 16000), 16000, "PCM_16")
    p.chmod(0)
    _assert_rejected(p, "permission_denied")


def test_clipped_files_are_rejected_only_above_the_allowed_fraction(tmp_path):
    x = _tone(440, 1.0, 16000, amp=0.5)
    x[:320] = 1.0  # 2% of the samples at full scale
    p = _write(tmp_path / "clip.wav", x, 16000, "PCM_16")
    err = _assert_rejected(p, "clipped", max_clipped_fraction=0.01)
    assert "2.00% of samples at full scale > 1.00% allowed" in str(err)
    assert load_audio(p, max_clipped_fraction=0.02).shape == (16000,)  # the boundary is allowed
    assert load_audio(p).shape == (16000,)  # no check by default
    # float files beyond full scale count as clipped too (they are clipped on decoding)
    f = _write(tmp_path / "loud.wav", _tone(300, 0.25, 16000, amp=1.5), 16000, "FLOAT")
    _assert_rejected(f, "clipped", max_clipped_fraction=0.01)


# --- chunked decoding -------------------------------------------------------------------------------


def test_chunked_audio_equals_load_audio(tmp_path):
    rng = np.random.default_rng(0)
    stereo = (0.2 * rng.standard_normal((8000 * 7 + 123, 2))).astype(np.float32)
    p = _write(tmp_path / "8k.wav", stereo, 8000, "PCM_16")
    audio = ChunkedAudio(p, 16000, chunk_seconds=0.37)
    chunks = list(audio)
    assert len(chunks) > 10
    np.testing.assert_array_equal(np.concatenate(chunks), load_audio(p))
    assert audio.validate() == load_audio(p).shape[0]
    np.testing.assert_array_equal(np.concatenate(list(audio)), np.concatenate(chunks))  # a second pass


@pytest.mark.parametrize("case, reason", [("silent", "silent"), ("short", "too_short"), ("clipped", "clipped"),
                                          ("nan", "non_finite")])
def test_chunked_audio_applies_the_same_checks(tmp_path, case, reason):
    x = _tone(440, 2.0, 16000)
    if case == "silent":
        x[:] = 0
    elif case == "clipped":
        x[:1000] = 1.0
    elif case == "nan":
        x[20000] = np.nan
    p = _write(tmp_path / "x.wav", x, 16000, "FLOAT")
    audio = ChunkedAudio(p, 16000, chunk_seconds=0.5)
    with pytest.raises(AudioError) as info:
        list(audio)
        audio.validate(min_seconds=3.0 if case == "short" else 0.0, max_clipped_fraction=0.01)
    assert info.value.reason == reason
    with pytest.raises(AudioError) as whole:
        load_audio(p, min_seconds=3.0 if case == "short" else 0.0, max_clipped_fraction=0.01)
    assert whole.value.reason == reason


def test_chunked_audio_of_a_truncated_flac_is_unreadable(tmp_path):
    flac = _write(tmp_path / "a.flac", _tone(440, 3.0, 16000), 16000, "PCM_16")
    data = flac.read_bytes()
    flac.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError) as info:
        list(ChunkedAudio(flac, 16000, chunk_seconds=0.5))
    assert info.value.reason == "unreadable"


def test_chunked_audio_validate_needs_a_pass(tmp_path):
    p = _write(tmp_path / "x.wav", _tone(440, 0.5, 16000), 16000, "PCM_16")
    with pytest.raises(RuntimeError, match="one complete pass"):
        ChunkedAudio(p).validate()
    with pytest.raises(AudioError) as info:
        list(ChunkedAudio(tmp_path / "nope.wav"))
    assert info.value.reason == "missing"


def test_a_non_utf8_file_name_is_read(tmp_path):
    # The OS gives such a name as a str with surrogates; soundfile encodes str paths strictly and failed on it.
    good = _write(tmp_path / "good.wav", _tone(440, 0.5, 16000), 16000, "PCM_16")
    name = os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.wav")
    os.rename(good, name)
    np.testing.assert_array_equal(load_audio(name), load_audio(_write(good, _tone(440, 0.5, 16000), 16000,
                                                                     "PCM_16")))

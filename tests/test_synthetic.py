"""Tests of the synthetic corpus generator (tiny sizes: the whole file runs in seconds)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from voiceprint.data.corpus import synthetic
from voiceprint.data.corpus.synthetic import SAMPLE_RATE, generate, speaker_traits

TINY = dict(num_speakers=3, utterances_per_speaker=2, min_seconds=1.0, max_seconds=1.5, seed=7)
COLUMNS = ["path", "speaker", "utterance", "duration", "sample_rate"]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    return out, generate(out, **TINY)


def test_manifest_columns_types_and_order(tiny):
    out, m = tiny
    assert list(m.columns) == COLUMNS
    assert len(m) == 6
    assert all(isinstance(v, str) for col in ("path", "speaker", "utterance") for v in m[col])
    assert m["duration"].dtype == np.float64
    assert pd.api.types.is_integer_dtype(m["sample_rate"]) and (m["sample_rate"] == SAMPLE_RATE).all()
    assert list(m["speaker"]) == ["spk0000"] * 2 + ["spk0001"] * 2 + ["spk0002"] * 2
    assert list(m["utterance"]) == [f"spk{s:04d}-{u:04d}" for s in range(3) for u in range(2)]
    assert list(m["path"]) == [f"{s}/{u}.flac" for s, u in zip(m["speaker"], m["utterance"])]
    assert m.equals(m.sort_values(["speaker", "utterance"], ignore_index=True))


def test_files_match_manifest(tiny):
    out, m = tiny
    # nothing but the manifest's files: temporary files were all renamed
    assert sorted(_files(out)) == sorted(m["path"])
    for row in m.itertuples():
        info = sf.info(out / row.path)
        assert (info.samplerate, info.channels) == (SAMPLE_RATE, 1)
        assert (info.format, info.subtype) == ("FLAC", "PCM_16")
        assert row.duration == pytest.approx(info.frames / SAMPLE_RATE, abs=1e-9)
        # the silence padding is included in the duration, not added on top
        assert TINY["min_seconds"] <= row.duration <= TINY["max_seconds"]


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x**2)))


def test_audio_is_sane(tiny):
    out, m = tiny
    for path in m["path"]:
        y, sr = sf.read(out / path)
        assert y.ndim == 1 and sr == SAMPLE_RATE
        assert np.isfinite(y).all() and np.abs(y).max() <= 1.0
        assert _rms(y) > 1e-3, "silent file"


def test_leading_and_trailing_silence(tiny, tmp_path):
    out, m = tiny
    clean = tmp_path / "clean"
    generate(clean, **TINY, channel=False)
    edge = int(0.05 * SAMPLE_RATE)  # the padding is >= 0.06 s even when shrunk for 1-s files
    for path in m["path"]:
        y, _ = sf.read(clean / path)
        middle = _rms(y[len(y) // 4 : 3 * len(y) // 4])
        # without a channel the padding holds only a -60 dB noise floor ...
        assert _rms(y[:edge]) < 0.01 * middle and _rms(y[-edge:]) < 0.01 * middle
        assert _rms(y[:edge]) > 0.0  # ... but is not digital silence
        # ... with a channel it holds the background noise (SNR >= 10 dB), no speech
        y, _ = sf.read(out / path)
        assert _rms(y[:edge]) < 0.5 * _rms(y[len(y) // 4 : 3 * len(y) // 4])


def test_deterministic_and_independent_of_workers(tiny, tmp_path):
    out, m = tiny
    again = generate(tmp_path / "again", **TINY)
    parallel = generate(tmp_path / "parallel", **TINY, workers=2, progress=True)
    pd.testing.assert_frame_equal(m, again)
    pd.testing.assert_frame_equal(m, parallel)
    reference = _files(out)
    assert _files(tmp_path / "again") == reference
    assert _files(tmp_path / "parallel") == reference


def test_seed_and_channel_change_the_audio(tiny, tmp_path):
    out, m = tiny
    other = generate(tmp_path / "other", **{**TINY, "seed": 8})
    assert _files(tmp_path / "other") != _files(out)
    clean = generate(tmp_path / "clean", **TINY, channel=False)
    # same speech (same lengths), different recording
    pd.testing.assert_frame_equal(m, clean)
    a, _ = sf.read(out / m["path"][0])
    b, _ = sf.read(tmp_path / "clean" / m["path"][0])
    assert len(a) == len(b) and not np.allclose(a, b)
    assert len(other) == len(m)


def test_speaker_traits_differ_and_are_plausible():
    traits = [speaker_traits(3, i) for i in range(8)]
    assert speaker_traits(3, 5) == traits[5]  # deterministic
    assert speaker_traits(4, 5) != traits[5]  # depends on the seed
    for key in ("vtl_scale", "f0_mean_hz", "source_tilt_hz", "breathiness", "speaking_rate", "nasality"):
        values = [t[key] for t in traits]
        assert len(set(values)) == len(values), key
    for t in traits:
        assert 0.8 <= t["vtl_scale"] <= 1.25
        assert 80.0 <= t["f0_mean_hz"] <= 260.0
        assert t["sex"] in ("f", "m")
        assert len(t["formant_offsets"]) == 5 and all(math.isfinite(x) for x in t["formant_offsets"])


def test_speakers_differ_in_their_voices_not_just_labels():
    # Clean utterances of the same speaker are closer in MFCC statistics than those
    # of different speakers: the identity is audible, carried by physiology.
    import librosa

    feats, labels = [], []
    for spk in range(4):
        for utt in range(4):
            y = synthetic._utterance_audio(0, spk, utt, 2.0, 2.0, channel=False).astype(np.float32)
            mfcc = librosa.feature.mfcc(y=y, sr=SAMPLE_RATE, n_mfcc=20, n_fft=400, hop_length=160, n_mels=64)
            feats.append(np.concatenate([mfcc.mean(1), mfcc.std(1)]))
            labels.append(spk)
    z = np.array(feats)
    z = (z - z.mean(0)) / z.std(0)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    sim = z @ z.T
    np.fill_diagonal(sim, -np.inf)
    labels = np.array(labels)
    # leave-one-out nearest neighbour by cosine: chance is 25 %
    assert (labels[sim.argmax(axis=1)] == labels).mean() >= 0.75


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(num_speakers=1), "num_speakers"),
        (dict(num_speakers=2.5), "num_speakers"),
        (dict(utterances_per_speaker=1), "utterances_per_speaker"),
        (dict(min_seconds=0.0), "min_seconds"),
        (dict(min_seconds=-1.0), "min_seconds"),
        (dict(min_seconds=2.0, max_seconds=1.5), "max_seconds"),
        (dict(max_seconds=float("inf")), "max_seconds"),
        (dict(seed=-1), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(workers=0), "workers"),
    ],
)
def test_invalid_arguments_name_the_argument(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        generate(tmp_path / "bad", **{**TINY, **kwargs})
    assert not (tmp_path / "bad").exists()  # validated before anything is written

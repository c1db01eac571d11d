"""The Python API: files embed exactly as in the pipeline; verify, compare, cluster, enrol and identify."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from voiceprint.serving import api  # noqa: E402
from voiceprint.data.audio import AudioError  # noqa: E402
from voiceprint.serving.bundle import ThresholdError, save_bundle  # noqa: E402
from voiceprint.data.corpus.synthetic import generate  # noqa: E402
from voiceprint.core.embedding import embed_features, embed_utterances  # noqa: E402
from voiceprint.features import featurize_file  # noqa: E402
from voiceprint.models import build_rescnn  # noqa: E402
from voiceprint.serving.registry import Registry, RegistryError  # noqa: E402
from voiceprint.data.store import FeatureStore, StoreWriter  # noqa: E402

FEATURES = {"kind": "logmel_cmn", "vad": "original", "sample_rate": 16000, "num_bands": 64, "min_seconds": 0.5,
            "window_frames": 0, "hop_frames": 80}


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    model, _ = build_rescnn(filters=[4, 8, 8, 8], blocks=1, embedding_dim=16, num_bands=64, num_classes=3,
                            dropout=0.0)
    return model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    manifest = generate(root, num_speakers=3, utterances_per_speaker=3, min_seconds=1.0, max_seconds=1.5, seed=0)
    manifest["file"] = [str(root / p) for p in manifest.path]
    return root, manifest


@pytest.fixture(scope="module")
def rec(model, tmp_path_factory):
    path = save_bundle(tmp_path_factory.mktemp("bundle") / "voiceprint", model, system="head", features=FEATURES,
                       thresholds={"eer": 0.5, "low_far": 0.9, "low_far_rate": 0.01}, evaluation={"eer": 0.1})
    return api.Recognizer(path)


@pytest.fixture(scope="module")
def embeddings(rec, corpus):
    return rec.embed_files(corpus[1].file)


def _store(tmp_path, arrays):
    writer = StoreWriter(tmp_path / "store", num_bands=64, kind="logmel_cmn")
    for i, a in enumerate(arrays):
        writer.add(f"u{i}", "s", f"u{i}.flac", a, np.zeros(40, np.float32))
    writer.close()
    return FeatureStore.open(tmp_path / "store")


@pytest.mark.parametrize("window, hop", [(0, 0), (40, 15)])
def test_embed_features_matches_embed_utterances(model, tmp_path, window, hop):
    rng = np.random.default_rng(0)
    lengths = [37, 160, 160, 160, 23, 411, 95]   # repeats batch together; 23 is shorter than the window
    store = _store(tmp_path, [rng.normal(size=(n, 64)).astype(np.float16) for n in lengths])
    feats = [store[i] for i in range(len(store))]
    reference = embed_utterances(model, store, range(len(store)), window_frames=window, hop_frames=hop)
    batched = embed_features(model, feats, window_frames=window, hop_frames=hop)
    alone = embed_features(model, feats, window_frames=window, hop_frames=hop, batch_frames=1)
    assert batched.shape == (7, 16) and batched.dtype == np.float32
    np.testing.assert_allclose(batched, reference, atol=1e-6)
    if window == 0:
        np.testing.assert_array_equal(alone, reference)        # one utterance per call: the very same numbers
        np.testing.assert_array_equal(batched[[0, 4, 5, 6]], reference[[0, 4, 5, 6]])   # unique lengths
    with pytest.raises(ValueError, match="array 1 has shape"):
        embed_features(model, [feats[0], feats[1][:, :32]])


def test_files_embed_as_in_the_pipeline(rec, corpus, embeddings, model, tmp_path):
    files = list(corpus[1].file)
    # The pipeline's path: featurize_file -> float16 feature store -> embed_utterances.
    arrays = [featurize_file(f, "logmel_cmn", sample_rate=16000, min_seconds=0.5, vad="original")[0] for f in files]
    assert len({len(a) for a in arrays}) == len(arrays)   # distinct lengths: each file alone in its batch
    store = _store(tmp_path, arrays)
    np.testing.assert_array_equal(embeddings, embed_utterances(model, store, range(len(store))))
    np.testing.assert_array_equal(rec.embed(files[4]), embeddings[4])


def test_verify_and_compare_agree_with_cosine(rec, corpus, embeddings):
    files = list(corpus[1].file)
    expected = api.cosine(embeddings[0], embeddings[1:])[0]
    scores = rec.compare(files[0], files[1:])
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    result = rec.verify(files[0], files[1])
    assert result.score == pytest.approx(expected[0], abs=1e-6)
    assert (result.threshold, result.threshold_name) == (0.5, "eer")
    assert result.same_speaker == (result.score >= 0.5)
    low = rec.verify(files[0], files[1], threshold=min(expected[0] - 0.01, 1.0))
    high = rec.verify(files[0], files[1], threshold="1.0")
    assert (low.same_speaker, high.same_speaker, low.threshold_name) == (True, False, "explicit")
    assert rec.verify(files[0], files[1], threshold="low_far").threshold == 0.9
    with pytest.raises(ThresholdError):
        rec.verify(files[0], files[1], threshold="strict")


def test_cluster_embeddings_known_groups():
    # Two tight pairs and a fifth vector nearer the second pair (cosine ~0.49) than the first (~0.07).
    e = np.array([[1, 0.1, 0], [0, 1, 0], [1, 0, 0.1], [0, 1, 0.1], [0, 0.5, 1]])
    np.testing.assert_array_equal(api.cluster_embeddings(e, threshold=0.9), [1, 2, 1, 2, 3])
    np.testing.assert_array_equal(api.cluster_embeddings(e, num_speakers=2), [1, 2, 1, 2, 2])
    np.testing.assert_array_equal(api.cluster_embeddings(e, threshold=-1.0), [1, 1, 1, 1, 1])
    np.testing.assert_array_equal(api.cluster_embeddings(e[:1], threshold=0.5), [1])
    with pytest.raises(api.InputError, match=r"--speakers 6 must lie in \[1, 5\]"):
        api.cluster_embeddings(e, num_speakers=6)
    with pytest.raises(ValueError, match="exactly one"):
        api.cluster_embeddings(e)


def test_cluster_files_with_the_calibrated_threshold(rec, corpus, embeddings):
    files = list(corpus[1].file)
    np.testing.assert_array_equal(rec.cluster(files), api.cluster_embeddings(embeddings, threshold=0.5))
    assert rec.cluster(files, num_speakers=3).max() == 3


def test_enroll_and_identify_open_set(rec, corpus, embeddings, tmp_path):
    manifest = corpus[1]
    files = list(manifest.file)
    with Registry(tmp_path / "reg.sqlite") as reg:
        for spk in ("spk0000", "spk0001"):
            result = rec.enroll(reg, spk, [files[i] for i in np.flatnonzero(manifest.speaker == spk)[:2]])
            assert (result.added, result.enrollments) == (2, 2)
        means = {spk: embeddings[np.flatnonzero(manifest.speaker == spk)[:2]].astype(np.float64).mean(axis=0)
                 for spk in ("spk0000", "spk0001")}
        expected = {spk: float(api.cosine(embeddings[2], m)[0, 0]) for spk, m in means.items()}
        best = max(expected, key=expected.get)

        found = rec.identify(reg, files[2], top=2, threshold=-1.0)
        assert (found.speaker, found.known) == (best, True)
        assert [c.speaker for c in found.candidates] == sorted(expected, key=expected.get, reverse=True)
        for c in found.candidates:
            assert c.score == pytest.approx(expected[c.speaker], abs=1e-6)
        closed = rec.identify(reg, files[2], threshold=1.0)
        assert (closed.speaker, closed.known, len(closed.candidates)) == ("unknown", False, 1)
        assert closed.score == pytest.approx(expected[best], abs=1e-6)


def test_identify_refuses_another_models_registry(rec, corpus, tmp_path):
    with Registry(tmp_path / "reg.sqlite") as reg:
        reg.enroll("someone", np.ones((1, 16)), model_sha256="0" * 64, sources=[("/x.flac", "1" * 64)])
        with pytest.raises(RegistryError, match="different models"):
            rec.identify(reg, corpus[1].file[0])


def test_bad_audio_fails_and_enrols_nothing(rec, corpus, tmp_path):
    import soundfile as sf

    short = tmp_path / "short.wav"
    sf.write(short, np.random.default_rng(0).normal(0, 0.1, 3000).astype(np.float32), 16000)
    with pytest.raises(AudioError) as info:
        rec.embed(short)
    assert info.value.reason == "too_short"
    with Registry(tmp_path / "reg.sqlite") as reg:
        with pytest.raises(AudioError, match="short.wav"):
            rec.enroll(reg, "alice", [corpus[1].file[0], short])
        assert reg.speakers() == []


def test_audio_files_expands_directories(corpus, tmp_path):
    root, manifest = corpus
    found = api.audio_files([root / "spk0001", manifest.file[0]])
    assert [str(p) for p in found] == [*manifest.file[3:6], manifest.file[0]]
    (tmp_path / "empty").mkdir()
    with pytest.raises(api.InputError, match="no audio files"):
        api.audio_files([tmp_path / "empty"])
    with pytest.raises(AudioError) as info:
        api.audio_files([tmp_path / "absent.wav"])
    assert info.value.reason == "missing"


def test_audio_files_takes_every_decodable_type_and_follows_links_once(tmp_path):
    import os

    from voiceprint.data.audio import AUDIO_EXTENSIONS

    top, other = tmp_path / "top", tmp_path / "other"
    top.mkdir(), other.mkdir()
    names = sorted(f"f{ext}" for ext in AUDIO_EXTENSIONS) + ["LOUD.WAVE", "notes.txt"]
    for name in names:
        (top / name).write_bytes(b"x")          # listing only: nothing is decoded here
    (other / "a.caf").write_bytes(b"x")
    os.symlink(other, top / "linked")           # a linked folder is followed
    os.symlink(top, top / "loop")               # a link back is not followed again
    skipped = []
    found = api.audio_files([top], skipped=skipped)
    expected = [top / n for n in names if n != "notes.txt"] + [top / "linked" / "a.caf"]
    assert sorted(found) == sorted(expected) and len(found) == len(set(found))
    assert skipped == [top / "notes.txt"] and set(api.AUDIO_SUFFIXES) == AUDIO_EXTENSIONS


def test_the_bundles_vad_reaches_featurize_file(rec, corpus, monkeypatch):
    import voiceprint.features as F

    calls = []

    def recording_featurize_file(path, kind, **kwargs):
        calls.append(kwargs)
        return np.zeros((50, 64), np.float32), np.zeros(40, np.float32)

    monkeypatch.setattr(F, "featurize_file", recording_featurize_file)
    features = rec.bundle.features
    for vad, expected in (("energy", {"vad": "energy"}), ("original", {"vad": "original"}), (None, {})):
        bundle = dataclasses.replace(rec.bundle, features=dataclasses.replace(features, vad=vad))
        api.Recognizer(bundle).features(corpus[1].file[0])
        assert calls.pop() == {"sample_rate": 16000, "min_seconds": 0.5, "max_clipped_fraction": 0.01,
                               "with_mfcc_stats": False, **expected}   # the runtime embeds: no MFCC baseline


def test_a_clipped_file_is_rejected_as_the_pipeline_rejects_it(rec, corpus, tmp_path):
    import soundfile as sf

    from voiceprint.data.audio import AudioError

    wav = np.clip(3.0 * np.sin(np.linspace(0, 2000, 32000)), -1, 1).astype(np.float32)   # ~80% at full scale
    sf.write(tmp_path / "clipped.wav", wav, 16000)
    with pytest.raises(AudioError) as err:
        rec.verify(corpus[1].file[0], tmp_path / "clipped.wav")
    assert err.value.reason == "clipped" and "clipped.wav" in str(err.value)


# ------------------------------------------------------------------------------------------------ AS-norm bundles

@pytest.fixture(scope="module")
def normed(model, tmp_path_factory):
    cohort = np.random.default_rng(1).normal(size=(8, 16)).astype(np.float32)
    path = save_bundle(tmp_path_factory.mktemp("normed") / "voiceprint", model, system="head", features=FEATURES,
                       thresholds={"eer": 0.0, "low_far": 2.0, "low_far_rate": 0.01}, evaluation={"eer": 0.1},
                       score_norm="as_norm", cohort=cohort, cohort_top_n=3)
    return api.Recognizer(path), cohort


def test_verify_and_compare_with_as_norm(normed, rec, corpus, embeddings):
    from voiceprint.evaluation.score_norm import as_norm

    nrec, cohort = normed
    files = list(corpus[1].file)
    raw = api.cosine(embeddings[0], embeddings[1:])[0]
    expected = as_norm(raw, embeddings[:1], embeddings[1:], cohort, 3)
    assert not np.allclose(expected, raw)
    result = nrec.verify(files[0], files[1])
    assert result.score == pytest.approx(expected[0], abs=1e-5)
    assert (result.threshold, result.threshold_name, result.score_norm) == (0.0, "eer", "as_norm")
    assert result.same_speaker == (result.score >= 0.0)
    assert nrec.verify(files[0], files[1], threshold="-5").threshold == -5.0   # normalised scores are unbounded
    np.testing.assert_allclose(nrec.compare(files[0], files[1:]), expected, atol=1e-5)
    # the same model without a cohort scores by cosine, as before
    assert (rec.score_norm, rec.verify(files[0], files[1]).score_norm) == ("none", "none")


def test_identify_with_as_norm(normed, corpus, embeddings, tmp_path):
    from voiceprint.evaluation.score_norm import as_norm

    nrec, cohort = normed
    manifest = corpus[1]
    files = list(manifest.file)
    with Registry(tmp_path / "reg.sqlite") as reg:
        means = {}
        for spk in ("spk0000", "spk0001"):
            rows = np.flatnonzero(manifest.speaker == spk)[:2]
            nrec.enroll(reg, spk, [files[i] for i in rows])
            means[spk] = embeddings[rows].astype(np.float64).mean(axis=0)
        # each speaker's cosine normalised with the cohort statistics of the probe and of that speaker's mean
        expected = {spk: float(as_norm(api.cosine(embeddings[2], m)[0], m, embeddings[2], cohort, 3)[0])
                    for spk, m in means.items()}
        found = nrec.identify(reg, files[2], top=2, threshold=-100.0)
        assert found.score_norm == "as_norm"
        assert [c.speaker for c in found.candidates] == sorted(expected, key=expected.get, reverse=True)
        for c in found.candidates:
            assert c.score == pytest.approx(expected[c.speaker], abs=1e-5)
        assert nrec.identify(reg, files[2], threshold=100.0).speaker == "unknown"


def test_cluster_on_pair_scores_matches_cosine_clustering(normed, corpus, embeddings):
    # Clustering on a score matrix is the cosine clustering when the scores are the cosines (distances shifted).
    cos = api.cosine(embeddings, embeddings)
    for t in (0.9, 0.5, 0.0):
        np.testing.assert_array_equal(api.cluster_embeddings(embeddings, threshold=t, scores=cos),
                                      api.cluster_embeddings(embeddings, threshold=t))
    np.testing.assert_array_equal(api.cluster_embeddings(embeddings, num_speakers=3, scores=cos),
                                  api.cluster_embeddings(embeddings, num_speakers=3))
    nrec, _ = normed
    normed_scores = nrec.scores(embeddings, embeddings)
    np.testing.assert_array_equal(nrec.cluster(list(corpus[1].file), threshold=0.5),
                                  api.cluster_embeddings(embeddings, threshold=0.5, scores=normed_scores))
    assert nrec.cluster(list(corpus[1].file), num_speakers=3).max() == 3


# ------------------------------------------------------------------------------------------------ audio in memory

def test_arrays_and_bytes_embed_exactly_as_their_files(rec, corpus, tmp_path):
    import soundfile as sf

    mono, rate = sf.read(corpus[1].file[0], dtype="int16")
    stereo = np.stack([mono, (mono // 3).astype(np.int16)], axis=1)     # channels differ: the mix-down matters
    path = tmp_path / "stereo_22k.wav"
    sf.write(path, stereo, 22050, subtype="PCM_16")                      # another rate: resampled on the way in
    expected = rec.embed(path)
    as_float, _ = sf.read(path, dtype="float32")                          # soundfile's own (samples, channels)
    np.testing.assert_array_equal(rec.embed_signal(stereo, 22050), expected)          # int16, scaled by 1/32768
    np.testing.assert_array_equal(rec.embed_signal(as_float, 22050), expected)        # float
    np.testing.assert_array_equal(rec.embed_signal(stereo.astype(np.int32) << 16, 22050), expected)   # int32
    np.testing.assert_array_equal(rec.embed(path.read_bytes()), expected)             # encoded content
    np.testing.assert_array_equal(rec.embed(api.Audio(path.read_bytes(), name="x.wav")), expected)
    # mono (samples,) at the model's rate: the untouched corpus file
    np.testing.assert_array_equal(rec.embed_signal(mono, rate), rec.embed(corpus[1].file[0]))


def test_verify_compare_identify_take_arrays_and_bytes(rec, corpus, embeddings, tmp_path):
    import soundfile as sf

    files = list(corpus[1].file)
    arrays = [sf.read(f, dtype="float32") for f in files]     # (samples, rate) tuples
    by_file = rec.verify(files[0], files[1])
    assert rec.verify(arrays[0], Path(files[1]).read_bytes()) == by_file
    np.testing.assert_array_equal(rec.compare(api.Audio(*arrays[0]), arrays[1:4]), rec.compare(files[0], files[1:4]))
    with Registry(tmp_path / "reg.sqlite") as reg:
        assert rec.enroll(reg, "alice", [Path(files[0]).read_bytes(), arrays[1]]).added == 2
        # the same recording as a file: same content hash, not stored twice
        assert rec.enroll(reg, "alice", [files[0]]).already_enrolled == 1
        assert rec.identify(reg, arrays[2], threshold=-1.0) == rec.identify(reg, files[2], threshold=-1.0)


@pytest.mark.parametrize("samples, rate, reason", [
    (np.array([], np.float32), 16000, "empty"),
    (np.zeros((0, 2), np.int16), 16000, "empty"),
    (np.r_[np.full(16000, 0.1), np.nan], 16000, "non_finite"),
    (np.zeros(16000, np.int16), 16000, "silent"),
    (np.clip(3 * np.sin(np.arange(16000) / 3), -1, 1), 16000, "clipped"),
    (np.random.default_rng(0).normal(0, 0.1, 3000), 16000, "too_short"),
    (np.random.default_rng(0).normal(0, 0.1, (2, 16000)), 16000, "unreadable"),       # (channels, samples)
    (np.random.default_rng(0).normal(0, 0.1, (10, 10, 10)), 16000, "unreadable"),
    (np.array(["a", "b"]), 16000, "unreadable"),
    (np.random.default_rng(0).normal(0, 0.1, 16000), 0, "unreadable"),
])
def test_bad_arrays_fail_with_the_reasons_files_get(rec, samples, rate, reason):
    with pytest.raises(AudioError) as info:
        rec.verify((samples, rate), (np.random.default_rng(1).normal(0, 0.1, 16000), 16000))
    assert info.value.reason == reason and str(info.value).startswith("<array 0>: ")


def test_bad_bytes_and_non_audio_inputs(rec):
    with pytest.raises(AudioError) as info:
        rec.embed(b"")
    assert info.value.reason == "empty"
    with pytest.raises(AudioError) as info:
        rec.embed(api.Audio(b"RIFF not really", name="upload.wav"))
    assert (info.value.reason, info.value.path) == ("unreadable", "upload.wav")
    with pytest.raises(api.InputError, match="needs its sample rate"):
        rec.embed(np.zeros(16000))
    with pytest.raises(api.InputError, match="input 1: int is not audio"):
        rec.embed_files([(np.zeros(16000), 16000), 16000])


def test_similarity_of_embeddings(rec, normed, embeddings):
    e = embeddings
    assert api.similarity(e[0], e[1]) == pytest.approx(float(e[0] @ e[1]), abs=1e-6)
    assert api.similarity(2 * e[0], e[0]) == pytest.approx(1.0)
    np.testing.assert_allclose(api.similarity(e[:2], e[2:5]), e[:2] @ e[2:5].T, atol=1e-6)
    assert rec.similarity(e[0], e[1]) == pytest.approx(api.similarity(e[0], e[1]))
    nrec, _ = normed
    assert nrec.similarity(e[0], e[1]) == pytest.approx(float(nrec.scores(e[:1], e[1:2])[0, 0]))

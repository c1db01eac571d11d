"""Training on real speech: added sources, augmented copies beside the store and the
cross-corpus evaluation set."""
import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from voiceprint.data.augment import AugmentSettings
from voiceprint.data.augmented import make_copies, plan
from voiceprint.data.corpus import from_added_source
from voiceprint.data.cross_corpus import has_recordings, load_eval_set
from voiceprint.data.splits import split_utterances, training_inputs
from voiceprint.data.store import FeatureStore, StoreWriter


def test_added_source_speakers_are_training_only():
    rows = [(f"s{s}-{u}", f"s{s}") for s in range(4) for u in range(3)]
    rows += [(f"synthetic:x{s}-{u}", f"synthetic:x{s}") for s in range(30) for u in range(3)]
    index = pd.DataFrame(rows, columns=["utterance", "speaker"])
    for seed in range(20):
        split = split_utterances(index, eval_speakers=3, validation_fraction=0.0, seed=seed)
        assert set(split[split.role == "evaluation"].speaker) <= {"s0", "s1", "s2", "s3"}
    with pytest.raises(ValueError, match="4 of them evaluable"):
        split_utterances(index, eval_speakers=5, validation_fraction=0.0, seed=0)
    assert from_added_source("synthetic:spk0001") and not from_added_source("SPEAKER0001")
    assert not from_added_source("mic:alice")          # only a known source name namespaces a speaker


def _split(rows):
    return pd.DataFrame(rows, columns=["utterance", "speaker", "role", "label", "reason"])


def test_augmentation_plan_copies_only_training_utterances():
    split = _split([("a1", "A", "train", 0, ""), ("a2", "A", "validation", 0, ""), ("b1", "B", "train", 1, ""),
                    ("e1", "E", "evaluation", -1, "")])
    assert plan(split, AugmentSettings()) == []
    copies = plan(split, AugmentSettings(speed_perturb=True, copies=1))
    assert {c.source for c in copies} == {"a1", "b1"}                # never validation or evaluation audio
    by_id = {c.utterance: c for c in copies}
    assert len(copies) == 2 * (1 + 2 * 2)      # per utterance: its aug copy, and per speed the copy + its aug copy
    assert by_id["speed0.9:a1"].label == 0 + 1 * 2 and by_id["speed1.1:b1"].label == 1 + 2 * 2
    assert by_id["speed1.1:b1"].speaker == "speed1.1:B" and not by_id["speed1.1:b1"].augmented
    assert by_id["aug1:a1"].label == 0 and by_id["aug1:a1"].factor == 1.0 and by_id["aug1:a1"].augmented
    assert by_id["aug1:speed0.9:a1"].label == 2 and by_id["aug1:speed0.9:a1"].factor == 0.9


def _tone_files(root, speakers=3, per=3, seconds=1.0):
    rng = np.random.default_rng(0)
    t = np.arange(int(16000 * seconds)) / 16000
    for s in range(speakers):
        (root / f"spk{s}").mkdir(parents=True)
        for u in range(per):
            wav = 0.3 * np.sin(2 * np.pi * (120 + 60 * s) * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
            sf.write(root / f"spk{s}" / f"u{u}.flac", (wav + 0.01 * rng.normal(size=t.size)).astype(np.float32),
                     16000)
    (root / "notes.txt").write_text("not audio")


def test_copies_are_deterministic_and_speed_changes_length(tmp_path):
    _tone_files(tmp_path, speakers=2, per=2)
    split = _split([("a", "A", "train", 0, ""), ("b", "B", "train", 1, "")])
    paths = {"a": str(tmp_path / "spk0/u0.flac"), "b": str(tmp_path / "spk1/u0.flac")}
    settings = AugmentSettings(speed_perturb=True, copies=1, kinds=("noise", "reverb", "babble"))
    runs = [list(make_copies(plan(split, settings), paths, settings, kind="logmel_cmn", vad="original",
                             sample_rate=16000, workers=w)) for w in (1, 2)]
    for (c1, f1, b1, e1), (c2, f2, b2, e2) in zip(*runs):
        assert c1 == c2 and e1 is None and e2 is None
        np.testing.assert_array_equal(f1, f2)                        # same bytes whatever the worker count
    frames = {c.utterance: len(f) for c, f, _, _ in runs[0]}
    assert frames["speed0.9:a"] > frames["aug1:a"] > frames["speed1.1:a"]


def test_a_bad_source_file_fails_its_copies_only(tmp_path):
    _tone_files(tmp_path, speakers=1, per=1)
    split = _split([("a", "A", "train", 0, ""), ("z", "Z", "train", 1, "")])
    paths = {"a": str(tmp_path / "spk0/u0.flac"), "z": str(tmp_path / "notes.txt")}
    settings = AugmentSettings(copies=1, kinds=("noise",))
    out = list(make_copies(plan(split, settings), paths, settings, kind="logmel_cmn", vad="original",
                           sample_rate=16000, workers=1))
    errors = {c.utterance: e for c, _, _, e in out}
    assert errors["aug1:a"] is None and "notes.txt" in errors["aug1:z"]


def _store(directory, ids, value):
    writer = StoreWriter(directory, num_bands=4, kind="test")
    for i, u in enumerate(ids):
        writer.add(u, u[0], f"{u}.flac", np.full((5 + i, 4), value + i, np.float32), np.full(40, value + i))
    writer.close()
    return FeatureStore.open(directory)


def test_union_reads_both_stores_by_position(tmp_path):
    a = _store(tmp_path / "a", ["a1", "a2"], 0.0)
    b = _store(tmp_path / "b", ["b1"], 10.0)
    both = FeatureStore.union(a, b)
    assert len(both) == 3 and list(both.position(["b1", "a2"])) == [2, 1]
    np.testing.assert_array_equal(both[2], np.full((5, 4), 10.0))
    np.testing.assert_array_equal(both.crop(1, 3, None), np.full((3, 4), 1.0))
    np.testing.assert_array_equal(both.baseline[:, 0], [0, 1, 10])
    other = StoreWriter(tmp_path / "c", num_bands=8, kind="test")
    other.close()
    with pytest.raises(ValueError, match="cannot join"):
        FeatureStore.union(a, FeatureStore.open(tmp_path / "c"))


def test_training_inputs_join_the_augmented_copies(tmp_path):
    _store(tmp_path / "features", ["a1", "e1"], 0.0)
    (tmp_path / "inputs").mkdir()
    _split([("a1", "a", "train", 0, ""), ("e1", "e", "evaluation", -1, "")]).to_csv(
        tmp_path / "inputs/utterances.csv", index=False)
    pd.DataFrame(columns=["label", "enroll", "test", "enroll_speaker", "test_speaker"]).to_csv(
        tmp_path / "inputs/trials.csv", index=False)
    store, split = training_inputs(tmp_path / "features", tmp_path / "inputs", tmp_path / "augmented")
    assert len(store) == 2 and len(split) == 2                      # no augment output: the corpus alone
    _store(tmp_path / "augmented", ["speed0.9:a1"], 5.0)
    _split([("speed0.9:a1", "speed0.9:a", "train", 1, "")]).to_csv(tmp_path / "augmented/utterances.csv",
                                                                   index=False)
    store, split = training_inputs(tmp_path / "features", tmp_path / "inputs", tmp_path / "augmented")
    train = split[split.role == "train"]
    assert list(train.label) == [0, 1]
    np.testing.assert_array_equal(store[int(store.position(["speed0.9:a1"])[0])], np.full((5, 4), 5.0))


def test_cross_corpus_set_lists_all_pairs_and_left_out_files(tmp_path):
    assert not has_recordings("") and not has_recordings(tmp_path)
    _tone_files(tmp_path, speakers=3, per=3)
    (tmp_path / "spk2" / "broken.wav").write_bytes(b"RIFF0000WAVEjunk")
    assert has_recordings(tmp_path)
    s = load_eval_set(tmp_path, kind="logmel_cmn", vad="original", sample_rate=16000, min_seconds=0.0, workers=1)
    assert len(s.utterances) == 9 and len(s.features) == 9 and s.baseline.shape == (9, 40)
    assert int(s.trials.label.sum()) == 3 * 3 and int((s.trials.label == 0).sum()) == 36 - 9
    assert set(s.rejected.reason) >= {"not_audio"} and len(s.rejected) == 2   # notes.txt, broken.wav

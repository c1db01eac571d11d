import json

import numpy as np
import pytest

from voiceprint.data.store import FeatureStore, StoreWriter


def test_roundtrip_and_crops(tmp_path):
    w = StoreWriter(tmp_path, num_bands=4, kind="test")
    a = np.arange(40, dtype=np.float32).reshape(10, 4) / 8
    b = np.ones((3, 4), np.float32)
    w.add("u1", "s1", "s1/u1.flac", a, np.zeros(40))
    w.add("u2", "s2", "s2/u2.flac", b, np.ones(40))
    w.close()
    store = FeatureStore.open(tmp_path)
    assert len(store) == 2 and store.kind == "test" and store.num_bands == 4
    np.testing.assert_allclose(store[0], a, atol=1e-3)   # float16 storage
    np.testing.assert_array_equal(store.position(["u2", "u1"]), [1, 0])
    # centred crop of 4 frames out of 10 starts at frame 3
    np.testing.assert_allclose(store.crop(0, 4, None), a[3:7], atol=1e-3)
    # short utterance: zero padded at the end
    crop = store.crop(1, 5, np.random.default_rng(0))
    np.testing.assert_array_equal(crop[:3], b)
    np.testing.assert_array_equal(crop[3:], 0)
    # float16 crops are the stored values themselves: the same window, exactly the float32 crop's values
    for i, length in ((0, 4), (1, 5)):
        half = store.crop(i, length, np.random.default_rng(7), dtype=np.float16)
        assert half.dtype == np.float16
        np.testing.assert_array_equal(half.astype(np.float32), store.crop(i, length, np.random.default_rng(7)))
    rng = np.random.default_rng(1)
    starts = {int(store.crop(0, 4, rng)[0, 0] * 8 // 4) for _ in range(200)}
    assert starts == set(range(7))  # every start 0..6 is reachable
    assert store.baseline.shape == (2, 40)
    with pytest.raises(KeyError, match="'nope'"):
        store.position(["nope"])


def test_missing_store_names_the_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the mfcc stage"):
        FeatureStore.open(tmp_path)


def test_shape_is_checked(tmp_path):
    w = StoreWriter(tmp_path, num_bands=4, kind="test")
    with pytest.raises(ValueError, match="bad.flac"):
        w.add("u", "s", "bad.flac", np.zeros((3, 5)), np.zeros(40))


# --- sharded stores ---------------------------------------------------------------------------------------


def _utterances(count, seed=0):
    """(utterance, speaker, path, features, baseline) with distinct lengths and values."""
    rng = np.random.default_rng(seed)
    return [(f"u{i}", f"s{i % 3}", f"s{i % 3}/u{i}.flac", rng.normal(size=(5 + 3 * i, 4)).astype(np.float32),
             np.full(40, i, np.float32)) for i in range(count)]


def _write(directory, utterances, shard=None, **kwargs):
    w = StoreWriter(directory, num_bands=4, kind="test", meta=kwargs.pop("meta", {"vad": "original"}),
                    shard=shard, **kwargs)
    for u in utterances:
        w.add(*u)
    return w.close()


def test_shards_read_exactly_like_a_single_file_store(tmp_path):
    utts = _utterances(7)
    _write(tmp_path / "single", utts)
    _write(tmp_path / "sharded", utts[:4], shard="train-clean-100")
    _write(tmp_path / "sharded", utts[4:], shard="dev-clean")
    single, sharded = FeatureStore.open(tmp_path / "single"), FeatureStore.open(tmp_path / "sharded")
    assert len(sharded) == 7 and sharded.kind == "test" and sharded.num_bands == 4
    assert list(sharded.index.shard) == ["train-clean-100"] * 4 + ["dev-clean"] * 3
    assert list(sharded.index.offset) == [0, 5, 13, 24, 0, 17, 37]  # rows within each shard's file
    np.testing.assert_array_equal(sharded.baseline, single.baseline)
    np.testing.assert_array_equal(sharded.position(["u6", "u0"]), [6, 0])
    for i in range(7):
        np.testing.assert_array_equal(sharded[i], single[i])
        for length in (4, 30):
            np.testing.assert_array_equal(sharded.crop(i, length, np.random.default_rng(i)),
                                          single.crop(i, length, np.random.default_rng(i)))
    np.testing.assert_allclose(sharded[5], utts[5][3], atol=1e-2)
    meta = json.loads((tmp_path / "sharded" / "store.json").read_text())
    assert meta["shards"] == [{"name": "train-clean-100", "utterances": 4, "frames": 38},
                              {"name": "dev-clean", "utterances": 3, "frames": 60}]
    assert (meta["utterances"], meta["total_frames"], meta["vad"]) == (7, 98, "original")
    with pytest.raises(AttributeError, match="2 shards"):
        sharded.frames


def test_adding_a_shard_leaves_the_others_untouched(tmp_path):
    utts = _utterances(6)
    _write(tmp_path, utts[:3], shard="a")
    first = tmp_path / "shards" / "a.f16"
    before = (first.read_bytes(), first.stat().st_mtime_ns, first.stat().st_ino)
    _write(tmp_path, utts[3:5], shard="b")
    assert (first.read_bytes(), first.stat().st_mtime_ns, first.stat().st_ino) == before
    # rewriting shard "a" (one utterance more) keeps its place: b's utterances keep their positions
    _write(tmp_path, utts[:3] + utts[5:], shard="a")
    store = FeatureStore.open(tmp_path)
    assert list(store.index.utterance) == ["u0", "u1", "u2", "u5", "u3", "u4"]
    np.testing.assert_array_equal(store.position(["u3", "u4"]), [4, 5])
    np.testing.assert_allclose(store[3], utts[5][3], atol=1e-2)
    assert not list((tmp_path / "shards").glob("*.partial"))


def test_shard_errors_name_the_problem(tmp_path):
    utts = _utterances(3)
    _write(tmp_path / "single", utts)
    with pytest.raises(ValueError, match="single-file store"):
        StoreWriter(tmp_path / "single", num_bands=4, kind="test", shard="x")
    _write(tmp_path / "s", utts[:2], shard="a")
    with pytest.raises(ValueError, match="kind is 'test' in the store, 'other'"):
        StoreWriter(tmp_path / "s", num_bands=4, kind="other", meta={"vad": "original"}, shard="b")
    with pytest.raises(ValueError, match="vad is 'original' in the store, 'energy'"):
        StoreWriter(tmp_path / "s", num_bands=4, kind="test", meta={"vad": "energy"}, shard="b")
    with pytest.raises(ValueError, match="'u1' is already in another shard"):
        _write(tmp_path / "s", utts[1:], shard="b")
    with pytest.raises(ValueError, match="shard name '../x'"):
        StoreWriter(tmp_path / "s", num_bands=4, kind="test", shard="../x")
    frames = tmp_path / "s" / "shards" / "a.f16"
    frames.write_bytes(frames.read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"a\.f16: 102 bytes, but .*store\.json says 13 frames x 4 bands"):
        FeatureStore.open(tmp_path / "s")


def test_truncated_single_file_store_is_a_clear_error(tmp_path):
    _write(tmp_path, _utterances(2))
    (tmp_path / "frames.f16").write_bytes(b"")
    with pytest.raises(ValueError, match=r"frames\.f16: 0 bytes, but .*13 frames x 4 bands"):
        FeatureStore.open(tmp_path)


def test_position_names_unknown_and_duplicated_ids(tmp_path):
    utts = _utterances(3)
    _write(tmp_path / "a", utts)
    store = FeatureStore.open(tmp_path / "a")
    np.testing.assert_array_equal(store.position(["u2", "u0", "u2"]), [2, 0, 2])
    with pytest.raises(KeyError, match="'x1'"):
        store.position(["u0", "x1", "x0"])  # the first unknown one, in the order asked
    _write(tmp_path / "b", utts + utts[:1])
    with pytest.raises(ValueError, match="utterance 'u0' appears more than once"):
        FeatureStore.open(tmp_path / "b").position(["u1"])


def test_shard_info_is_kept_for_up_to_date_checks(tmp_path):
    from voiceprint.data.store import shard_entries

    assert shard_entries(tmp_path) == []
    _write(tmp_path, _utterances(2), shard="a", shard_info={"manifest_sha1": "abc"})
    _write(tmp_path, _utterances(4)[2:], shard="b")
    assert shard_entries(tmp_path) == [{"manifest_sha1": "abc", "name": "a", "utterances": 2, "frames": 13},
                                       {"name": "b", "utterances": 2, "frames": 25}]
    _write(tmp_path / "single", _utterances(1))
    assert shard_entries(tmp_path / "single") == []


def test_a_store_records_its_feature_settings_and_reads_them_back(tmp_path):
    from voiceprint.core.contracts import FeatureParams
    from voiceprint.features import FeatureSettings

    settings = FeatureParams(kind="fbank_norm", min_seconds=1.5, vad="energy").settings(sample_rate=8000,
                                                                                         num_bands=4)
    w = StoreWriter.for_features(tmp_path / "new", settings)
    w.add("u1", "s1", "s1/u1.flac", np.ones((3, 4), np.float32), np.zeros(40))
    w.close()
    meta = json.loads((tmp_path / "new" / "store.json").read_text())
    assert {k: meta[k] for k in ("kind", "num_bands", "vad", "sample_rate", "min_seconds")} == {
        "kind": "fbank_norm", "num_bands": 4, "vad": "energy", "sample_rate": 8000, "min_seconds": 1.5}
    read = FeatureStore.open(tmp_path / "new").features
    assert read == FeatureSettings("fbank_norm", 8000, 4, 1.5, 0, 80, "energy")
    assert settings.featurize_kwargs() == {"sample_rate": 8000, "min_seconds": 1.5, "vad": "energy",
                                           "max_clipped_fraction": 0.01}
    # a store from before the meta keys: the values then in use
    old = StoreWriter(tmp_path / "old", num_bands=4, kind="logmel_cmn")
    old.add("u1", "s1", "s1/u1.flac", np.ones((3, 4), np.float32), np.zeros(40))
    old.close()
    assert FeatureStore.open(tmp_path / "old").features == FeatureSettings("logmel_cmn", 16000, 4, 0.0, 0, 80,
                                                                           "original")

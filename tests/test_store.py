import numpy as np
import pytest

from voiceprint.store import FeatureStore, StoreWriter


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

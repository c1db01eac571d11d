"""Training loops on a tiny random feature store: they run, report per-epoch history, and are reproducible."""
import dataclasses

import numpy as np
import pandas as pd
import pytest

from voiceprint.core.contracts import HeadSettings, SoftmaxSettings, TripletSettings
from voiceprint.core.runtime import configure_tensorflow
from voiceprint.data.store import FeatureStore, StoreWriter

TINY_MODEL = dict(filters=[4, 8, 8, 8], blocks=1, embedding_dim=8, frames=32, dropout=0.1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    rng = np.random.default_rng(0)
    writer = StoreWriter(root, num_bands=64, kind="test")
    rows = []
    for s in range(6):
        centre = rng.normal(size=64)
        for u in range(4):
            feats = centre + 0.5 * rng.normal(size=(int(rng.integers(20, 60)), 64))
            writer.add(f"s{s}-{u}", f"s{s}", f"s{s}/{u}.flac", feats, rng.normal(size=40))
            role = "evaluation" if s >= 4 else ("validation" if u == 0 else "train")
            rows.append((f"s{s}-{u}", f"s{s}", role, s if s < 4 else -1, ""))
    writer.close()
    split = pd.DataFrame(rows, columns=["utterance", "speaker", "role", "label", "reason"])
    return FeatureStore.open(root), split


def _weights(model):
    return b"".join(np.asarray(w).tobytes() for w in model.weights)


def test_softmax_training_is_reproducible(tiny):
    from voiceprint.training.fit import train_softmax

    store, split = tiny
    runs = []
    for _ in range(2):
        configure_tensorflow(5)
        runs.append(train_softmax(store, split, SoftmaxSettings(epochs=2, batch_size=4, lr=1e-3, seed=5, **TINY_MODEL),
                                  verbose=0))
    assert _weights(runs[0].model) == _weights(runs[1].model)
    history = runs[0].history
    assert list(history.epoch) == [1, 2]
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(history.columns)
    configure_tensorflow(6)
    other = train_softmax(store, split, SoftmaxSettings(epochs=2, batch_size=4, lr=1e-3, seed=6, **TINY_MODEL),
                          verbose=0)
    assert _weights(other.model) != _weights(runs[0].model)


def test_triplet_and_head_training(tiny):
    from voiceprint.training.fit import train_head, train_softmax, train_triplet

    store, split = tiny
    configure_tensorflow(1)
    base = train_softmax(store, split, SoftmaxSettings(epochs=1, batch_size=4, lr=1e-3, seed=1, **TINY_MODEL),
                         verbose=0).model
    before = _weights(base)
    triplet = TripletSettings(alpha=0.5, epochs=2, steps_per_epoch=3, speakers_per_batch=3, utterances_per_speaker=2,
                              frames=32, lr=1e-3, seed=1)
    trained = train_triplet(base, store, split, triplet, verbose=0)
    assert _weights(trained.model) != before
    assert list(trained.history.columns[:2]) == ["epoch", "loss"]
    same = train_triplet(trained.model, store, split, dataclasses.replace(triplet, epochs=0), verbose=0)
    assert same.model is trained.model and len(same.history) == 0     # epochs=0: evaluate as it is
    frozen = _weights(trained.model)
    for kind in ("dense", "frame"):
        for loss in ("softmax", "aam_softmax", "triplet"):
            head = train_head(trained.model, store, split, HeadSettings(epochs=2, loss=loss, kind=kind, **HEAD),
                              verbose=0)
            out = head.model.predict(np.zeros((2, 40, 64, 1), "float32"), verbose=0)
            assert out.shape == (2, 4)
            np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
            assert len(head.history) == 2 and np.isfinite(head.history.loss).all()
            assert ("accuracy" in head.history) == (loss != "triplet")
    # the base stays frozen under the head (BatchNorm statistics included)
    assert _weights(trained.model) == frozen


HEAD = dict(units=8, layers=1, dropout=0.1, output_dim=4, contexts=[[-1, 0, 1], [0]], lr=1e-3,
            batch_size=8, crops_per_utterance=2, utterances_per_speaker=2, frames=32, alpha=0.2, margin=0.2,
            scale=10.0, train_trunk=False, trunk_lr=1e-4, seed=1)


def test_head_training_is_reproducible_and_trunk_training_moves_only_a_copy(tiny):
    from voiceprint.training.fit import train_head, train_softmax

    store, split = tiny
    configure_tensorflow(2)
    base = train_softmax(store, split, SoftmaxSettings(epochs=1, batch_size=4, lr=1e-3, seed=2, **TINY_MODEL),
                         verbose=0).model
    runs = []
    for _ in range(2):
        configure_tensorflow(2)
        runs.append(train_head(base, store, split, HeadSettings(kind="frame", loss="aam_softmax", epochs=2, **HEAD),
                               verbose=0))
    assert _weights(runs[0].head.head) == _weights(runs[1].head.head)
    assert runs[0].head.tap == "frames" and runs[0].head.trunk is None      # a frozen trunk is not the head's
    pd.testing.assert_frame_equal(runs[0].history, runs[1].history)

    base_weights = _weights(base)
    joint = train_head(base, store, split, HeadSettings(kind="dense", loss="softmax", epochs=1,
                                                        **{**HEAD, "train_trunk": True}), verbose=0)
    trunk = joint.model.get_layer("rescnn")
    assert trunk is not base and _weights(trunk) != base_weights    # a copy of the trunk trained jointly ...
    assert not trunk.trainable                                      # ... and is frozen again in the result
    assert _weights(base) == base_weights                           # the caller's base did not move
    assert joint.head.trunk is trunk                                # the trained trunk is saved with the head


def test_softmax_starts_from_an_original_format_checkpoint(tiny, tmp_path):
    from voiceprint.models import build_rescnn
    from voiceprint.training.original_h5 import export_original_weights
    from voiceprint.training.fit import train_softmax

    store, split = tiny
    configure_tensorflow(3)
    source, _ = build_rescnn(filters=TINY_MODEL["filters"], blocks=1, embedding_dim=8)
    for w in source.weights:
        w.assign(np.random.default_rng(0).normal(size=w.shape).astype("float32") * 0.1 + (w.name == "moving_variance"))
    export_original_weights(source, tmp_path / "init.h5")
    trained = train_softmax(store, split, SoftmaxSettings(epochs=1, batch_size=4, lr=1e-12, seed=3, **TINY_MODEL),
                            verbose=0, init_checkpoint=tmp_path / "init.h5")
    kernel = trained.model.get_layer("affine").kernel
    np.testing.assert_allclose(np.asarray(kernel), np.asarray(source.get_layer("affine").kernel), atol=1e-6)


def test_speaker_batches_without_shuffle_are_the_same_every_epoch(tiny):
    from voiceprint.training.batching import SpeakerBatches, VectorSpeakerBatches

    store, split = tiny
    rows = split[split.role == "train"]
    positions, labels = store.position(rows.utterance), rows.label.to_numpy()
    vectors = np.random.default_rng(0).normal(size=(len(labels), 5))
    settings = dict(speakers_per_batch=3, utterances_per_speaker=2, steps=3, seed=4)
    makers = (lambda **kw: SpeakerBatches(store, positions, labels, frames=32, **settings, **kw),
              lambda **kw: VectorSpeakerBatches(vectors, labels, **settings, **kw))
    for make in makers:
        fixed, shuffled = make(shuffle=False), make()
        before = [fixed[i] for i in range(3)], [shuffled[i] for i in range(3)]
        fixed.on_epoch_end()
        shuffled.on_epoch_end()
        for i in range(3):
            np.testing.assert_array_equal(fixed[i][0], before[0][i][0])
            np.testing.assert_array_equal(fixed[i][1], before[0][i][1])
        assert any(not np.array_equal(shuffled[i][0], before[1][i][0]) for i in range(3))

    # Training batches are drawn from (seed, epoch, batch) as before, so default results stay bit-identical.
    batches = VectorSpeakerBatches(vectors, labels, **settings)
    batches.epoch = 3
    rng = np.random.default_rng([4, 3, 1])
    speakers = rng.choice(batches.classes, size=3, replace=False)
    picked = np.concatenate([rng.choice(batches.by_speaker[int(s)], size=2,
                                        replace=len(batches.by_speaker[int(s)]) < 2) for s in speakers])
    np.testing.assert_array_equal(batches[1][0], vectors[picked])
    np.testing.assert_array_equal(batches[1][1], np.repeat(speakers, 2))


def test_triplet_validation_batches_are_fixed_across_epochs(tiny, monkeypatch):
    import voiceprint.training.fit as T

    store, split = tiny
    seen = {}

    def fit(trainer, train, val, **kwargs):
        seen["train"], seen["val"] = train, val
        return pd.DataFrame({"epoch": [1], "loss": [0.0]})

    monkeypatch.setattr(T, "_fit", fit)
    configure_tensorflow(1)
    model, _ = T.build_rescnn(filters=TINY_MODEL["filters"], blocks=1, embedding_dim=8, num_bands=64)
    T.train_triplet(model, store, split, TripletSettings(alpha=0.5, epochs=2, steps_per_epoch=5, speakers_per_batch=2,
                                                         utterances_per_speaker=2, frames=32, lr=1e-3, seed=1),
                    verbose=0)
    val, train = seen["val"], seen["train"]
    first = T._at_counter(val, T._validation_counter(0))[0]
    second = T._at_counter(val, T._validation_counter(1))[0]
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(T._at_counter(train, T._train_counter(0))[0][0],
                              T._at_counter(train, T._train_counter(1))[0][0])

    # the same for a triplet-loss head: its validation batches come from array_batches(shuffle=False)
    head_val = T.array_batches(np.zeros((8, 3)), np.repeat([0, 1], 4), loss="triplet", batch_size=4,
                               utterances_per_speaker=2, steps=1, seed=2, shuffle=False)
    assert head_val.shuffle is False


def test_aam_softmax_pretraining_trains_a_cosine_classifier(tiny):
    from voiceprint.training.fit import train_softmax

    store, split = tiny
    configure_tensorflow(3)
    masked = []

    def mask(crops, rng):
        masked.append(len(crops))
        return crops

    trained = train_softmax(store, split, SoftmaxSettings(**TINY_MODEL, epochs=3, batch_size=8, lr=0.01, seed=1,
                                                          loss="aam_softmax", margin=0.1, scale=10.0,
                                                          lr_schedule="cosine"), crop_transform=mask, verbose=0)
    assert len(trained.history) == 3 and np.isfinite(trained.history.loss).all()
    assert trained.history.loss.iloc[-1] < trained.history.loss.iloc[0]
    assert sum(masked) >= 3 * int((split.role == "train").sum())     # every training crop went through it
    with pytest.raises(ValueError, match="learning-rate schedule"):
        train_softmax(store, split, SoftmaxSettings(**TINY_MODEL, epochs=1, batch_size=8, lr=0.01, seed=1,
                                                    lr_schedule="steps"))

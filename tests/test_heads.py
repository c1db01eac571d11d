"""Heads, their losses and fusion; and the guard against the original TDNN failure (a head that silently costs
recognition must show up as a large ``head_minus_base_eer`` and a warning)."""
import keras
import numpy as np
import pytest

from voiceprint.evaluation import metrics
from voiceprint.evaluation.scoring import fuse, guard_against_base
from voiceprint.losses import get_loss
from voiceprint.models import StatisticsPooling, build_head, context_to_conv, frame_tdnn
from voiceprint.core.params import Params, ParamsError
from voiceprint.core.runtime import configure_tensorflow


def test_contexts_map_to_kernel_and_dilation():
    assert context_to_conv([-2, -1, 0, 1, 2]) == (5, 1)
    assert context_to_conv([-3, 0, 3]) == (3, 3)
    assert context_to_conv([0]) == (1, 1)
    for bad in ([-1, 0, 2], [0, 1], [-3, -1, 0, 1, 3], []):
        with pytest.raises(ValueError):
            context_to_conv(bad)
    with pytest.raises(ParamsError, match="tdnn.contexts.*symmetric"):
        Params({"tdnn": {"contexts": [[0], [0, 1]]}}).section("tdnn").int_lists("contexts", check=context_to_conv)


def test_statistics_pooling_is_mean_and_std_over_time():
    x = np.array([[[1.0, 0.0], [3.0, 0.0], [5.0, 6.0]]], "float32")
    out = np.asarray(StatisticsPooling()(x))
    np.testing.assert_allclose(out, [[3.0, 2.0, np.sqrt(8 / 3), np.sqrt(8.0)]], rtol=1e-4)


def test_frame_tdnn_embeds_any_length_and_survives_safe_mode_saving(tmp_path):
    configure_tensorflow(0)
    head = frame_tdnn(input_dim=12, units=8, layers_count=1, dropout=0.0, output_dim=5,
                      contexts=[[-2, 0, 2], [-1, 0, 1], [0]])
    assert head.get_layer("tdnn_frame_0").dilation_rate == (2,)
    assert head.get_layer("tdnn_frame_2").filters == 24           # last frame layer 3 x units, as the x-vector
    for steps in (1, 3, 40):
        assert head(np.ones((2, steps, 12), "float32")).shape == (2, 5)
    head.save(tmp_path / "h.keras")
    again = keras.saving.load_model(tmp_path / "h.keras", safe_mode=True)
    x = np.random.default_rng(0).normal(size=(3, 7, 12)).astype("float32")
    np.testing.assert_allclose(np.asarray(again(x)), np.asarray(head(x)), atol=1e-6)


def test_aam_softmax_known_values():
    cos = np.array([[0.6, 0.2, -0.1]], "float32")
    # no margin, unit scale: plain cross-entropy on the cosines
    plain = float(get_loss("aam_softmax", margin=0.0, scale=1.0)(np.array([0]), cos))
    assert plain == pytest.approx(-np.log(np.exp(0.6) / np.exp(cos).sum()), rel=1e-5)
    # margin 0.3, scale 10: target logit 10 cos(acos(0.6) + 0.3)
    target = np.cos(np.arccos(0.6) + 0.3)
    logits = 10 * np.array([target, 0.2, -0.1])
    expected = -np.log(np.exp(logits[0]) / np.exp(logits).sum())
    assert float(get_loss("aam_softmax", margin=0.3, scale=10.0)(np.array([0]), cos)) == pytest.approx(expected,
                                                                                                      rel=1e-5)
    # settings a loss does not take are ignored; unknown names fail clearly
    assert float(get_loss("softmax", alpha=0.1, margin=0.2)(np.array([0]), cos)) > 0
    with pytest.raises(ValueError, match="aam_softmax"):
        get_loss("arcface")


def test_fusion_embeddings_score_like_the_fused_cosines():
    rng = np.random.default_rng(1)
    base, head = rng.normal(size=(6, 8)), rng.normal(size=(6, 3))
    unit = lambda e: e / np.linalg.norm(e, axis=1, keepdims=True)  # noqa: E731
    cos_b, cos_h = unit(base) @ unit(base).T, unit(head) @ unit(head).T
    for fusion, w in (("concat", 0.5), ("score", 0.8), ("score", 0.0)):
        fused = fuse(base, head, fusion, w)
        np.testing.assert_allclose(fused @ fused.T, w * cos_b + (1 - w) * cos_h, atol=1e-6)
    np.testing.assert_allclose(fuse(base, head, "concat"), fuse(base, head, "score", 0.5))
    assert fuse(base, head, "none") is None
    with pytest.raises(ValueError, match="fusion"):
        fuse(base, head, "mean")


# --- the original failure, reproduced on purpose --------------------------------------------------------------
MIX = np.random.default_rng(42).normal(size=(16, 64))


def _speakers(n_speakers, per_speaker, rng):
    """Base 'embeddings': 8 speaker factors and 8 nuisance (channel) factors mixed into 64 dimensions, so a
    head trained to separate speakers can beat the base by discarding the nuisance."""
    speaker = np.repeat(rng.normal(size=(n_speakers, 8)), per_speaker, axis=0)
    nuisance = 0.7 * rng.normal(size=(len(speaker), 8))
    x = np.concatenate([speaker, nuisance], axis=1) @ MIX + 0.1 * rng.normal(size=(len(speaker), 64))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype("float32"), np.repeat(np.arange(n_speakers),
                                                                                      per_speaker)


def _report(embeddings, labels):
    e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    pairs = np.triu_indices(len(labels), 1)
    scores, same = (e @ e.T)[pairs], (labels[:, None] == labels[None, :])[pairs]
    return {"eer": metrics.eer(scores, same.astype(int))[0]}


@pytest.fixture(scope="module")
def speaker_vectors():
    rng = np.random.default_rng(0)
    return _speakers(100, 10, rng), _speakers(10, 20, rng)


def _original_conv1d_head():
    """The author's first 'TDNN': Conv1D over the 512 numbers of the embedding as if they were time."""
    L = keras.layers
    return keras.Sequential([keras.Input((64, 1)), L.Conv1D(64, 3, activation="relu"), L.MaxPooling1D(2),
                             L.Conv1D(128, 3, activation="relu"), L.MaxPooling1D(2),
                             L.Conv1D(256, 3, activation="relu"), L.GlobalAveragePooling1D(), L.Dense(128)])


def test_guard_exposes_the_original_failure_and_passes_proper_heads(speaker_vectors, capsys):
    from voiceprint.training.fit import array_batches, fit_head

    configure_tensorflow(0)
    (x_train, y_train), (x_eval, y_eval) = speaker_vectors
    report = {"base": _report(x_eval, y_eval)}
    assert 0.03 < report["base"]["eer"] < 0.3

    failures = {}
    untrained = _original_conv1d_head()
    failures["untrained conv1d over the embedding"] = untrained.predict(x_eval[..., None], verbose=0)
    mse = build_head("dense", input_dim=64, units=64, layers_count=2, dropout=0.5, output_dim=32)
    mse.compile(optimizer="adam", loss="mse")              # the author's second head: MSE against nothing
    # The outputs shrink towards zero; what is left of their direction is less and less about the speaker.
    mse.fit(x_train, np.zeros((len(x_train), 32)), epochs=100, batch_size=64, verbose=0)
    failures["dense trained with MSE against zeros"] = mse.predict(x_eval, verbose=0)
    for name, emb in failures.items():
        deltas, warnings = guard_against_base({**report, "head": _report(emb, y_eval)})
        print(f"{name}: head EER {report['base']['eer'] + deltas['head_minus_base_eer']:.3f}")
        assert deltas["head_minus_base_eer"] > 0.1 and len(warnings) == 1 and "WORSE" in warnings[0], name

    for loss in ("softmax", "aam_softmax", "triplet"):
        head = build_head("dense", input_dim=64, units=64, layers_count=2, dropout=0.2, output_dim=32)
        train = array_batches(x_train, y_train, loss=loss, batch_size=64, utterances_per_speaker=4,
                              steps=len(x_train) // 64, seed=0)
        fit_head(head, train, None, loss=loss, num_classes=100, lr=1e-3, epochs=20, verbose=0, alpha=0.2,
                 margin=0.2, scale=30.0)
        deltas, warnings = guard_against_base({**report, "head": _report(head.predict(x_eval, verbose=0),
                                                                          y_eval)})
        assert deltas["head_minus_base_eer"] < 0 and "WORSE" not in warnings[0], loss


def test_heads_registry():
    dense = build_head("dense", input_dim=6, units=4, layers_count=1, dropout=0.0, output_dim=2,
                       contexts=[[0]])                  # settings a head does not take are not passed to it
    assert dense.output_shape == (None, 2)
    with pytest.raises(ValueError, match="dense, frame"):
        build_head("lstm", input_dim=6)


@pytest.mark.parametrize("kind", ["dense", "frame"])
def test_fused_model_is_one_trunk_pass_and_outputs_the_fused_embedding(tmp_path, kind):
    from voiceprint.models import attach_head, base_and_head, build_rescnn, fuse_models, head_tap, tap_model
    from voiceprint.models import split_base_and_head

    configure_tensorflow(0)
    base, _ = build_rescnn(filters=[4, 4, 4, 4], blocks=0, embedding_dim=6)
    tap = head_tap(kind)
    head = build_head(kind, input_dim=tap_model(base, tap).output_shape[-1], units=5, layers_count=1, dropout=0.0,
                      output_dim=3, contexts=[[-1, 0, 1], [0]])
    fused = fuse_models(base, head, 0.8, tap)
    x = np.random.default_rng(0).normal(size=(4, 48, 64, 1)).astype("float32")
    base_emb, head_emb = np.asarray(base(x)), np.asarray(attach_head(base, head, tap)(x))
    expected = fuse(base_emb, head_emb, "score", 0.8)
    np.testing.assert_allclose(np.asarray(fused(x)), expected, atol=1e-6)
    # one trunk: the fused model holds the base's weights once, plus the head's
    assert fused.count_params() == base.count_params() + head.count_params()
    convs = [w for w in fused.weights if "conv" in w.path and w.path.endswith("kernel")]
    assert len(convs) == len([w for w in base.weights if "conv" in w.path and w.path.endswith("kernel")])
    both = split_base_and_head(np.asarray(base_and_head(base, head, tap)(x)), 6)
    np.testing.assert_allclose(both[0], base_emb, atol=1e-6)
    np.testing.assert_allclose(both[1], head_emb, atol=1e-6)
    fused.save(tmp_path / "fused.keras")              # standard layers only: loads in safe mode
    again = keras.saving.load_model(tmp_path / "fused.keras", safe_mode=True)
    np.testing.assert_allclose(np.asarray(again(x)), expected, atol=1e-6)


def test_head_is_saved_alone_with_its_tap_and_a_trained_trunk_only_when_there_is_one(tmp_path):
    from voiceprint.core.errors import DataError, MissingFileError
    from voiceprint.models import build_rescnn, tap_model
    from voiceprint.models.trained_head import TrainedHead, load_head, save_head

    configure_tensorflow(0)
    base, _ = build_rescnn(filters=[4, 4, 4, 4], blocks=0, embedding_dim=6)
    head = build_head("frame", input_dim=tap_model(base, "frames").output_shape[-1], units=5, layers_count=1,
                      dropout=0.0, output_dim=3, contexts=[[0]])
    x = np.random.default_rng(1).normal(size=(2, 40, 64, 1)).astype("float32")
    save_head(tmp_path / "frozen", TrainedHead(head, "frame", "frames"))
    assert sorted(p.name for p in (tmp_path / "frozen").iterdir()) == ["head.json", "head.keras"]
    frozen = load_head(tmp_path / "frozen")
    assert (frozen.kind, frozen.tap, frozen.trunk) == ("frame", "frames", None)
    np.testing.assert_allclose(np.asarray(frozen.fused(base, 0.5)(x)),
                               np.asarray(TrainedHead(head, "frame", "frames").fused(base, 0.5)(x)), atol=1e-6)
    own_trunk, _ = build_rescnn(filters=[4, 4, 4, 4], blocks=0, embedding_dim=6)
    save_head(tmp_path / "joint", TrainedHead(head, "frame", "frames", own_trunk))
    joint = load_head(tmp_path / "joint")
    assert (tmp_path / "joint" / "trunk.keras").is_file()
    conv_kernels = [w for w in base.weights if "conv" in w.path and w.path.endswith("kernel")]
    assert len([w for w in joint.fused(base, 0.5).weights if "conv" in w.path and w.path.endswith("kernel")]) \
        == 2 * len(conv_kernels)                        # its own trained trunk runs beside the base's
    np.testing.assert_allclose(np.asarray(joint.system(base)(x)),
                               np.asarray(TrainedHead(head, "frame", "frames", own_trunk).system(base)(x)), atol=1e-6)
    (tmp_path / "frozen" / "head.json").write_text('{"kind": "frame", "tap": "time"}')
    with pytest.raises(DataError, match="head.json"):
        load_head(tmp_path / "frozen")
    with pytest.raises(MissingFileError, match="tdnn_head"):
        load_head(tmp_path / "nothing")


def test_paired_interval_of_the_eer_difference():
    import pandas as pd

    from voiceprint.evaluation.scoring import paired_eer_difference_ci

    rng = np.random.default_rng(3)
    rows = [(f"s{i}", f"s{j}", int(i == j)) for i in range(12) for j in range(12) for _ in range(3)]
    trials = pd.DataFrame(rows, columns=["enroll_speaker", "test_speaker", "label"])
    labels = trials.label.to_numpy()
    base = labels * 1.0 + rng.normal(0, 0.6, len(labels))
    report = {"base": {"eer": metrics.eer(base, labels)[0]}}
    # the same system: difference exactly 0 in every replicate
    assert paired_eer_difference_ci(base, base, trials, n_boot=50, seed=0) == (0.0, 0.0)
    worse = base + rng.normal(0, 1.5, len(labels))      # much noisier scores
    report["head"] = {"eer": metrics.eer(worse, labels)[0]}
    deltas, lines = guard_against_base(report, scores={"base": base, "head": worse}, trials=trials,
                                       bootstrap=100, seed=0)
    assert deltas["head_minus_base_eer_ci95_low"] > 0 and "significantly worse" in lines[0]
    assert deltas["head_minus_base_eer_ci95_low"] <= deltas["head_minus_base_eer"] <= \
        deltas["head_minus_base_eer_ci95_high"]


def test_paired_interval_refuses_fewer_replicates_than_asked_like_the_eer_interval():
    """4 speakers; target trials only between s0 and s1, non-target trials only between s2 and s3: a replicate is
    usable only when its draw holds all four (4!/4^4 = 9.4% of draws). Here the 10 x n_boot draws give 191 usable
    replicates of the 200 asked: the paired interval used to be computed from them without a word."""
    import pandas as pd

    from voiceprint.core.errors import VoiceprintError
    from voiceprint.evaluation.scoring import paired_eer_difference_ci

    rows = [("s0", "s1", 1)] * 20 + [("s2", "s3", 0)] * 20
    trials = pd.DataFrame(rows, columns=["enroll_speaker", "test_speaker", "label"])
    labels = trials.label.to_numpy()
    scores = labels + np.random.default_rng(0).normal(0, 1.0, len(labels))
    with pytest.raises(ValueError, match="too few speakers"):
        metrics.bootstrap_eer_ci(scores, labels, trials.enroll_speaker, trials.test_speaker, n_boot=200, seed=1)
    with pytest.raises(VoiceprintError, match=r"only 191 of 200 replicates"):
        paired_eer_difference_ci(scores, scores[::-1].copy(), trials, n_boot=200, seed=1)

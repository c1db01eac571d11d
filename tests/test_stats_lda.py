"""The MFCC-statistics LDA branch: the projection against hand-computed and scikit-learn answers, the joint
embedding's cosine, its file, and a bundle that carries it (the API then embeds with it)."""
from __future__ import annotations

import numpy as np
import pytest

from voiceprint.evaluation.stats_lda import StatsLda, StatsLdaError, fit_stats_lda, load_stats_lda


def _two_speakers():
    # Speakers differ along x only; the within-speaker spread is the same (+-1) on both axes.
    offsets = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], float)
    stats = np.vstack([offsets + [5, 0], offsets + [-5, 0]])
    return stats, np.array(["a"] * 4 + ["b"] * 4)


def test_lda_direction_and_scale_by_hand():
    stats, speakers = _two_speakers()
    lda = fit_stats_lda(stats, speakers, weight=0.5)
    # one direction (2 speakers - 1), along x; S_w = I (population covariance of +-1) so W^T S_w W = 1 -> |w| = 1
    assert lda.projection.shape == (2, 1)
    np.testing.assert_allclose(lda.projection[:, 0], [1.0, 0.0], atol=1e-5)
    np.testing.assert_allclose(lda.mean, [0.0, 0.0])
    projected = lda.project(stats)          # unit vectors of +-x_centred: sign of the speaker
    np.testing.assert_allclose(projected[:, 0], [1] * 4 + [-1] * 4)


def test_projection_matches_scikit_learn_up_to_sign_and_scale():
    sklearn = pytest.importorskip("sklearn.discriminant_analysis")
    rng = np.random.default_rng(0)
    means = rng.normal(size=(12, 6)) * 3
    speakers = np.repeat(np.arange(12), 8)
    stats = means[speakers] + rng.normal(size=(96, 6)) @ rng.normal(size=(6, 6))
    ours = fit_stats_lda(stats, speakers, weight=0.0, dim=4).projection
    theirs = sklearn.LinearDiscriminantAnalysis(solver="eigen", n_components=4).fit(stats, speakers).scalings_[:, :4]
    for j in range(4):
        cos = ours[:, j] @ theirs[:, j] / np.linalg.norm(ours[:, j]) / np.linalg.norm(theirs[:, j])
        assert abs(cos) == pytest.approx(1.0, abs=1e-6)


def test_joint_cosine_is_the_weighted_sum_of_branch_cosines():
    rng = np.random.default_rng(1)
    stats, speakers = rng.normal(size=(30, 5)), np.repeat(np.arange(6), 5)
    lda = fit_stats_lda(stats, speakers, weight=0.3)
    emb = rng.normal(size=(30, 8))
    joint = lda.joint(emb, stats)
    assert joint.dtype == np.float32 and joint.shape == (30, 8 + lda.output_dim)
    np.testing.assert_allclose(np.linalg.norm(joint, axis=1), 1.0, atol=1e-6)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    lda_vectors = lda.project(stats)
    expected = 0.7 * unit @ unit.T + 0.3 * lda_vectors @ lda_vectors.T
    np.testing.assert_allclose(joint @ joint.T, expected, atol=1e-5)


def test_file_round_trip_and_refusals(tmp_path):
    stats, speakers = _two_speakers()
    lda = fit_stats_lda(stats, speakers, weight=0.25)
    lda.save(tmp_path / "s.npz")
    back = load_stats_lda(tmp_path / "s.npz")
    assert back.weight == 0.25 and back.sha256() == lda.sha256()
    np.testing.assert_array_equal(back.projection, lda.projection)
    (tmp_path / "bad.npz").write_bytes(b"not numpy")
    with pytest.raises(StatsLdaError, match="bad.npz: not a statistics LDA file"):
        load_stats_lda(tmp_path / "bad.npz")
    np.savez(tmp_path / "nan.npz", mean=np.array([np.nan, 0]), projection=np.eye(2), weight=0.5)
    with pytest.raises(StatsLdaError, match="nan.npz: non-finite"):
        load_stats_lda(tmp_path / "nan.npz")


def test_fit_refuses_what_it_cannot_fit():
    stats, speakers = _two_speakers()
    with pytest.raises(StatsLdaError, match=">= 2 speakers"):
        fit_stats_lda(stats, np.array(["a"] * 8), weight=0.5)
    with pytest.raises(StatsLdaError, match="at most min"):
        fit_stats_lda(stats, speakers, weight=0.5, dim=2)
    with pytest.raises(StatsLdaError, match="evaluate.stats_weight"):
        fit_stats_lda(stats, speakers, weight=1.5)
    with pytest.raises(StatsLdaError, match="LDA projection takes 2-d"):
        fit_stats_lda(stats, speakers, weight=0.5).project(np.zeros((1, 3)))


def test_bundle_with_statistics_branch_embeds_jointly(tmp_path):
    keras = pytest.importorskip("keras")
    from voiceprint.serving import api
    from voiceprint.serving.bundle import BundleError, load_bundle, save_bundle
    from voiceprint.data.corpus.synthetic import generate
    from voiceprint.core.embedding import embed_features
    from voiceprint.features import featurize_file
    from voiceprint.models import build_rescnn

    keras.utils.set_random_seed(0)
    model, _ = build_rescnn(filters=[4, 8, 8, 8], blocks=1, embedding_dim=16, num_bands=64, num_classes=3)
    manifest = generate(tmp_path / "audio", num_speakers=3, utterances_per_speaker=2, min_seconds=1.0,
                        max_seconds=1.5, seed=0)
    files = [tmp_path / "audio" / p for p in manifest.path]
    made = [featurize_file(f, "logmel_cmn", vad="original", min_seconds=0.5) for f in files]
    stats = np.stack([s for _, s in made]).astype(np.float32)
    lda = fit_stats_lda(stats, manifest.speaker.to_numpy(), weight=0.5)
    features = {"kind": "logmel_cmn", "vad": "original", "sample_rate": 16000, "num_bands": 64,
                "min_seconds": 0.5, "window_frames": 0, "hop_frames": 80}
    path = save_bundle(tmp_path / "b", model, system="fused_mfcc_lda", features=features,
                       thresholds={"eer": 0.5, "low_far": 0.9, "low_far_rate": 0.01}, evaluation={"eer": 0.1},
                       stats_lda=lda)
    bundle = load_bundle(path)
    assert bundle.embedding_dim == 16 + lda.output_dim and bundle.scoring_sha256 != bundle.model_sha256
    rec = api.Recognizer(bundle)
    network = embed_features(model, [f.astype(np.float16).astype(np.float32) for f, _ in made])
    np.testing.assert_allclose(rec.embed_files(files), lda.joint(network, stats), atol=1e-5)
    # audio in memory goes through the same statistics branch
    np.testing.assert_allclose(rec.embed_files([files[0].read_bytes()]), lda.joint(network, stats)[:1], atol=1e-5)
    # a replaced projection no longer matches the calibration
    fit_stats_lda(stats, manifest.speaker.to_numpy(), weight=0.9).save(path / "stats_lda.npz")
    with pytest.raises(BundleError, match="stats_lda.npz: sha256 .* differs from stats_lda_sha256"):
        load_bundle(path)
    (path / "stats_lda.npz").unlink()
    with pytest.raises(BundleError, match="stats_lda.npz missing"):
        load_bundle(path)

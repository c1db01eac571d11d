"""The model bundle: atomic, byte-reproducible save; load checks the sha256, the JSON and the shapes."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from voiceprint.serving import bundle as B  # noqa: E402
from voiceprint.models import build_rescnn  # noqa: E402

FEATURES = {"kind": "logmel_cmn", "vad": "original", "sample_rate": 16000, "num_bands": 64, "min_seconds": 0.5,
            "window_frames": 0, "hop_frames": 80}
THRESHOLDS = {"eer": 0.41, "low_far": 0.63, "low_far_rate": 0.01}
EVALUATION = {"eer": 0.098, "min_dcf": 0.92, "target_trials": 7600, "nontarget_trials": 200000}


def _model(seed):
    keras.utils.set_random_seed(seed)
    model, _ = build_rescnn(filters=[4, 8, 8, 8], blocks=1, embedding_dim=16, num_bands=64, num_classes=3,
                            dropout=0.0)
    return model


@pytest.fixture(scope="module")
def model():
    return _model(0)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    return B.save_bundle(tmp_path_factory.mktemp("bundle") / "voiceprint", model, system="head", features=FEATURES,
                         thresholds=THRESHOLDS, evaluation=EVALUATION)


def _copy(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "copy")


def test_round_trip(saved, model):
    loaded = B.load_bundle(saved)
    assert sorted(p.name for p in saved.iterdir()) == ["model.keras", "thresholds.json"]
    assert (loaded.system, loaded.embedding_dim, loaded.thresholds) == ("head", 16, THRESHOLDS)
    assert loaded.features == B.FeatureSettings("logmel_cmn", 16000, 64, 0.5, 0, 80, "original")
    assert loaded.evaluation == EVALUATION
    assert loaded.model_sha256 == B.file_sha256(saved / "model.keras")
    assert loaded.versions["keras"] == keras.__version__
    x = np.random.default_rng(0).normal(size=(2, 57, 64, 1)).astype(np.float32)
    np.testing.assert_array_equal(loaded.model.predict(x, verbose=0), model.predict(x, verbose=0))
    assert loaded.threshold("eer") == ("eer", 0.41)
    assert loaded.threshold("low_far") == ("low_far", 0.63)
    assert loaded.threshold("0.5") == ("explicit", 0.5)
    for bad in ("1.5", "median", float("nan")):
        with pytest.raises(B.ThresholdError):
            loaded.threshold(bad)


def test_save_is_byte_reproducible(saved, model, tmp_path):
    again = B.save_bundle(tmp_path / "again", model, system="head", features=FEATURES, thresholds=THRESHOLDS,
                          evaluation=EVALUATION)
    for name in ("model.keras", "thresholds.json"):
        assert (again / name).read_bytes() == (saved / name).read_bytes()


def test_swapped_model_file_is_refused(saved, tmp_path):
    copy = _copy(saved, tmp_path)
    other = B.save_bundle(tmp_path / "other", _model(1), system="head", features=FEATURES, thresholds=THRESHOLDS,
                          evaluation=EVALUATION)
    shutil.copy(other / "model.keras", copy / "model.keras")
    with pytest.raises(B.BundleError, match=r"model.keras: sha256 .* differs from model_sha256"):
        B.load_bundle(copy)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["thresholds"].pop("eer"), "thresholds.eer: missing"),
    (lambda c: c["features"].update(sample_rate="16k"), "features.sample_rate: expected an integer"),
    (lambda c: c["features"].update(frame_ms=25), "features.frame_ms: unknown key"),
    (lambda c: c["features"].update(sample_rate=1), r"features.sample_rate: expected an integer in \[8000, 48000\]"),
    (lambda c: c["features"].update(sample_rate=10**7), r"features.sample_rate: expected an integer in \[8000, "),
    (lambda c: c["features"].update(min_seconds=float("nan")), "features.min_seconds: expected a finite number"),
    (lambda c: c["features"].update(kind="mfcc"), "features.kind: unknown feature kind"),
    (lambda c: c["features"].update(vad="webrtc"), r"features.vad: unknown VAD 'webrtc'; valid: energy, original$"),
    (lambda c: c["thresholds"].update(low_far=2.0), r"thresholds.low_far: must lie in \[-1.0, 1.0\]"),
    (lambda c: c.update(embedding_dim=32), "embedding_dim 32"),
    (lambda c: c.update(model_sha256="xyz"), "model_sha256: expected 64 lowercase hex digits"),
    (lambda c: c.pop("system"), "system: missing"),
])
def test_invalid_calibration_names_file_and_key(saved, tmp_path, edit, message):
    _assert_edit_refused(saved, tmp_path, edit, message)


def _assert_edit_refused(bundle, tmp_path, edit, message):
    """``edit`` applied to a copy's thresholds.json makes load_bundle fail with ``message``, naming the file."""
    copy = _copy(bundle, tmp_path)
    calibration = json.loads((copy / "thresholds.json").read_text())
    edit(calibration)
    (copy / "thresholds.json").write_text(json.dumps(calibration))
    with pytest.raises(B.BundleError, match=message) as info:
        B.load_bundle(copy)
    assert "thresholds.json" in str(info.value)


def test_broken_json_and_missing_parts(saved, tmp_path):
    copy = _copy(saved, tmp_path)
    (copy / "thresholds.json").write_text("{not json")
    with pytest.raises(B.BundleError, match="thresholds.json: not valid JSON"):
        B.load_bundle(copy)
    (copy / "thresholds.json").unlink()
    with pytest.raises(B.BundleError, match="not a voiceprint bundle"):
        B.load_bundle(copy)
    with pytest.raises(B.ModelNotFoundError, match="nowhere not found"):
        B.load_bundle(tmp_path / "nowhere")


def test_bare_keras_file_has_no_thresholds(saved):
    bare = B.load_bundle(saved / "model.keras")
    assert bare.thresholds is None and bare.embedding_dim == 16
    assert bare.features.kind == "logmel_cmn"
    assert B.load_bundle(saved / "model.keras", features={"kind": "fbank_norm"}).features.kind == "fbank_norm"
    with pytest.raises(B.ThresholdError, match="no calibration"):
        bare.threshold("eer")
    assert bare.threshold(0.7) == ("explicit", 0.7)
    with pytest.raises(B.BundleError, match="overrides apply to bare .keras files only"):
        B.load_bundle(saved, features={"kind": "fbank_norm"})


def test_save_rejects_bad_arguments(model, tmp_path):
    with pytest.raises(B.BundleError, match="thresholds.low_far: missing"):
        B.save_bundle(tmp_path / "b", model, system="head", features=FEATURES, thresholds={"eer": 0.4},
                      evaluation=EVALUATION)
    with pytest.raises(B.BundleError, match="features.num_bands: 40, but the model takes 64"):
        B.save_bundle(tmp_path / "b", model, system="head", features={**FEATURES, "num_bands": 40},
                      thresholds=THRESHOLDS, evaluation=EVALUATION)
    assert not (tmp_path / "b").exists()


def test_failed_save_keeps_the_previous_bundle(saved, model, tmp_path, monkeypatch):
    copy = _copy(saved, tmp_path)
    before = {p.name: p.read_bytes() for p in copy.iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(B, "save_keras_model", crash)
    with pytest.raises(OSError, match="injected"):
        B.save_bundle(copy, model, system="head", features=FEATURES, thresholds=THRESHOLDS, evaluation=EVALUATION)
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]   # no temporary directory left behind


# ------------------------------------------------------------------------------------------------ AS-norm bundles

COHORT = np.random.default_rng(0).normal(size=(6, 16)).astype(np.float32)
NORMED = {"eer": 2.4, "low_far": 4.1, "low_far_rate": 0.01}     # AS-norm scores: not bounded to [-1, 1]


@pytest.fixture(scope="module")
def normed(model, tmp_path_factory):
    return B.save_bundle(tmp_path_factory.mktemp("normed") / "voiceprint", model, system="head", features=FEATURES,
                         thresholds=NORMED, evaluation=EVALUATION, score_norm="as_norm", cohort=COHORT,
                         cohort_top_n=4)


def test_as_norm_round_trip(normed, saved, model, tmp_path):
    loaded = B.load_bundle(normed)
    assert sorted(p.name for p in normed.iterdir()) == ["cohort.npy", "model.keras", "thresholds.json"]
    assert (loaded.score_norm, loaded.cohort_top_n, loaded.thresholds) == ("as_norm", 4, NORMED)
    assert loaded.cohort.dtype == np.float32
    np.testing.assert_array_equal(loaded.cohort, COHORT)
    calibration = json.loads((normed / "thresholds.json").read_text())
    assert calibration["cohort_sha256"] == B.file_sha256(normed / "cohort.npy")
    assert calibration["model_sha256"] == json.loads((saved / "thresholds.json").read_text())["model_sha256"]
    # explicit thresholds are normalised scores: any finite number
    assert loaded.threshold("-3.5") == ("explicit", -3.5)
    with pytest.raises(B.ThresholdError, match="expected a finite number"):
        loaded.threshold("inf")
    again = B.save_bundle(tmp_path / "again", model, system="head", features=FEATURES, thresholds=NORMED,
                          evaluation=EVALUATION, score_norm="as_norm", cohort=COHORT, cohort_top_n=4)
    for name in ("model.keras", "cohort.npy", "thresholds.json"):
        assert (again / name).read_bytes() == (normed / name).read_bytes()
    # a cosine bundle is unchanged: no score-norm keys, no cohort, cosine thresholds
    plain = B.load_bundle(saved)
    assert (plain.score_norm, plain.cohort, plain.cohort_top_n) == ("none", None, None)
    plain_keys = set(json.loads((saved / "thresholds.json").read_text()))
    assert not {"score_norm", "cohort_top_n", "cohort_sha256"} & plain_keys


def test_swapped_or_missing_cohort_is_refused(normed, tmp_path):
    copy = shutil.copytree(normed, tmp_path / "copy")
    np.save(copy / "cohort.npy", COHORT[::-1].copy())
    with pytest.raises(B.BundleError, match=r"cohort.npy: sha256 .* differs from cohort_sha256 .* the cohort file"):
        B.load_bundle(copy)
    (copy / "cohort.npy").unlink()
    with pytest.raises(B.BundleError, match="cohort.npy missing, but thresholds.json has score_norm as_norm"):
        B.load_bundle(copy)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(cohort_top_n=7), r"cohort_top_n: 7 exceeds the cohort size 6"),
    (lambda c: c.update(cohort_top_n=1), r"cohort_top_n: expected an integer >= 2"),
    (lambda c: c.pop("cohort_sha256"), "cohort_sha256: missing"),
    (lambda c: c.update(score_norm="snorm"), "score_norm: unknown score normalisation 'snorm'"),
    (lambda c: c.update(score_norm="none"), r"thresholds.eer: must lie in \[-1.0, 1.0\]"),
])
def test_invalid_score_norm_calibration(normed, tmp_path, edit, message):
    _assert_edit_refused(normed, tmp_path, edit, message)


def test_save_checks_the_cohort(model, tmp_path):
    args = dict(system="head", features=FEATURES, thresholds=NORMED, evaluation=EVALUATION, score_norm="as_norm")
    with pytest.raises(B.BundleError, match=r"cohort.npy: expected a finite float32 array \(speakers, 16\)"):
        B.save_bundle(tmp_path / "b", model, cohort=COHORT[:, :8], cohort_top_n=2, **args)
    with pytest.raises(B.BundleError, match="cohort_top_n: 100 exceeds the cohort size 6"):
        B.save_bundle(tmp_path / "b", model, cohort=COHORT, cohort_top_n=100, **args)
    with pytest.raises(B.BundleError, match="none, but a cohort was given"):
        B.save_bundle(tmp_path / "b", model, **{**args, "score_norm": "none", "thresholds": THRESHOLDS},
                      cohort=COHORT, cohort_top_n=2)
    assert not (tmp_path / "b").exists()


def test_a_bundle_with_the_old_thresholds_file_name_loads(saved, tmp_path):
    copy = _copy(saved, tmp_path)
    (copy / "thresholds.json").rename(copy / "calibration.json")     # as written before the rename
    old = B.load_bundle(copy)
    assert (old.thresholds, old.model_sha256, old.llr_calibration) == (THRESHOLDS, B.load_bundle(saved).model_sha256,
                                                                       None)
    with pytest.raises(B.NoLlrCalibrationError, match="no LLR calibration"):
        old.llr([0.5])


def test_a_bundle_loads_under_its_old_file_name(saved, tmp_path):
    old = _copy(saved, tmp_path)
    (old / "thresholds.json").rename(old / "calibration.json")     # as every bundle before the rename
    loaded = B.load_bundle(old)
    assert loaded.thresholds == B.load_bundle(saved).thresholds and loaded.llr_calibration is None
    assert B.thresholds_file(old).name == "calibration.json"


@pytest.fixture(scope="module")
def with_llr(model, tmp_path_factory):
    from voiceprint.evaluation.calibration import LlrCalibration

    return B.save_bundle(tmp_path_factory.mktemp("llr") / "voiceprint", model, system="head", features=FEATURES,
                         thresholds=THRESHOLDS, evaluation=EVALUATION,
                         llr_calibration=LlrCalibration(scale=20.0, offset=-8.0, fit_prior=0.5),
                         llr_fit={"target_trials": 10, "nontarget_trials": 90})


def test_llr_calibration_round_trip(with_llr, saved):
    assert sorted(p.name for p in with_llr.iterdir()) == ["llr_calibration.json", "model.keras", "thresholds.json"]
    loaded = B.load_bundle(with_llr)
    assert (loaded.llr_calibration.scale, loaded.llr_calibration.offset) == (20.0, -8.0)
    np.testing.assert_allclose(loaded.llr([0.4, 0.5]), [0.0, 2.0])
    data = json.loads((with_llr / "llr_calibration.json").read_text())
    assert data["fit"] == {"target_trials": 10, "nontarget_trials": 90} and data["score_norm"] == "none"
    assert data["model_sha256"] == loaded.model_sha256
    # the thresholds file is the same as without an LLR calibration: the decision thresholds stay as they are
    assert (with_llr / "thresholds.json").read_bytes() == (saved / "thresholds.json").read_bytes()


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(model_sha256="0" * 64), "model_sha256: differs from the bundle's model"),
    (lambda c: c.update(score_norm="as_norm"), "score_norm: 'as_norm', but the bundle scores with 'none'"),
    (lambda c: c.update(scale="steep"), "scale: expected a finite number"),
    (lambda c: c.update(kind="platt"), "kind: expected 'linear_logistic_regression'"),
])
def test_invalid_llr_calibration_names_file_and_key(with_llr, tmp_path, edit, message):
    copy = _copy(with_llr, tmp_path)
    data = json.loads((copy / "llr_calibration.json").read_text())
    edit(data)
    (copy / "llr_calibration.json").write_text(json.dumps(data))
    with pytest.raises(B.BundleError, match=message) as info:
        B.load_bundle(copy)
    assert "llr_calibration.json" in str(info.value)


def _two_trunk_fused(base, head, w, trained_trunk=False):
    """The fused model bundles held before heads were saved alone: [base(x), attach_head(base, head)(x)]."""
    from keras import layers

    from voiceprint.models import attach_head

    trunk = keras.models.clone_model(base)      # as loaded from its own file (tdnn_head.keras)
    trunk.set_weights([v + 0.01 if trained_trunk else v for v in base.get_weights()])
    inputs = keras.Input(base.input_shape[1:], name="input")
    parts = [layers.Rescaling(w ** 0.5, name="base_weight")(base(inputs)),
             layers.Rescaling((1 - w) ** 0.5, name="head_weight")(attach_head(trunk, head)(inputs))]
    return keras.Model(inputs, layers.Concatenate(name="fused")(parts), name="fused")


def test_an_older_two_trunk_bundle_is_rewritten_as_one_trunk(model, tmp_path):
    from voiceprint.evaluation.calibration import LlrCalibration
    from voiceprint.models import build_head

    keras.utils.set_random_seed(4)
    head = build_head("dense", input_dim=16, units=8, layers_count=1, dropout=0.0, output_dim=4)
    old = _two_trunk_fused(model, head, 0.7)
    path = B.save_bundle(tmp_path / "old", old, system="fused", features=FEATURES, thresholds=THRESHOLDS,
                         evaluation=EVALUATION, llr_calibration=LlrCalibration(scale=20.0, offset=-8.0, fit_prior=0.5))
    before = B.load_bundle(path)
    assert B.rewrite_one_trunk(path) is True
    after = B.load_bundle(path)                         # every sha256 (thresholds, LLR calibration) updated
    assert after.model_sha256 != before.model_sha256 and after.thresholds == before.thresholds
    assert after.model.count_params() == model.count_params() + head.count_params() < old.count_params()
    x = np.random.default_rng(2).normal(size=(2, 120, 64, 1)).astype("float32")
    np.testing.assert_allclose(np.asarray(after.model(x)), np.asarray(before.model(x)), atol=1e-5)
    assert B.rewrite_one_trunk(path) is False           # one trunk already: nothing changes
    assert B.load_bundle(path).model_sha256 == after.model_sha256
    with pytest.raises(B.BundleError, match="two trunks differ"):
        B.one_trunk_model(_two_trunk_fused(model, head, 0.7, trained_trunk=True))

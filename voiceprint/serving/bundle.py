"""The deployable model bundle: one embedding model plus what is needed to use it on new audio.

Layout of a bundle directory (default ``models/voiceprint/``, written by the ``evaluate`` stage)::

    model.keras        features (batch, frames, bands, 1) float32 -> L2-normalised embedding (batch, D)
    model.onnx         (bundles written with ``onnx=True``, as the evaluate stage does) the same model for ONNX
                       Runtime, checked against model.keras when written (cosine >= 0.99999 at several lengths)
    cohort.npy         (AS-norm bundles only) (speakers, D) float32: the score-normalisation cohort
    stats_lda.npz      (bundles with an MFCC-statistics branch only) its LDA projection and weight
                       (``voiceprint.evaluation.stats_lda``); D is then the model's output plus the LDA dimension
    thresholds.json    {"system", "model_sha256", "embedding_dim",
                        "features":   {"kind", "sample_rate", "num_bands", "min_seconds", "window_frames",
                                       "hop_frames"[, "vad"]},
                        "thresholds": {"eer", "low_far", "low_far_rate"},
                        "evaluation": {"eer", "min_dcf", "target_trials", "nontarget_trials", ...},
                        ["score_norm": "as_norm", "cohort_top_n", "cohort_sha256",]
                        ["onnx_sha256",]
                        ["stats_lda_sha256",]
                        "versions":   {...}}
    llr_calibration.json  (optional) score -> log-likelihood ratio: {"kind", "scale", "offset", "fit_prior",
                        "score_norm", "model_sha256", "fit": {trial counts and held-out numbers}}
                        (``voiceprint.evaluation.calibration``): ``llr = scale * score + offset``

``thresholds.json`` was called ``calibration.json`` before the bundle had a real (LLR) calibration; a bundle with
the old name (e.g. the shipped one) loads as before.

``thresholds.eer`` is the score where false alarms and misses balance on the evaluation trials;
``thresholds.low_far`` the one whose false-alarm rate is ``low_far_rate``. The score is the cosine, or, in a bundle
with ``score_norm: as_norm``, the cosine normalised by AS-norm against ``cohort.npy``
(``voiceprint.evaluation.score_norm``;
no longer bounded to [-1, 1]). A bundle without ``score_norm`` (every bundle before it existed) scores by cosine.
The sha256s tie the calibration to the exact model and cohort bytes, so a swapped file cannot silently reuse
thresholds measured with another one.

``llr_calibration.json`` maps the same score to an LLR, so a decision can be made at any prior of a target
(accept iff ``llr >= -log(p / (1 - p))``) instead of at a fixed threshold; ``model_sha256`` and ``score_norm``
tie it to the model and the scoring it was fitted on.

A bare ``.keras`` (or ``.onnx``) file also loads (:func:`load_bundle`), without thresholds: scores then need an
explicit number.

Backends (:func:`load_bundle`'s ``backend``): ``keras`` runs model.keras on TensorFlow; ``onnx`` runs model.onnx on
ONNX Runtime, with no TensorFlow, Keras or DVC imported; ``auto`` (the default of the API and CLI) takes ``onnx``
when the bundle carries model.onnx and onnxruntime is installed, else ``keras``. The ONNX start-up is ~10x faster and
its embeddings agree with Keras to cosine >= 0.99999 (checked when the bundle is written), far inside what moves a
calibrated threshold, so a bundle that has one is used through it unless ``keras`` is asked for.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from voiceprint.core.errors import VoiceprintError
from voiceprint.features.settings import FeatureSettings  # the bundle's "features": one class from params to API
from voiceprint.core.outputs import atomic_path, save_keras_model, software_versions, to_builtin

MODEL_FILE = "model.keras"
THRESHOLDS_FILE = "thresholds.json"
LEGACY_THRESHOLDS_FILE = "calibration.json"     # the name before llr_calibration.json; still read
LLR_CALIBRATION_FILE = "llr_calibration.json"
COHORT_FILE = "cohort.npy"
ONNX_FILE = "model.onnx"
BACKENDS = ("auto", "onnx", "keras")
STATS_LDA_FILE = "stats_lda.npz"
THRESHOLD_NAMES = ("eer", "low_far")
# A bare .keras file says nothing about its features: the pipeline's defaults (params.yaml) are assumed.
DEFAULT_FEATURES = FeatureSettings().to_dict()


class BundleError(VoiceprintError, ValueError):
    """A bundle that cannot be used (bad thresholds.json, swapped model file, wrong shapes); names the file."""


class ModelNotFoundError(VoiceprintError, FileNotFoundError):
    """No model at the given path."""


class NoLlrCalibrationError(BundleError):
    """An LLR or a decision at a prior was asked of a bundle without ``llr_calibration.json``."""


class ThresholdError(VoiceprintError, ValueError):
    """A threshold that is neither a calibrated name nor a score (a cosine in [-1, 1] unless AS-norm)."""


@dataclass(frozen=True)
class Bundle:
    """A loaded bundle. ``thresholds`` is None for a bare ``.keras`` file; ``cohort`` and ``cohort_top_n`` are
    None unless ``score_norm`` is ``as_norm``."""

    path: Path
    model: Any = field(repr=False)
    system: str
    model_sha256: str
    embedding_dim: int
    features: FeatureSettings
    thresholds: dict[str, float] | None
    evaluation: dict
    versions: dict
    score_norm: str = "none"
    cohort: np.ndarray | None = field(default=None, repr=False)
    cohort_top_n: int | None = None
    llr_calibration: Any = None     # voiceprint.evaluation.calibration.LlrCalibration, or None (no
                                    # llr_calibration.json)
    stats_lda: Any = field(default=None, repr=False)   # voiceprint.evaluation.stats_lda.StatsLda, or None
    backend: str = "keras"   # what ``model`` is: a Keras model, or "onnx": a voiceprint.serving.export.Embedder

    @property
    def scoring_sha256(self) -> str:
        """What embeddings depend on: the model's sha256, combined with the statistics branch's when there is one
        (the registry keys enrolments by it, so a bundle with another projection never reuses them)."""
        if self.stats_lda is None:
            return self.model_sha256
        return hashlib.sha256(f"{self.model_sha256}:{self.stats_lda.sha256()}".encode()).hexdigest()

    def threshold(self, which: str | float) -> tuple[str, float]:
        """``(label, value)`` for a threshold name (``eer``, ``low_far``) or a number (also as a string).

        Raises ThresholdError with the reason: unknown name, no calibration (bare model), a number that is not
        finite, or (cosine scoring) outside [-1, 1].
        """
        if isinstance(which, str) and which.strip() in THRESHOLD_NAMES:
            name = which.strip()
            if self.thresholds is None:
                raise ThresholdError(f"model {self.path} has no calibration (a bare .keras file): "
                                 f"give the threshold as a number instead of {name!r}")
            return name, self.thresholds[name]
        what = "an AS-norm score" if self.score_norm == "as_norm" else "a cosine score in [-1, 1]"
        try:
            value = float(which)
        except (TypeError, ValueError):
            raise ThresholdError(f"threshold {which!r}: expected {' or '.join(THRESHOLD_NAMES)} or {what}") from None
        if not math.isfinite(value):
            raise ThresholdError(f"threshold {which!r}: expected a finite number ({what})")
        if self.score_norm == "none" and not -1.0 <= value <= 1.0:
            raise ThresholdError(f"threshold {which!r}: a cosine score must lie in [-1, 1]")
        return "explicit", value

    def llr(self, scores) -> np.ndarray:
        """Scores mapped to log-likelihood ratios by ``llr_calibration.json``; NoLlrCalibrationError without one."""
        if self.llr_calibration is None:
            raise NoLlrCalibrationError(
                f"model {self.path} has no LLR calibration ({LLR_CALIBRATION_FILE}): LLRs and decisions at a prior "
                "need a bundle written by the evaluate stage since it fits one (dvc repro evaluate)")
        return self.llr_calibration.llr(scores)

    def prior_threshold(self, prior) -> tuple[str, float]:
        """``("prior <p>", score)``: the score at which the LLR reaches the Bayes threshold ``-logit(prior)``, so
        "score >= it" is the Bayes decision at that prior of a target. ThresholdError for a prior outside (0, 1),
        NoLlrCalibrationError without an LLR calibration."""
        from voiceprint.evaluation.calibration import bayes_threshold

        try:
            value = float(prior)
        except (TypeError, ValueError):
            raise ThresholdError(f"prior {prior!r}: expected a probability in (0, 1)") from None
        if not 0.0 < value < 1.0:
            raise ThresholdError(f"prior {prior!r}: expected a probability in (0, 1) (the share of target trials)")
        self.llr(0.0)       # NoLlrCalibrationError without one
        cal = self.llr_calibration
        return f"prior {value:g}", (bayes_threshold(value) - cal.offset) / cal.scale


# ------------------------------------------------------------------------------------------------ validation

def _fail(source: str, key: str, why: str) -> BundleError:
    return BundleError(f"{source}: {key}: {why}")


def _mapping(value, source: str, key: str) -> dict:
    if not isinstance(value, Mapping):
        raise _fail(source, key, f"expected an object, got {value!r}")
    return dict(value)


def _keys(data: dict, source: str, prefix: str, required: tuple, optional: tuple = ()) -> None:
    for k in required:
        if k not in data:
            raise _fail(source, prefix + k, "missing")
    unknown = sorted(set(data) - set(required) - set(optional))
    if unknown:
        # An unknown feature setting ignored would give embeddings unlike the calibrated ones: refuse it.
        raise _fail(source, prefix + unknown[0], f"unknown key (expected {', '.join(required + optional)})")


def _int(value, source: str, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(source, key, f"expected an integer >= {minimum}, got {value!r}")
    return value


def _number(value, source: str, key: str, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(source, key, f"expected a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise _fail(source, key, f"must lie in [{low}, {high}], got {value!r}")
    return float(value)


def _text(value, source: str, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(source, key, f"expected a non-empty string, got {value!r}")
    return value


# Speech is recorded at 8-48 kHz; far outside, the 10 ms hop rounds to 0 samples (a division by zero under 50 Hz)
# or the 25 ms window outgrows the FFT: refused when the bundle loads, not as a crash in the first file.
SAMPLE_RATES = (8000, 48000)


def _sample_rate(value, source: str, key: str) -> int:
    low, high = SAMPLE_RATES
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _fail(source, key, f"expected an integer in [{low}, {high}] (Hz), got {value!r}")
    return value


def parse_features(data, source: str, prefix: str = "features.") -> FeatureSettings:
    """A bundle's ``features`` (thresholds.json), every key checked; ``vad`` None when it has none."""
    from voiceprint.features import FEATURE_KINDS, VAD_KINDS

    data = _mapping(data, source, prefix.rstrip("."))
    _keys(data, source, prefix, ("kind", "sample_rate", "num_bands", "min_seconds", "window_frames",
                                 "hop_frames"), ("vad",))
    kind = _text(data["kind"], source, prefix + "kind")
    if kind not in FEATURE_KINDS:
        raise _fail(source, prefix + "kind",
                    f"unknown feature kind {kind!r}; valid: {', '.join(sorted(FEATURE_KINDS))}")
    vad = _text(data["vad"], source, prefix + "vad") if "vad" in data else None
    if vad is not None and vad not in VAD_KINDS:
        raise _fail(source, prefix + "vad", f"unknown VAD {vad!r}; valid: {', '.join(sorted(VAD_KINDS))}")
    return FeatureSettings(
        kind=kind,
        sample_rate=_sample_rate(data["sample_rate"], source, prefix + "sample_rate"),
        num_bands=_int(data["num_bands"], source, prefix + "num_bands", 1),
        min_seconds=_number(data["min_seconds"], source, prefix + "min_seconds", 0.0),
        window_frames=_int(data["window_frames"], source, prefix + "window_frames", 0),
        hop_frames=_int(data["hop_frames"], source, prefix + "hop_frames", 1),
        vad=vad,
    )


def parse_thresholds(data, source: str, score_norm: str = "none") -> dict[str, float]:
    data = _mapping(data, source, "thresholds")
    _keys(data, source, "thresholds.", THRESHOLD_NAMES + ("low_far_rate",))
    low, high = (-1.0, 1.0) if score_norm == "none" else (None, None)   # AS-norm scores are unbounded
    out = {k: _number(data[k], source, f"thresholds.{k}", low, high) for k in THRESHOLD_NAMES}
    out["low_far_rate"] = _number(data["low_far_rate"], source, "thresholds.low_far_rate", 0.0, 1.0)
    return out


def parse_evaluation(data, source: str) -> dict:
    """Informational numbers from the evaluation; only ``eer`` is required (other keys are kept as they are)."""
    data = _mapping(data, source, "evaluation")
    if "eer" not in data:
        raise _fail(source, "evaluation.eer", "missing")
    _number(data["eer"], source, "evaluation.eer", 0.0, 1.0)
    return data


def parse_score_norm(value, source: str) -> str:
    from voiceprint.evaluation.score_norm import SCORE_NORMS

    if value not in SCORE_NORMS:
        raise _fail(source, "score_norm", f"unknown score normalisation {value!r}; valid: {', '.join(SCORE_NORMS)}")
    return value


def parse_cohort(cohort, source: str, *, dim: int, top_n) -> tuple[np.ndarray, int]:
    """(cohort, top_n) checked: (speakers, ``dim``) finite float32 with at least ``top_n`` (>= 2) rows."""
    from voiceprint.evaluation.score_norm import check_top_n

    if (not isinstance(cohort, np.ndarray) or cohort.dtype != np.float32 or cohort.ndim != 2
            or cohort.shape[1] != dim or not np.isfinite(cohort).all()):
        what = (f"{cohort.dtype} array of shape {cohort.shape}" if isinstance(cohort, np.ndarray)
                else type(cohort).__name__)
        raise _fail(source, COHORT_FILE, f"expected a finite float32 array (speakers, {dim}), got {what}")
    try:
        top_n = check_top_n(top_n, len(cohort))
    except ValueError as exc:
        raise _fail(source, "cohort_top_n", str(exc).removeprefix("evaluate.cohort_top_n: ")) from None
    return cohort, top_n


def _model_io(model, source: str) -> tuple[int, int]:
    """(num_bands, embedding_dim) of a (batch, frames, bands, 1) -> (batch, D) model."""
    shape_in, shape_out = model.input_shape, model.output_shape
    if (not isinstance(shape_in, tuple) or len(shape_in) != 4 or shape_in[2] is None or shape_in[3] != 1
            or not isinstance(shape_out, tuple) or len(shape_out) != 2 or shape_out[1] is None):
        raise BundleError(f"{source}: expected a model (batch, frames, bands, 1) -> (batch, D), "
                          f"got {shape_in} -> {shape_out}")
    return int(shape_in[2]), int(shape_out[1])


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ save / load

def save_bundle(out_dir: str | Path, model, *, system: str, features: dict, thresholds: dict,
                evaluation: dict, score_norm: str = "none", cohort: np.ndarray | None = None,
                cohort_top_n: int | None = None, llr_calibration=None, llr_fit: dict | None = None,
                stats_lda=None, onnx: bool = False) -> Path:
    """Write ``out_dir`` (model.keras + thresholds.json, + cohort.npy for ``score_norm="as_norm"``, +
    llr_calibration.json for an ``llr_calibration`` (``voiceprint.evaluation.calibration.LlrCalibration``, with
    ``llr_fit``:
    numbers about the trials it was fitted on), + stats_lda.npz for a ``stats_lda``
    (``voiceprint.evaluation.stats_lda``), +
    model.onnx with ``onnx=True``) atomically: the directory is replaced as a whole, so it never holds a model with
    another model's calibration. Same weights and arguments -> same bytes. ``onnx=True`` needs tf2onnx (the
    ``export`` extra) and raises :class:`voiceprint.serving.export.ExportMismatchError` if ONNX Runtime's embeddings
    differ
    from Keras's."""
    out_dir = Path(out_dir)
    source = f"save_bundle({out_dir})"
    score_norm = parse_score_norm(score_norm, source)
    feats = parse_features(to_builtin(dict(features)), source)
    calibrated = parse_thresholds(to_builtin(dict(thresholds)), source, score_norm)
    evaluation = parse_evaluation(to_builtin(dict(evaluation)), source)
    system = _text(system, source, "system")
    bands, dim = _model_io(model, source)
    if bands != feats.num_bands:
        raise _fail(source, "features.num_bands", f"{feats.num_bands}, but the model takes {bands} bands")
    if stats_lda is not None:
        dim += stats_lda.output_dim
    if score_norm == "none" and (cohort is not None or cohort_top_n is not None):
        raise _fail(source, "score_norm", "none, but a cohort was given (use score_norm='as_norm')")
    if score_norm == "as_norm":
        cohort, cohort_top_n = parse_cohort(cohort, source, dim=dim, top_n=cohort_top_n)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_keras_model(model, tmp / MODEL_FILE)
        calibration = {"system": system, "model_sha256": file_sha256(tmp / MODEL_FILE), "embedding_dim": dim,
                       "features": feats.to_dict(), "thresholds": calibrated, "evaluation": evaluation,
                       "versions": software_versions()}
        if onnx:
            calibration["onnx_sha256"] = _write_onnx(model, tmp / ONNX_FILE)
        if score_norm == "as_norm":
            with open(tmp / COHORT_FILE, "wb") as fh:
                np.save(fh, np.ascontiguousarray(cohort, dtype="<f4"), allow_pickle=False)
            calibration.update(score_norm=score_norm, cohort_top_n=cohort_top_n,
                               cohort_sha256=file_sha256(tmp / COHORT_FILE))
        if stats_lda is not None:
            stats_lda.save(tmp / STATS_LDA_FILE)
            calibration["stats_lda_sha256"] = file_sha256(tmp / STATS_LDA_FILE)
        (tmp / THRESHOLDS_FILE).write_text(json.dumps(calibration, indent=2, sort_keys=True) + "\n")
        if llr_calibration is not None:
            _write_llr_calibration(tmp / LLR_CALIBRATION_FILE, llr_calibration, llr_fit or {},
                                   score_norm=score_norm, model_sha256=calibration["model_sha256"])
    return out_dir


def _write_llr_calibration(file: Path, llr_calibration, fit: dict, *, score_norm: str, model_sha256: str) -> None:
    data = {**llr_calibration.to_dict(), "score_norm": score_norm, "model_sha256": model_sha256,
            "fit": to_builtin(dict(fit))}
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _load_llr_calibration(file: Path, *, score_norm: str, model_sha256: str):
    """The bundle's LlrCalibration, checked to belong to its model and scoring (BundleError naming the file)."""
    from voiceprint.evaluation.calibration import parse_calibration
    from voiceprint.core.errors import DataError

    source = str(file)
    try:
        data = _mapping(json.loads(file.read_text()), source, "(top level)")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{source}: not valid JSON: {exc}") from None
    if data.get("model_sha256") != model_sha256:
        raise _fail(source, "model_sha256", "differs from the bundle's model: the LLR calibration was fitted on "
                    "another model's scores; rebuild the bundle (dvc repro evaluate)")
    if data.get("score_norm") != score_norm:
        raise _fail(source, "score_norm", f"{data.get('score_norm')!r}, but the bundle scores with {score_norm!r}")
    try:
        return parse_calibration({k: data.get(k) for k in ("kind", "scale", "offset", "fit_prior")}, source)
    except DataError as exc:
        raise BundleError(str(exc)) from None


def _write_onnx(model, path: Path) -> str:
    """Export ``model`` to ``path`` checked against Keras (voiceprint.serving.export.export_checked_onnx); its
    sha256."""
    from voiceprint.serving.export import export_checked_onnx

    export_checked_onnx(model, path)
    return file_sha256(path)


def thresholds_file(path: str | Path) -> Path:
    """A bundle directory's thresholds.json, or calibration.json in a bundle written before the rename."""
    path = Path(path)
    if not (path / THRESHOLDS_FILE).is_file() and (path / LEGACY_THRESHOLDS_FILE).is_file():
        return path / LEGACY_THRESHOLDS_FILE
    return path / THRESHOLDS_FILE


def add_onnx(path: str | Path) -> str:
    """Give an existing bundle directory its model.onnx (exported from its model.keras and checked), and its
    thresholds file its ``onnx_sha256``; every other file stays as it is. Returns the sha256."""
    path = Path(path)
    bundle = load_bundle(path, backend="keras")        # every file checked first
    calibration_file = thresholds_file(path)
    data = json.loads(calibration_file.read_text())
    data["onnx_sha256"] = _write_onnx(bundle.model, path / ONNX_FILE)
    with atomic_path(calibration_file) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return data["onnx_sha256"]


def one_trunk_model(model):
    """A fused model written before heads were stored alone (``fused = [base(x), base_with_head(x)]``, two copies
    of the trunk) rebuilt as one trunk pass (voiceprint.models.fuse_models); None when ``model`` is not such a
    model. Refused (BundleError) unless both trunks hold identical weights, and the rebuilt model's output is
    checked against the old one's."""
    import keras

    from voiceprint.models import fuse_models

    names = [layer.name for layer in model.layers]
    if not {"rescnn", "base_with_head", "base_weight"} <= set(names):
        return None
    base, with_head = model.get_layer("rescnn"), model.get_layer("base_with_head")
    trunk = next(layer for layer in with_head.layers if isinstance(layer, keras.Model) and layer.name.startswith("rescnn"))
    head = next(layer for layer in with_head.layers if isinstance(layer, keras.Model) and layer is not trunk)
    tap = "frames" if trunk.name == "rescnn_frames" else "embedding"
    base_weights = {w.path: w for w in base.weights}
    for w in trunk.weights:
        if w.path not in base_weights or not np.array_equal(np.asarray(w), np.asarray(base_weights[w.path])):
            raise BundleError(f"{model.name}: its two trunks differ at {w.path} (the head's trunk was trained): "
                              "it cannot be one trunk pass")
    base_weight = float(np.asarray(model.get_layer("base_weight").scale)) ** 2
    rebuilt = fuse_models(base, head, base_weight, tap, name=model.name)
    x = np.random.default_rng(0).normal(size=(2, 300, int(model.input_shape[2]), 1)).astype(np.float32)
    if not np.allclose(np.asarray(rebuilt(x)), np.asarray(model(x)), atol=1e-5):
        raise BundleError(f"{model.name}: the one-trunk model's embeddings differ from the two-trunk model's")
    return rebuilt


def rewrite_one_trunk(path: str | Path) -> bool:
    """Rewrite a bundle directory whose fused model.keras holds two trunks (:func:`one_trunk_model`) as one trunk:
    model.keras and model.onnx are re-written and every sha256 that names them updated; the thresholds, cohort,
    statistics branch and LLR calibration stay (the embeddings are the same to float rounding). Returns False, and
    changes nothing, when the model is one trunk already. The registry keys enrolments by the model's sha256, so
    speakers enrolled with the old file must be enrolled again."""
    path = Path(path)
    bundle = load_bundle(path, backend="keras")        # every file checked first
    rebuilt = one_trunk_model(bundle.model)
    if rebuilt is None:
        return False
    calibration_file = thresholds_file(path)
    data = json.loads(calibration_file.read_text())
    with atomic_path(path) as tmp:
        shutil.copytree(path, tmp)
        save_keras_model(rebuilt, tmp / MODEL_FILE)
        data["model_sha256"] = file_sha256(tmp / MODEL_FILE)
        if "onnx_sha256" in data or (path / ONNX_FILE).is_file():
            data["onnx_sha256"] = _write_onnx(rebuilt, tmp / ONNX_FILE)
        (tmp / calibration_file.name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        llr_file = tmp / LLR_CALIBRATION_FILE
        if llr_file.is_file():
            llr = json.loads(llr_file.read_text())
            llr["model_sha256"] = data["model_sha256"]
            llr_file.write_text(json.dumps(llr, indent=2, sort_keys=True) + "\n")
    return True


def _load_keras(path: Path):
    try:
        from voiceprint.core.runtime import load_model

        return load_model(path, what="voiceprint model")   # Keras safe mode: no code from the file runs
    except ImportError as exc:
        raise BundleError(f"{path}: the keras backend needs TensorFlow and Keras ({exc.name} is not installed): "
                          "pip install 'voiceprint[pipeline]', or use a bundle with model.onnx "
                          "(--backend onnx)") from None
    except ValueError as exc:
        raise BundleError(str(exc)) from None


def _onnx_runtime_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def _load_onnx(path: Path):
    """An export.Embedder on ONNX Runtime, with VOICEPRINT_THREADS (default all cores) intra-op threads."""
    from voiceprint.serving.export import load_onnx_embedder
    from voiceprint.core.runtime import env_count

    try:
        return load_onnx_embedder(path, num_threads=env_count("VOICEPRINT_THREADS") or None)
    except ImportError:
        raise BundleError(f"{path}: the onnx backend needs onnxruntime: pip install onnxruntime") from None
    except ValueError as exc:
        raise BundleError(str(exc)) from None


def _embedder_io(embedder, source: str) -> tuple[int, int]:
    """(num_bands, embedding_dim) of an ONNX export.Embedder (its session's declared output width)."""
    out = embedder.backend.get_outputs()
    dim = out[0].shape[1] if len(out) == 1 and len(out[0].shape) == 2 else None
    if not isinstance(dim, int):
        raise BundleError(f"{source}: expected a model (batch, frames, bands, 1) -> (batch, D), got output "
                          f"{[o.shape for o in out]}")
    return embedder.num_bands, dim


def _choose_backend(backend: str, has_onnx: bool, source) -> str:
    if backend not in BACKENDS:
        raise BundleError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "onnx" if has_onnx and _onnx_runtime_available() else "keras"
    if backend == "onnx" and not has_onnx:
        raise BundleError(f"{source}: no {ONNX_FILE} in this bundle (written before bundles carried one, or "
                          "with onnx=False): use --backend keras, or add one with python -m voiceprint.serving.bundle "
                          "add-onnx DIR")
    return backend


def require_model(path: str | Path) -> Path:
    """``path`` if something is there, else ModelNotFoundError (cheap: callers check before importing Keras)."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"model {path} not found: the evaluate stage writes models/voiceprint "
                                 "(dvc repro); or pass --model / VOICEPRINT_MODEL")
    return path


def load_bundle(path: str | Path, *, features: dict | None = None, backend: str = "keras") -> Bundle:
    """Load a bundle directory (checked against its thresholds.json, or calibration.json in an older bundle, and
    its llr_calibration.json when there is one) or a bare ``.keras`` or ``.onnx`` file.

    ``features`` overrides :data:`DEFAULT_FEATURES` for a bare file only (a bundle fixes its own features).
    ``backend``: ``keras``, ``onnx`` or ``auto`` (see the module docstring); every file the calibration names is
    checked against its sha256 whichever runs.

    Raises:
        ModelNotFoundError: nothing at ``path``.
        BundleError: invalid thresholds.json or llr_calibration.json (names the file and key), a model file
            whose sha256 differs from the thresholds file's, a model that cannot be loaded or whose shapes
            disagree with it.
    """
    path = require_model(path)
    if path.is_file():
        if path.suffix not in (".keras", ".onnx"):
            raise BundleError(f"{path}: expected a bundle directory, a .keras or a .onnx file")
        chosen = "onnx" if path.suffix == ".onnx" else "keras"
        if backend not in ("auto", chosen):
            raise BundleError(f"{path}: a {path.suffix} file runs on the {chosen} backend, not {backend}")
        feats = parse_features({**DEFAULT_FEATURES, **(features or {})}, f"features for {path}")
        if chosen == "onnx":
            model = _load_onnx(path)
            bands, dim = _embedder_io(model, str(path))
        else:
            model = _load_keras(path)
            bands, dim = _model_io(model, str(path))
        if bands != feats.num_bands:
            raise BundleError(f"{path}: the model takes {bands} bands, the features have {feats.num_bands}")
        return Bundle(path, model, path.stem, file_sha256(path), dim, feats, None, {}, {}, backend=chosen)
    if features is not None:
        raise BundleError(f"{path}: a bundle fixes its own features; overrides apply to bare .keras files only")

    calibration_file, model_file = thresholds_file(path), path / MODEL_FILE
    for needed in (calibration_file, model_file):
        if not needed.is_file():
            raise BundleError(f"{path}: not a voiceprint bundle ({needed.name} missing)")
    source = str(calibration_file)
    try:
        data = json.loads(calibration_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{source}: not valid JSON: {exc}") from None
    data = _mapping(data, source, "(top level)")
    _keys(data, source, "", ("system", "model_sha256", "embedding_dim", "features", "thresholds", "evaluation"),
          ("versions", "score_norm", "cohort_top_n", "cohort_sha256", "stats_lda_sha256", "onnx_sha256"))
    system = _text(data["system"], source, "system")
    expected_sha = _sha256(data["model_sha256"], source, "model_sha256")
    dim = _int(data["embedding_dim"], source, "embedding_dim", 1)
    feats = parse_features(data["features"], source)
    score_norm = parse_score_norm(data.get("score_norm", "none"), source)   # older bundles: cosine
    thresholds = parse_thresholds(data["thresholds"], source, score_norm)
    evaluation = parse_evaluation(data["evaluation"], source)
    versions = _mapping(data.get("versions", {}), source, "versions")

    _check_file(model_file, expected_sha, "model_sha256", calibration_file)
    has_onnx = "onnx_sha256" in data
    if has_onnx:
        onnx_file = path / ONNX_FILE
        if not onnx_file.is_file():
            raise BundleError(f"{path}: {ONNX_FILE} missing, but {calibration_file.name} has onnx_sha256")
        _check_file(onnx_file, _sha256(data["onnx_sha256"], source, "onnx_sha256"), "onnx_sha256",
                    calibration_file)
    chosen = _choose_backend(backend, has_onnx, path)
    cohort, top_n = None, None
    if score_norm == "as_norm":
        for key in ("cohort_top_n", "cohort_sha256"):
            if key not in data:
                raise _fail(source, key, "missing (score_norm is as_norm)")
        cohort_file = _hashed_file(path, COHORT_FILE, data, "cohort_sha256", calibration_file,
                                   because="score_norm as_norm")
        try:
            cohort = np.load(cohort_file, allow_pickle=False)
        except ValueError as exc:
            raise BundleError(f"{cohort_file}: not a numpy array file: {exc}") from None
        cohort, top_n = parse_cohort(cohort, source, dim=dim, top_n=data["cohort_top_n"])
    else:
        extra = sorted({"cohort_top_n", "cohort_sha256"} & set(data))
        if extra:
            raise _fail(source, extra[0], "given, but score_norm is none")
    stats_lda = None
    if "stats_lda_sha256" in data:
        from voiceprint.evaluation.stats_lda import StatsLdaError, load_stats_lda

        stats_file = _hashed_file(path, STATS_LDA_FILE, data, "stats_lda_sha256", calibration_file,
                                  because="stats_lda_sha256")
        try:
            stats_lda = load_stats_lda(stats_file)
        except StatsLdaError as exc:
            raise BundleError(str(exc)) from None
    if chosen == "onnx":
        model_file = path / ONNX_FILE
        model = _load_onnx(model_file)
        bands, model_dim = _embedder_io(model, str(model_file))
    else:
        model = _load_keras(model_file)
        bands, model_dim = _model_io(model, str(model_file))
    if stats_lda is not None:
        model_dim += stats_lda.output_dim
    if (bands, model_dim) != (feats.num_bands, dim):
        raise BundleError(f"{model_file}: the model maps {bands} bands to {model_dim}-d embeddings, but "
                          f"{calibration_file.name} says {feats.num_bands} bands and embedding_dim {dim}")
    llr_file = path / LLR_CALIBRATION_FILE
    llr = (_load_llr_calibration(llr_file, score_norm=score_norm, model_sha256=expected_sha)
           if llr_file.is_file() else None)
    return Bundle(path, model, system, expected_sha, dim, feats, thresholds, evaluation, versions, score_norm,
                  cohort, top_n, llr, stats_lda, backend=chosen)


def _sha256(value, source: str, key: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise _fail(source, key, f"expected 64 lowercase hex digits, got {value!r}")
    return value


def _hashed_file(path: Path, name: str, data: dict, key: str, calibration_file: Path, *, because: str) -> Path:
    """``path / name``, which the thresholds file requires (``because``) and whose sha256 it records as ``key``."""
    file = path / name
    if not file.is_file():
        raise BundleError(f"{path}: {name} missing, but {calibration_file.name} has {because}")
    _check_file(file, _sha256(data[key], str(calibration_file), key), key, calibration_file)
    return file


def _check_file(file: Path, expected: str, key: str, calibration_file: Path) -> None:
    actual = file_sha256(file)
    if actual != expected:
        raise BundleError(f"{file}: sha256 {actual[:12]}... differs from {key} {expected[:12]}... in "
                          f"{calibration_file.name}: the {file.stem} file was replaced or corrupted, so the "
                          "calibration does not apply; rebuild the bundle (dvc repro evaluate)")


def main(argv=None) -> int:
    """``python -m voiceprint.serving.bundle add-onnx DIR``: give an existing bundle its checked model.onnx;
    ``python -m voiceprint.serving.bundle one-trunk DIR``: rewrite an older two-trunk fused model as one trunk."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m voiceprint.serving.bundle", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("add-onnx", help="export model.keras to model.onnx (checked) and record its sha256")
    p.add_argument("bundle", help="bundle directory (e.g. models/voiceprint)")
    p = sub.add_parser("one-trunk", help="rewrite a fused model with two copies of the trunk (bundles written "
                                         "before heads were saved alone) as one trunk pass")
    p.add_argument("bundle", help="bundle directory")
    args = parser.parse_args(argv)
    if args.command == "one-trunk":
        print(f"{args.bundle}: " + ("rewritten as one trunk" if rewrite_one_trunk(args.bundle) else
                                    "one trunk already; nothing changed"))
        return 0
    print(f"{Path(args.bundle) / ONNX_FILE}: sha256 {add_onnx(args.bundle)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

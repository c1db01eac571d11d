"""The params each stage reads, declared once: one :class:`voiceprint.core.params.Contract` per params section (or
part of one), with every key's type, default, bounds or choices and a line of help.

The defaults are params.yaml's (tests/test_contracts.py checks that). Choices come from the registries (losses,
heads, feature kinds, VADs, learning-rate schedules, strategies, sources, fusions, score normalisations,
statistics branches), read when a contract is read, so a loss or head registered later is a valid choice; this
module imports none of them itself, so reading the data or features params does not load Keras. The augment
section's two contracts live beside the code that uses them (voiceprint.data.augment.AugmentSettings and MaskSettings).

A stage reads its contracts with ``Contract.read(load_params())`` and passes them to the package, e.g.
``train_head(base, store, split, HeadSettings.read(params))``; each stage's ``read_settings(params)`` reads all it
uses, so a test can compare what it reads with its ``params:`` in dvc.yaml.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from voiceprint.core.params import Contract, Params, setting


# --- Choices, from the registries (imported when a contract is read) ---

def _sources():
    from voiceprint.data.corpus import SOURCES
    return SOURCES


def _librispeech_subsets():
    from voiceprint.data.corpus.librispeech import SUBSETS
    return list(SUBSETS)


def _feature_kinds():
    from voiceprint.features import FEATURE_KINDS
    return sorted(FEATURE_KINDS)


def _vads():
    from voiceprint.features import VAD_KINDS
    return VAD_KINDS


def _classification_losses():
    from voiceprint.losses import classification_losses
    return classification_losses()


def _losses():
    from voiceprint.losses import LOSSES
    return sorted(LOSSES)


def _heads():
    from voiceprint.models import HEADS
    return sorted(HEADS)


def _lr_schedules():
    from voiceprint.training.fit import LR_SCHEDULES
    return LR_SCHEDULES


def _strategies():
    from voiceprint.training.distribute import STRATEGIES
    return STRATEGIES


def _score_norms():
    from voiceprint.evaluation.score_norm import SCORE_NORMS
    return SCORE_NORMS


def _stats_branches():
    from voiceprint.evaluation.stats_lda import STATS_BRANCHES
    return STATS_BRANCHES


def _fusions():
    from voiceprint.evaluation.scoring import FUSIONS
    return FUSIONS


def _tdnn_context(context):
    from voiceprint.models import context_to_conv
    return context_to_conv(context)


def check_passed_through(section: Params, key: str, given: dict, accepted: list[str], owner: str,
                         named: tuple[str, ...]) -> None:
    """``given`` (a ``*_args`` mapping) must name only settings ``owner`` takes, and none that come from the
    section's own keys (``named``)."""
    for name in given:
        if name in named:
            raise section.error(key, f"{name!r} comes from its own key in this section; set it there")
        if name not in accepted:
            raise section.error(key, f"{owner} takes no setting {name!r}; it takes: {', '.join(accepted) or 'none'}")


# --- The contracts, in pipeline order ---

@dataclass(frozen=True)
class DataSettings(Contract):
    """Stage download: where the raw corpus comes from."""
    section = "data"
    source: str = setting("synthetic", "synthetic (generated offline) | librispeech | folder", choices=_sources)
    seed: int = setting(2017, "seed of the synthetic corpus", min=0)
    speakers: int = setting(240, "synthetic corpus: speakers", min=2)
    utterances_per_speaker: int = setting(20, "synthetic corpus: utterances per speaker", min=2)
    min_seconds: float = setting(2.0, "synthetic corpus: shortest utterance, seconds", min=0.0, min_exclusive=True)
    max_seconds: float = setting(4.0, "synthetic corpus: longest utterance, seconds", min=0.0, min_exclusive=True)
    subsets: tuple[str, ...] = setting(("dev-clean",), "librispeech: the subsets to download",
                                       choices=_librispeech_subsets)
    mirror: str = setting("https://www.openslr.org/resources/12", "librispeech: archives are {mirror}/{subset}.tar.gz")
    folder: str = setting("data/folder", "folder source: <speaker>/**/<audio>, a LibriSpeech tree, or a CSV")
    add_synthetic_speakers: int = setting(0, "real sources: add this many synthetic speakers (training only)", min=0)

    def validate(self, section: Params) -> "DataSettings":
        if self.max_seconds < self.min_seconds:
            raise section.error("max_seconds", f"must be >= {self.min_seconds}, got {self.max_seconds}")
        return self


@dataclass(frozen=True)
class FeatureParams(Contract):
    """Stage mfcc: the frame-level features of every utterance (the ``features`` section); :meth:`settings` makes
    the one :class:`voiceprint.features.FeatureSettings` that describes them from here to the bundle."""
    section = "features"
    kind: str = setting("logmel_cmn", "a registered feature kind: logmel_cmn | fbank_norm (original recipe)",
                        choices=_feature_kinds)
    min_seconds: float = setting(0.5, "shorter files are rejected (after decoding, before the VAD)", min=0.0)
    vad: str = setting("original", "original (edge trim) | energy (also removes inner pauses)", choices=_vads)
    max_clipped_fraction: float = setting(0.01, "reject files with more samples than this at full scale",
                                          min=0.0, max=1.0)

    def settings(self, *, sample_rate: int, num_bands: int):
        """The run's :class:`~voiceprint.features.FeatureSettings` (the embedding windows are evaluate's)."""
        from voiceprint.features.settings import FeatureSettings

        return FeatureSettings(kind=self.kind, sample_rate=sample_rate, num_bands=num_bands,
                               min_seconds=self.min_seconds, vad=self.vad,
                               max_clipped_fraction=self.max_clipped_fraction)


@dataclass(frozen=True)
class ModelInputsSettings(Contract):
    """Stage model_inputs: the speaker-disjoint split, validation hold-out and trial list."""
    section = "model_inputs"
    seed: int = setting(7, "seed of the split and the trials", min=0)
    eval_speakers: int = setting(40, "held-out speakers, never seen in training", min=1)
    validation_fraction: float = setting(0.1, "share of each training speaker's utterances held out", min=0.0,
                                         max=0.5)
    max_nontarget_trials: int = setting(200000, "at most this many non-target trials", min=1)


@dataclass(frozen=True)
class SoftmaxSettings(Contract):
    """Stage softmax: the ResCNN and its classification pre-training."""
    section = "softmax"
    filters: tuple[int, ...] = setting((16, 32, 64, 128), "channels per ResCNN stage", min=1)
    blocks: int = setting(1, "residual blocks per stage", min=0)
    embedding_dim: int = setting(512, "embedding size", min=1)
    frames: int = setting(160, "training crop length (10 ms frames)", min=16)
    epochs: int = setting(16, "training epochs", min=1)
    batch_size: int = setting(64, "global batch size", min=2)
    lr: float = setting(0.001, "Adam learning rate", min=0.0, min_exclusive=True)
    dropout: float = setting(0.5, "dropout before the embedding layer", min=0.0, max=0.95)
    seed: int = setting(1, "seed of the weights and batches", min=0)
    init_checkpoint: str = setting("checkpoints/none", "original-format .h5 under checkpoints/ to start from")
    loss: str = setting("softmax", "a classification loss (voiceprint.losses)", choices=_classification_losses)
    margin: float = setting(0.2, "aam_softmax: angular margin, radians", min=0.0, max=1.5)
    scale: float = setting(30.0, "aam_softmax: logit scale", min=0.0, min_exclusive=True)
    lr_schedule: str = setting("constant", "constant | cosine (decays to 0 over the run)", choices=_lr_schedules)
    loss_args: dict[str, Any] = setting({}, "settings of the loss beyond margin and scale (its own keywords)")

    def validate(self, section: Params) -> "SoftmaxSettings":
        from voiceprint.losses import loss_spec

        check_passed_through(section, "loss_args", self.loss_args, loss_spec(self.loss).settings(),
                             f"loss {self.loss}", ("margin", "scale"))
        return self

    def loss_settings(self) -> dict:
        return {"margin": self.margin, "scale": self.scale, **self.loss_args}


@dataclass(frozen=True)
class TripletSettings(Contract):
    """Stage triplet: fine-tuning with the triplet loss on cosine similarity."""
    section = "triplet"
    alpha: float = setting(0.1, "margin on cosine similarity", min=0.0, max=2.0)
    epochs: int = setting(4, "0 = no fine-tuning", min=0)
    steps_per_epoch: int = setting(25, "P x K batches per epoch", min=1)
    speakers_per_batch: int = setting(16, "P", min=2)
    utterances_per_speaker: int = setting(4, "K", min=2)
    frames: int = setting(160, "training crop length (10 ms frames)", min=16)
    lr: float = setting(0.0001, "Adam learning rate", min=0.0, min_exclusive=True)
    seed: int = setting(2, "seed of the batches", min=0)
    init_checkpoint: str = setting("checkpoints/none", "original-format .h5 to fine-tune instead of softmax.keras")


@dataclass(frozen=True)
class TrainSettings(Contract):
    """Stages softmax and triplet: where training runs (voiceprint/training/distribute.py)."""
    section = "train"
    strategy: str = setting("auto", "auto (one device) | mirrored | multi_worker", choices=_strategies)
    mixed_precision: bool = setting(False, "float16 on a GPU, bfloat16 on a CPU with native bf16")


# tdnn.* keys of the head's own builder and loss, which its *_args may not repeat
_HEAD_KEYS = ("units", "layers_count", "dropout", "output_dim", "contexts", "input_dim")
_LOSS_KEYS = ("alpha", "margin", "scale")


@dataclass(frozen=True)
class HeadSettings(Contract):
    """Stage tdnn_head: a head trained on the triplet model."""
    section = "tdnn"
    kind: str = setting("dense", "a registered head (voiceprint.models.HEADS): dense | frame", choices=_heads)
    units: int = setting(512, "dense and segment layer width", min=1)
    layers: int = setting(2, "dense layers (dense) or segment layers after pooling (frame)", min=0)
    dropout: float = setting(0.5, "dropout after each dense or segment layer", min=0.0, max=0.95)
    output_dim: int = setting(128, "head embedding size", min=1)
    contexts: tuple[tuple[int, ...], ...] = setting(((-1, 0, 1), (-1, 0, 1), (-1, 0, 1), (0,), (0,)),
                                                    "frame: TDNN contexts in trunk steps", check=_tdnn_context)
    loss: str = setting("softmax", "a registered loss (voiceprint.losses.LOSSES)", choices=_losses)
    alpha: float = setting(0.1, "triplet: margin", min=0.0, max=2.0)
    margin: float = setting(0.2, "aam_softmax: angular margin, radians", min=0.0, max=1.0)
    scale: float = setting(30.0, "aam_softmax: logit scale", min=0.0, min_exclusive=True)
    epochs: int = setting(30, "training epochs", min=1)
    lr: float = setting(0.001, "Adam learning rate of the head", min=0.0, min_exclusive=True)
    batch_size: int = setting(128, "batch size", min=4)
    crops_per_utterance: int = setting(4, "random crops per training utterance", min=1)
    utterances_per_speaker: int = setting(4, "triplet: K of the P x K batches", min=2)
    frames: int = setting(160, "crop length (10 ms frames)", min=16)
    train_trunk: bool = setting(False, "fine-tune the trunk jointly (fresh crops per batch; much slower)")
    trunk_lr: float = setting(0.0001, "trunk learning rate when train_trunk", min=0.0, min_exclusive=True)
    seed: int = setting(3, "seed of the weights, crops and batches", min=0)
    loss_args: dict[str, Any] = setting({}, "settings of the loss beyond alpha, margin and scale")
    head_args: dict[str, Any] = setting({}, "settings of the head's builder beyond the keys above")

    def validate(self, section: Params) -> "HeadSettings":
        from voiceprint.losses import loss_spec
        from voiceprint.models import head_settings

        check_passed_through(section, "loss_args", self.loss_args, loss_spec(self.loss).settings(),
                             f"loss {self.loss}", _LOSS_KEYS)
        check_passed_through(section, "head_args", self.head_args, head_settings(self.kind),
                             f"head {self.kind}", _HEAD_KEYS)
        return self

    def loss_settings(self) -> dict:
        return {"alpha": self.alpha, "margin": self.margin, "scale": self.scale, **self.loss_args}

    def head_builder_settings(self) -> dict:
        return {"units": self.units, "layers_count": self.layers, "dropout": self.dropout,
                "output_dim": self.output_dim, "contexts": self.contexts, **self.head_args}


# the systems evaluate can package as models/voiceprint
DEPLOYABLE = ("base", "head", "fused")
# voiceprint.evaluation.score_norm.MIN_TOP_N (one cohort score has no spread), not imported so that every stage's
# contracts
# stay free of numpy; tests/test_contracts.py checks that the two agree
MIN_COHORT_TOP_N = 2


@dataclass(frozen=True)
class EvaluateSettings(Contract):
    """Stage evaluate: scoring every system, the fusion of base and head, the deployed bundle and its calibration."""
    section = "evaluate"
    window_frames: int = setting(0, "0 = whole utterance in one pass; else mean over windows of this many frames",
                                 min=0)
    hop_frames: int = setting(80, "hop between those windows, frames", min=1)
    p_target: float = setting(0.01, "minDCF prior", min=0.0, max=1.0, min_exclusive=True)
    low_far: float = setting(0.01, "false-accept rate of the bundle's low_far threshold", min=0.0, max=1.0,
                             min_exclusive=True)
    fusion: str = setting("concat", "none | concat (base + head embeddings) | score (weighted mean of cosines)",
                          choices=_fusions)
    fusion_weight: float = setting(0.5, "score fusion: weight of the base score", min=0.0, max=1.0)
    deploy: str = setting("fused", "system packaged as models/voiceprint: base | head | fused (needs a fusion)",
                          choices=DEPLOYABLE)
    bootstrap: int = setting(200, "speaker-bootstrap replicates for the EER 95% interval", min=0)
    seed: int = setting(123, "seed of the bootstrap, cohort, calibration split and projection", min=0)
    cross_corpus: str = setting("data/cross_corpus", "recordings of a corpus never trained on (none there: skipped)")
    score_norm: str = setting("none", "none (cosine) | as_norm (adaptive symmetric normalisation)",
                              choices=_score_norms)
    cohort_top_n: int = setting(100, "as_norm: closest cohort speakers per utterance", min=MIN_COHORT_TOP_N)
    cohort_utterances: int = setting(3, "as_norm: training utterances embedded per cohort speaker", min=1)
    stats_branch: str = setting("none", "none | lda (join LDA-projected MFCC statistics)", choices=_stats_branches)
    stats_weight: float = setting(0.5, "lda: share of the statistics branch in the joint score", min=0.0, max=1.0)
    trials: str = setting("", "\"\": the generated trials; else a Kaldi or VoxCeleb list under data/trials/")
    calibration_speakers: float = setting(0.5, "share of the evaluation speakers the LLR calibration is fitted on",
                                          min=0.0, max=1.0, min_exclusive=True)
    calibration_prior: float = setting(0.5, "effective prior of the calibration's logistic regression", min=0.0,
                                       max=1.0, min_exclusive=True)

    def validate(self, section: Params) -> "EvaluateSettings":
        from pathlib import Path

        from voiceprint.evaluation.trials import TRIALS_FOLDER

        if self.deploy == "fused" and self.fusion == "none":
            raise section.error("deploy", "'fused' needs evaluate.fusion concat or score, not none")
        if self.calibration_prior >= 1.0:
            raise section.error("calibration_prior", f"must be < 1, got {self.calibration_prior}")
        if self.trials:
            path = Path(self.trials)
            # dvc.yaml tracks the folder: a list elsewhere could change without evaluate re-running.
            if path.is_absolute() or ".." in path.parts or path.parts[:2] != tuple(Path(TRIALS_FOLDER).parts):
                raise section.error("trials", f"{self.trials!r}: put the trial list under {TRIALS_FOLDER}/ (a "
                                              "dependency of the stage in dvc.yaml), or give \"\" for the "
                                              "generated trials")
            if not path.is_file():
                raise section.error("trials", f"trial list {self.trials} not found")
        return self

    def base_weight(self) -> float | None:
        """The weight of the base score in the fused system; None when there is none (fusion: none)."""
        from voiceprint.evaluation.scoring import fusion_base_weight

        return fusion_base_weight(self.fusion, self.fusion_weight)

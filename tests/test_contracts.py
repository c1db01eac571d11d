"""The params contracts: each stage reads exactly the params dvc.yaml declares for it, the contracts' defaults are
params.yaml's, choices come from the registries, and a loss or head added in one file (plus its registration)
is offered by the stage and trained by the ordinary training function, its own settings passed through."""
import dataclasses
import importlib
import sys

import numpy as np
import pytest
import yaml

from tests.conftest import REPO
from tests.test_training import TINY_MODEL, tiny  # noqa: F401 -- tiny: the module's feature store fixture
from voiceprint.core import contracts as C
from voiceprint.data.augment import AugmentSettings, MaskSettings
from voiceprint.core.params import Params, ParamsError, load_params

STAGES = ["download", "mfcc", "model_inputs", "augment", "softmax", "triplet", "tdnn_head", "evaluate"]
CONTRACTS = [C.DataSettings, C.FeatureParams, C.ModelInputsSettings, AugmentSettings, MaskSettings,
             C.SoftmaxSettings, C.TripletSettings, C.TrainSettings, C.HeadSettings, C.EvaluateSettings]


def declared_params() -> dict[str, set[str]]:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: {p for p in stage.get("params", []) if isinstance(p, str)} for name, stage in stages.items()}


def repo_params(reads: set | None = None) -> Params:
    return Params(yaml.safe_load((REPO / "params.yaml").read_text()), source="params.yaml", reads=reads)


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_reads_exactly_the_params_dvc_yaml_declares_for_it(stage):
    reads = set()
    importlib.import_module(f"stages.{stage}").read_settings(repo_params(reads))
    assert reads == declared_params()[stage]


def test_every_key_of_params_yaml_belongs_to_one_contract():
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    keys = {f"{section}.{key}" for section, values in data.items() for key in values}
    owners = {}
    for contract in CONTRACTS:
        for key in contract.keys():
            assert key not in owners, f"{key}: in {owners[key]} and {contract.__name__}"
            owners[key] = contract.__name__
    assert set(owners) == keys


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda c: c.__name__)
def test_contract_defaults_are_the_params_file_values_and_every_key_has_help(contract):
    assert contract.read(load_params(REPO / "params.yaml")) == contract()
    assert all(text.strip() for text in contract.help().values())


def test_choices_come_from_the_registries():
    from voiceprint.data.corpus import SOURCES
    from voiceprint.training.distribute import STRATEGIES
    from voiceprint.evaluation.scoring import FUSIONS
    from voiceprint.features import FEATURE_KINDS, VAD_KINDS
    from voiceprint.losses import LOSSES, classification_losses
    from voiceprint.models import HEADS
    from voiceprint.evaluation.score_norm import MIN_TOP_N, SCORE_NORMS
    from voiceprint.evaluation.stats_lda import STATS_BRANCHES
    from voiceprint.training.fit import LR_SCHEDULES

    def choices(contract, key):
        spec = next(f for f in dataclasses.fields(contract) if f.name == key).metadata["choices"]
        return list(spec())

    assert choices(C.DataSettings, "source") == list(SOURCES)
    assert choices(C.FeatureParams, "kind") == sorted(FEATURE_KINDS)
    assert choices(C.FeatureParams, "vad") == list(VAD_KINDS)
    assert choices(C.SoftmaxSettings, "loss") == classification_losses() == sorted(
        name for name, loss in LOSSES.items() if loss.classification)
    assert choices(C.SoftmaxSettings, "lr_schedule") == list(LR_SCHEDULES)
    assert choices(C.TrainSettings, "strategy") == list(STRATEGIES)
    assert choices(C.HeadSettings, "loss") == sorted(LOSSES)
    assert choices(C.HeadSettings, "kind") == sorted(HEADS)
    assert choices(C.EvaluateSettings, "fusion") == list(FUSIONS)
    assert choices(C.EvaluateSettings, "score_norm") == list(SCORE_NORMS)
    assert choices(C.EvaluateSettings, "stats_branch") == list(STATS_BRANCHES)
    cohort_top_n = next(f for f in dataclasses.fields(C.EvaluateSettings) if f.name == "cohort_top_n")
    assert cohort_top_n.metadata["min"] == MIN_TOP_N


def params_with(section: str, **values) -> Params:
    """The repo's params with ``values`` set in ``section``."""
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data[section].update(values)
    return Params(data)


def tdnn(**values) -> Params:
    return params_with("tdnn", **values)


@pytest.mark.parametrize("values, message", [
    (dict(loss_args={"gamma": 2}),
     "params.yaml: tdnn.loss_args: loss softmax takes no setting 'gamma'; it takes: none"),
    (dict(loss="triplet", loss_args={"alpha": 0.3}), "tdnn.loss_args: 'alpha' comes from its own key"),
    (dict(head_args={"units": 3}), "tdnn.head_args: 'units' comes from its own key"),
    (dict(head_args={"depth": 3}), "tdnn.head_args: head dense takes no setting 'depth'; it takes: input_dim, units"),
    (dict(head_args=[1]), "tdnn.head_args: expected a mapping of names to values"),
    (dict(units=float("nan")), "tdnn.units: expected an integer, got nan"),
    (dict(lr=float("nan")), "tdnn.lr: expected a finite number, got nan"),
    (dict(kind="lstm"), "tdnn.kind: must be one of dense, frame; got 'lstm'"),
])
def test_passed_through_settings_and_bad_values_are_refused_naming_the_key(values, message):
    with pytest.raises(ParamsError) as err:
        C.HeadSettings.read(tdnn(**values))
    assert message in str(err.value)


@pytest.mark.parametrize("values, message", [
    (dict(deploy="fused", fusion="none"), "evaluate.deploy: 'fused' needs evaluate.fusion concat or score, not none"),
    (dict(fusion="sum"), "evaluate.fusion: must be one of none, concat, score; got 'sum'"),
    (dict(fusion_weight=1.5), "evaluate.fusion_weight: must be <= 1.0, got 1.5"),
    (dict(deploy="softmax"), "evaluate.deploy: must be one of base, head, fused; got 'softmax'"),
    (dict(stats_branch="plda"), "evaluate.stats_branch: must be one of none, lda; got 'plda'"),
    (dict(calibration_prior=1.0), "evaluate.calibration_prior: must be < 1, got 1.0"),
    (dict(trials="../veri.txt"), "evaluate.trials: '../veri.txt': put the trial list under data/trials/"),
])
def test_evaluate_settings_refuse_bad_values_and_combinations_naming_the_key(values, message):
    with pytest.raises(ParamsError) as err:
        C.EvaluateSettings.read(params_with("evaluate", **values))
    assert message in str(err.value)


def test_evaluate_fusion_sets_the_base_weight_of_the_fused_system():
    def weight(**values):
        return C.EvaluateSettings.read(params_with("evaluate", **values)).base_weight()

    assert weight(fusion="concat", fusion_weight=0.7) == 0.5
    assert weight(fusion="score", fusion_weight=0.7) == 0.7
    assert weight(fusion="none", deploy="base") is None


@pytest.mark.parametrize("key", ["fusion", "fusion_weight"])
def test_a_params_file_setting_a_moved_fusion_key_is_told_where_it_went(tmp_path, key):
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["tdnn"][key] = 0.7
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    with pytest.raises(ParamsError, match=f"params.yaml: tdnn.{key}: moved to evaluate.{key}; set evaluate.{key}"):
        load_params(tmp_path / "params.yaml")


def test_softmax_offers_only_classification_losses():
    with pytest.raises(ParamsError, match="softmax.loss: must be one of aam_softmax, softmax; got 'triplet'"):
        C.SoftmaxSettings.read(params_with("softmax", loss="triplet"))


PLUGIN = '''
"""A toy loss and a toy head, each registered where it is defined: nothing else in the package changes."""
import keras
from keras import layers, ops

from voiceprint.losses import register_loss
from voiceprint.models import register_head


def _logits(num_classes, name):
    return layers.Dense(num_classes, name=name)


@register_loss("toy_focal", output=_logits, classification=True)
def toy_focal_loss(*, gamma: float):
    """Focal loss (Lin et al. 2017): cross-entropy weighted by (1 - p_target) ** gamma."""
    def focal(y_true, y_pred):
        labels = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        log_p = ops.log_softmax(ops.cast(y_pred, "float32"), axis=-1)
        target = ops.sum(log_p * ops.one_hot(labels, ops.shape(log_p)[-1]), axis=-1)
        return ops.mean(-((1.0 - ops.exp(target)) ** gamma) * target)
    return focal


def toy_head(*, input_dim: int, output_dim: int, width: int):
    inputs = keras.Input((input_dim,))
    hidden = layers.Dense(width, activation="tanh", name="toy_hidden")(inputs)
    return keras.Model(inputs, layers.Dense(output_dim, name="head_output")(hidden), name="toy_head")


register_head("toy", toy_head, tap="embedding")
'''


@pytest.fixture
def toy_plugin(tmp_path, monkeypatch):
    from voiceprint.losses import LOSSES
    from voiceprint.models import HEADS

    (tmp_path / "toy_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    losses, heads = dict(LOSSES), dict(HEADS)      # restored after the test: the registrations removed
    yield importlib.import_module("toy_plugin")
    sys.modules.pop("toy_plugin", None)
    LOSSES.clear(), LOSSES.update(losses)
    HEADS.clear(), HEADS.update(heads)


def test_a_loss_and_a_head_added_in_one_file_are_offered_and_trained_with_their_own_settings(toy_plugin, tiny):
    from voiceprint.core.runtime import configure_tensorflow
    from voiceprint.training.fit import train_head, train_softmax

    settings = C.HeadSettings.read(tdnn(kind="toy", loss="toy_focal", loss_args={"gamma": 2.0},
                                        head_args={"width": 6}, output_dim=3, epochs=1, batch_size=8,
                                        crops_per_utterance=1, frames=32))
    assert (settings.kind, settings.loss_args, settings.head_args) == ("toy", {"gamma": 2.0}, {"width": 6})
    with pytest.raises(ParamsError, match="tdnn.head_args: head toy takes no setting 'depth'"):
        C.HeadSettings.read(tdnn(kind="toy", head_args={"width": 6, "depth": 2}))
    softmax = C.SoftmaxSettings.read(params_with("softmax", loss="toy_focal", loss_args={"gamma": 1.0}))
    assert softmax.loss_settings() == {"margin": 0.2, "scale": 30.0, "gamma": 1.0}

    store, split = tiny
    configure_tensorflow(1)
    base = train_softmax(store, split, C.SoftmaxSettings(**{**TINY_MODEL, "epochs": 1, "batch_size": 4},
                                                         loss="toy_focal", loss_args={"gamma": 2.0}),
                         verbose=0).model
    trained = train_head(base, store, split, settings, verbose=0)
    assert trained.head.head.name == "toy_head" and trained.head.head.get_layer("toy_hidden").units == 6
    assert list(trained.history.columns) == ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"]
    assert np.isfinite(trained.history.loss).all()
    out = trained.model.predict(np.zeros((2, 40, 64, 1), "float32"), verbose=0)
    assert out.shape == (2, 3)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)

import pytest

from tests.conftest import REPO
from voiceprint.core.params import Params, ParamsError, load_params


def section(**values):
    return Params({"softmax": values}).section("softmax")


def test_valid_values_are_returned_typed():
    p = section(epochs=3, lr=0.01, filters=[8, 16], name="x", flag=True)
    assert p.int("epochs", min=1) == 3
    assert p.float("lr", min=0, min_exclusive=True) == 0.01
    assert p.int_list("filters", min=1) == [8, 16]
    assert p.str("name", choices=["x"]) == "x"
    assert p.bool("flag") is True


@pytest.mark.parametrize("call, message", [
    (lambda p: p.int("epochs"), "softmax.epochs: expected an integer, got 'ten'"),
    (lambda p: p.int("zero", min=1), "softmax.zero: must be >= 1, got 0"),
    (lambda p: p.float("lr", min=0, min_exclusive=True), "softmax.lr: must be > 0"),
    (lambda p: p.int("missing"), "softmax.missing: missing"),
    (lambda p: p.str("kind", choices=["a", "b"]), "softmax.kind: must be one of a, b; got 'c'"),
    (lambda p: p.int_list("filters"), "softmax.filters: expected a list of at least 1 integers"),
    (lambda p: p.int("flag"), "softmax.flag: expected an integer, got True"),
])
def test_bad_values_name_the_dotted_key(call, message):
    p = section(epochs="ten", zero=0, lr=0.0, kind="c", filters=[], flag=True)
    with pytest.raises(ParamsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(p)


def test_load_params_errors(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ParamsError, match="mapping"):
        load_params(bad)
    with pytest.raises(ParamsError, match="data: expected a section"):
        Params({"data": 3}).section("data")


def test_repo_params_file_is_valid():
    from tests.conftest import REPO

    params = load_params(REPO / "params.yaml")
    assert params.section("tdnn").int("units", min=1) > 0


def test_preset_becomes_set_param_flags(tmp_path):
    from voiceprint.core.params import preset_assignments

    preset = tmp_path / "preset.yaml"
    preset.write_text("softmax:\n  filters: [64, 128]\n  epochs: 40\ndata:\n  source: librispeech\n")
    assert preset_assignments(preset, REPO / "params.yaml") == [
        "softmax.filters=[64, 128]", "softmax.epochs=40", "data.source=librispeech"]
    preset.write_text("softmax:\n  epoch: 40\n")
    with pytest.raises(ParamsError, match="softmax.epoch: not a key"):
        preset_assignments(preset, REPO / "params.yaml")
    # the shipped preset only names existing keys
    assert len(preset_assignments(REPO / "params-librispeech.yaml", REPO / "params.yaml")) > 10


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_are_not_numbers_in_range(value):
    with pytest.raises(ParamsError, match="softmax.lr: expected a finite number"):
        section(lr=value).float("lr", min=0, max=1)


def test_a_misspelt_key_is_refused_naming_the_closest(tmp_path):
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())   # dvc.yaml lists every stage's params
    text = (REPO / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(text.replace("eval_speakers:", "eval_speaker:"))
    with pytest.raises(ParamsError, match=r"params.yaml: model_inputs.eval_speaker: unknown key \(no stage in "
                                          r"dvc.yaml reads it\); did you mean model_inputs.eval_speakers\?"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text(text)
    load_params(tmp_path / "params.yaml")


def test_broken_yaml_is_one_line_with_line_and_column(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("data:\n  source: [synthetic\n  seed: 0\n")
    with pytest.raises(ParamsError) as info:
        load_params(bad)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{bad}:") and "line 3, column" in message

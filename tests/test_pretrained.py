"""The pretrained real-speech model shipped in the package: packaging, the sha256 check, the fallback when no model
of the user's own exists, and (with ../shared) that it separates real speakers it never heard."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from voiceprint.serving import cli, pretrained  # noqa: E402
from voiceprint.serving.api import Recognizer, default_model_path  # noqa: E402
from voiceprint.serving.bundle import save_bundle  # noqa: E402
from voiceprint.models import build_rescnn  # noqa: E402

FEATURES = {"kind": "logmel_cmn", "vad": "original", "sample_rate": 16000, "num_bands": 64, "min_seconds": 0.5,
            "window_frames": 0, "hop_frames": 80}
EVAL = {"deployed": "base", "base": {"eer": 0.05, "min_dcf": 0.5, "target_trials": 10, "nontarget_trials": 90,
                                     "eer_threshold": 0.4},
        "mfcc_baseline": {"eer": 0.2},
        "cross_corpus": {"base": {"eer": 0.1, "min_dcf": 0.6, "target_trials": 5, "nontarget_trials": 50},
                         "mfcc_baseline": {"eer": 0.3}}}


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    root = tmp_path_factory.mktemp("ship")
    keras.utils.set_random_seed(0)
    model, _ = build_rescnn(filters=[4, 8, 8, 8], blocks=1, embedding_dim=16, num_bands=64)
    bundle = save_bundle(root / "bundle", model, system="base", features=FEATURES,
                         thresholds={"eer": 0.4, "low_far": 0.6, "low_far_rate": 0.01},
                         evaluation={k: EVAL["base"][k] for k in ("eer", "min_dcf", "target_trials",
                                                                  "nontarget_trials")})
    (root / "eval.json").write_text(json.dumps(EVAL))
    manifest = pretrained.package(bundle, root / "eval.json", root / "shipped", name="tiny",
                                  trained_on="4 test speakers", not_for="anything")
    return root / "shipped", manifest


def test_package_records_provenance_evaluation_and_hashes(packaged):
    shipped, manifest = packaged
    assert manifest["trained_on"] == "4 test speakers" and manifest["system"] == "base"
    assert manifest["evaluation"]["in_domain"]["eer"] == 0.05
    assert manifest["evaluation"]["cross_corpus"]["eer"] == 0.1
    assert manifest["evaluation"]["cross_corpus_mfcc_baseline"] == 0.3
    assert set(manifest["sha256"]) == {"model.keras", "thresholds.json"}
    assert pretrained.shipped_model(shipped) == shipped


@pytest.mark.parametrize("damage", ["corrupt", "missing_file", "missing_manifest"])
def test_damaged_shipped_model_says_reinstall_and_exits_3(packaged, tmp_path, monkeypatch, capsys, damage):
    import shutil

    shipped = shutil.copytree(packaged[0], tmp_path / "shipped")
    if damage == "corrupt":
        with open(shipped / "model.keras", "ab") as fh:
            fh.write(b"\0")
    elif damage == "missing_file":
        (shipped / "model.keras").unlink()
    else:
        (shipped / "pretrained.json").unlink()
    with pytest.raises(pretrained.ShippedModelError, match="reinstall"):
        pretrained.shipped_model(shipped)
    monkeypatch.setattr(pretrained, "SHIPPED", shipped.resolve())
    monkeypatch.delenv("VOICEPRINT_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)                        # no models/voiceprint here
    assert default_model_path() == shipped.resolve()
    code = cli.main(["verify", "a.flac", "b.flac", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == cli.EXIT_MODEL == 3 and "reinstall" in out["error"]["message"]


def test_without_a_model_of_ones_own_the_shipped_one_answers_and_says_so(packaged, tmp_path, monkeypatch, capsys):
    import soundfile as sf

    shipped = packaged[0].resolve()
    monkeypatch.setattr(pretrained, "SHIPPED", shipped)
    monkeypatch.delenv("VOICEPRINT_MODEL", raising=False)
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    for name in ("a.wav", "b.wav"):
        sf.write(name, (0.1 * rng.normal(size=16000)).astype(np.float32), 16000)
    code = cli.main(["verify", "a.wav", "b.wav", "--json"])
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert code == 0, captured.err
    assert out["model_name"] == "tiny" and out["trained_on"] == "4 test speakers"
    assert Path(out["model"]).resolve() == shipped
    assert "using the model shipped with the package" in captured.err
    (tmp_path / "models/voiceprint").mkdir(parents=True)      # a pipeline run here takes precedence
    assert default_model_path() == Path("models/voiceprint")


def test_the_shipped_real_speech_model_is_intact():
    manifest = pretrained.describe()
    assert pretrained.shipped_model() == pretrained.SHIPPED
    assert "speechocean762" in manifest["trained_on"] and manifest["not_for"]
    size = sum(p.stat().st_size for p in pretrained.SHIPPED.iterdir())
    assert size < 20e6


def test_the_shipped_model_separates_real_speakers_it_never_heard(shared_dir):
    """librispeech-mini was never trained on: same-speaker pairs must score above different-speaker pairs."""
    root = shared_dir / "data/librispeech-mini/LibriSpeech"
    speakers = sorted(p for p in root.glob("*/*") if p.is_dir())[:4]
    files = {s.name: sorted(s.rglob("*.flac"))[:3] for s in speakers}
    rec = Recognizer(pretrained.SHIPPED)
    names = [n for n in files for _ in files[n]]
    emb = rec.embed_files([f for n in files for f in files[n]])
    scores = rec.scores(emb, emb)
    same = np.array([[a == b for b in names] for a in names])
    off_diagonal = ~np.eye(len(names), dtype=bool)
    target, nontarget = scores[same & off_diagonal], scores[~same]
    assert target.mean() > nontarget.mean() + 0.1 * np.abs(nontarget).mean()
    # most same-speaker pairs beat most different-speaker pairs (AUC well above chance)
    auc = (target[:, None] > nontarget[None, :]).mean()
    assert auc > 0.8

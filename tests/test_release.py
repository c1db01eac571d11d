"""Releasing the model the DVC way (docs/release.md): the `voiceprint` artifact of dvc.yaml is pushed to a DVC
remote (a local directory here), registered with GTO, and fetched by the documented commands into a fresh clone
and into a consumer's folder, where `voiceprint verify --model` uses it.  And a fresh clone pulls the committed
outputs of a (tiny) pipeline from the remote and finds them up to date instead of recomputing them."""
import json
from pathlib import Path

import pytest
import yaml

keras = pytest.importorskip("keras")
pytestmark = pytest.mark.e2e  # real dvc, git and gto commands: ~40 s per test on an idle 2-core machine

from tests.conftest import REPO  # noqa: E402
from tests.test_pipeline_e2e import make_repo, run  # noqa: E402
from voiceprint.serving import api, cli  # noqa: E402
from voiceprint.serving.bundle import save_bundle  # noqa: E402
from voiceprint.data.corpus.synthetic import generate  # noqa: E402
from voiceprint.models import build_rescnn  # noqa: E402

FEATURES = {"kind": "logmel_cmn", "vad": "original", "sample_rate": 16000, "num_bands": 64, "min_seconds": 0.5,
            "window_frames": 0, "hop_frames": 80}
VERSION = "v0.1.0"


def _tiny_bundle(path: Path) -> Path:
    keras.utils.set_random_seed(0)
    model, _ = build_rescnn(filters=[4, 8, 8, 8], blocks=1, embedding_dim=16, num_bands=64, num_classes=3,
                            dropout=0.0)
    return save_bundle(path, model, system="head", features=FEATURES,
                       thresholds={"eer": 0.5, "low_far": 0.9, "low_far_rate": 0.01}, evaluation={"eer": 0.1})


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _verify(model: Path, a: Path, b: Path, capsys) -> dict:
    capsys.readouterr()
    assert cli.main(["verify", str(a), str(b), "--model", str(model), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_released_bundle_reaches_a_fresh_clone_and_a_consumer_and_verifies(tmp_path, capsys):
    artifacts = yaml.safe_load((REPO / "dvc.yaml").read_text())["artifacts"]
    assert artifacts["voiceprint"]["path"] == "models/voiceprint" and artifacts["voiceprint"]["type"] == "model"
    assert artifacts["voiceprint"]["desc"] and artifacts["voiceprint"]["labels"]

    # The project with a trained bundle in models/voiceprint.  A repo whose dvc.yaml holds only the project's
    # artifacts declaration: the bundle is tracked with `dvc add`, not produced by running the whole pipeline.
    root, env = make_repo(tmp_path / "project", {})
    (root / "dvc.yaml").write_text(yaml.safe_dump({"artifacts": artifacts}, sort_keys=False))
    bundle = _tiny_bundle(root / "models/voiceprint")
    remote = tmp_path / "remote"
    run(["dvc", "add", "models/voiceprint"], root, env)
    run(["dvc", "remote", "add", "-d", "local", str(remote)], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "release the voiceprint bundle"], root, env)
    # Publish: a GTO version tag on the commit, and the bundle's files on the remote.
    run(["gto", "register", "voiceprint", "--version", VERSION], root, env)
    tags = run(["git", "tag", "--list"], root, env).split()
    assert tags == [f"voiceprint@{VERSION}"]
    run(["dvc", "push"], root, env)
    assert any(p.is_file() for p in remote.rglob("*"))

    audio = tmp_path / "audio"
    manifest = generate(audio, num_speakers=2, utterances_per_speaker=2, min_seconds=1.0, max_seconds=1.5, seed=0)
    a, b = audio / manifest.path[0], audio / manifest.path[2]
    expected = api.Recognizer(bundle).verify(a, b).score

    # A fresh clone pulls the bundle from the remote: same files, nothing stale.
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(root), str(clone)], tmp_path, env)
    run(["dvc", "pull"], clone, env)
    assert _files(clone / "models/voiceprint") == _files(bundle)
    assert "up to date" in run(["dvc", "status"], clone, env)
    assert _verify(clone / "models/voiceprint", a, b, capsys)["score"] == pytest.approx(expected, abs=1e-6)

    # A consumer outside any clone: the registered version, by artifact name.
    consumer = tmp_path / "consumer"
    consumer.mkdir()
    run(["dvc", "artifacts", "get", str(root), "voiceprint", "--rev", VERSION, "-o", "voiceprint-model"],
        consumer, env)
    assert _files(consumer / "voiceprint-model") == _files(bundle)
    result = _verify(consumer / "voiceprint-model", a, b, capsys)
    assert result["score"] == pytest.approx(expected, abs=1e-6)
    assert result["threshold"] == pytest.approx(0.5)


def test_a_fresh_clone_pulls_committed_outputs_and_finds_them_up_to_date(tmp_path):
    tiny = {"data": {"speakers": 2, "utterances_per_speaker": 2, "min_seconds": 1.0, "max_seconds": 1.5}}
    root, env = make_repo(tmp_path / "project", tiny)
    run(["dvc", "remote", "add", "-d", "local", str(tmp_path / "remote")], root, env)
    run(["dvc", "repro", "download"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "download outputs"], root, env)
    run(["dvc", "push"], root, env)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(root), str(clone)], tmp_path, env)
    assert "download" in run(["dvc", "status", "download"], clone, env)  # before the pull: outputs missing
    run(["dvc", "pull", "download"], clone, env)
    assert _files(clone / "data/raw") == _files(root / "data/raw")
    assert json.loads(run(["dvc", "status", "download", "--json"], clone, env)) == {}  # dvc repro: nothing to do


def test_release_docs_show_the_commands_this_test_runs():
    text = (REPO / "docs/release.md").read_text()
    for command in ("gto register voiceprint", "git tag -a voiceprint@", "dvc push", "dvc pull",
                    "dvc artifacts get", "dvc get", "dvc remote add", "voiceprint verify", "--model"):
        assert command in text, command
    assert "(docs/release.md)" in (REPO / "README.md").read_text()

"""End to end: the real ``dvc repro`` / ``dvc exp run`` / ``dvc metrics diff`` on a temporary copy of the repo
with tiny params. Checks which stages run for which change, and what the metrics contain."""
import json
import os
import re
import shutil
import subprocess
import zipfile
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.e2e

ALL_STAGES = {"download", "mfcc", "model_inputs", "augment", "softmax", "triplet", "tdnn_head", "evaluate"}

TINY = {
    "data": {"speakers": 8, "utterances_per_speaker": 4, "min_seconds": 1.0, "max_seconds": 1.5},
    "model_inputs": {"eval_speakers": 3, "max_nontarget_trials": 1000},
    "softmax": {"filters": [4, 8, 8, 8], "blocks": 1, "embedding_dim": 16, "frames": 64, "epochs": 2,
                "batch_size": 8},
    "triplet": {"alpha": 0.0, "epochs": 1, "steps_per_epoch": 2, "speakers_per_batch": 4, "utterances_per_speaker": 2,
                "frames": 64},
    "tdnn": {"units": 16, "output_dim": 8, "epochs": 2, "batch_size": 16, "crops_per_utterance": 2,
             "frames": 64},
    "evaluate": {"bootstrap": 20},
}


def _tracked_files():
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.split("\0") if f]


def run(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout + proc.stderr


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w]+)'", output))


def make_repo(dst: Path, overrides: dict):
    """A git repo at ``dst`` holding the project's tracked files (no outputs) and params.yaml with ``overrides``."""
    for rel in _tracked_files():
        src = REPO / rel
        if src.is_file() and not rel.startswith(("data/raw", "data/features", "data/model_inputs", "models/",
                                                 "metrics/", "plots/", "versions/", "dvclive/")) \
                and rel != "dvc.lock":
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    # numba's cached feature kernels, where earlier tests compiled them: valid in the copy because copy2 keeps the
    # source's mtime, which is what numba checks; saves each copy ~15 s of compiling.
    for cached in REPO.glob("voiceprint/features/__pycache__/*.nb[ic]"):
        (dst / cached.relative_to(REPO)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(cached, dst / cached.relative_to(REPO))
    params = yaml.safe_load((dst / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               DVC_NO_ANALYTICS="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    run(["git", "init", "-q", "-b", "main"], dst, env)
    # A machine without a global git identity (CI) must still be able to commit experiments.
    run(["git", "config", "user.name", "voiceprint tests"], dst, env)
    run(["git", "config", "user.email", "tests@voiceprint.invalid"], dst, env)
    run(["git", "add", "-A"], dst, env)
    run(["git", "commit", "-qm", "tiny"], dst, env)
    return dst, env


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_repo(tmp_path_factory.mktemp("pipeline"), TINY)


def test_repro_then_experiments_rerun_what_changed_and_a_head_change_moves_head_eer_not_base_eer(repo):
    root, env = repo
    first = run(["dvc", "repro"], root, env)
    assert stages_run(first) == ALL_STAGES
    report = json.loads((root / "metrics/eval.json").read_text())
    for system in ("softmax", "base", "head", "mfcc_baseline"):
        r = report[system]
        assert 0 <= r["eer"] <= 1 and 0 <= r["min_dcf"] <= 1.0 + 1e-9
        assert r["target_trials"] == 3 * 6 and r["nontarget_trials"] == 66 - 18
        assert r["eer_ci95_low"] <= r["eer"] <= r["eer_ci95_high"]
        assert set(r["original_protocol"]) >= {"f_measure", "tpr", "accuracy"}
    assert isinstance(report["head_minus_base_eer"], float)
    assert "versions" not in report         # metrics hold numbers; the versions have their own file
    versions = json.loads((root / "versions/eval.json").read_text())
    assert "tensorflow-cpu" in versions or "tensorflow" in versions
    for name in ("softmax", "triplet", "tdnn_head"):
        live = json.loads((root / f"dvclive/{name}/metrics.json").read_text())
        assert live["step"] == TINY["tdnn" if name == "tdnn_head" else name]["epochs"] - 1, name
    for name in ("softmax", "triplet"):
        assert (root / f"models/{name}.keras").is_file() and (root / f"plots/{name}.csv").is_file()
    # the head is saved alone, with the tap it reads, and no trunk (the base's, frozen, is models/triplet.keras)
    assert sorted(p.name for p in (root / "models/tdnn_head").iterdir()) == ["head.json", "head.keras"]
    assert (root / "plots/tdnn_head.csv").is_file()

    again = run(["dvc", "repro"], root, env)
    assert stages_run(again) == set()
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "baseline run"], root, env)

    def experiment(*assignment):
        run(["git", "checkout", "--", "."], root, env)
        run(["dvc", "checkout", "-q"], root, env)
        args = [a for kv in assignment for a in ("-S", kv)]
        return stages_run(run(["dvc", "exp", "run", *args], root, env))

    # Only the head changes (here: a frame TDNN, which reads the trunk's frame sequence, with another loss): DVC
    # reruns tdnn_head and evaluate, the head's EER moves, and the base model's (and the softmax model's) EER,
    # rescored by evaluate from unchanged models, stays exactly the same. The deployed fused model is one trunk.
    assert experiment("tdnn.units=24", "tdnn.kind=frame", "tdnn.loss=aam_softmax") == {"tdnn_head", "evaluate"}
    assert json.loads((root / "models/tdnn_head/head.json").read_text())["tap"] == "frames"
    assert _trunks(root / "models/voiceprint/model.keras") == 1
    diff = json.loads(run(["dvc", "metrics", "diff", "--all", "--json"], root, env))["metrics/eval.json"]
    assert diff["head.eer"]["diff"] != 0 and diff["head.eer"]["old"] != diff["head.eer"]["new"]
    for unchanged in ("base.eer", "softmax.eer", "mfcc_baseline.eer"):
        assert diff[unchanged]["diff"] == 0 and diff[unchanged]["old"] == diff[unchanged]["new"], unchanged
    changed = json.loads(run(["dvc", "metrics", "diff", "--json"], root, env)).get("metrics/eval.json", {})
    assert "head.eer" in changed and "base.eer" not in changed

    # Fusion, the MFCC-statistics branch and AS-norm are evaluate's alone; the bundle then serves the joint
    # system, and its fused model is one trunk pass feeding both parts.
    assert experiment("evaluate.fusion=score", "evaluate.fusion_weight=0.7", "evaluate.deploy=fused",
                      "evaluate.stats_branch=lda", "evaluate.score_norm=as_norm",
                      "evaluate.cohort_top_n=3") == {"evaluate"}
    report = json.loads((root / "metrics/eval.json").read_text())
    assert 0 <= report["fused"]["eer"] <= 1 and isinstance(report["fused_minus_base_eer"], float)
    assert {"mfcc_lda", "fused_mfcc_lda", "fused_mfcc_lda_asnorm"} <= set(report)
    calibration = json.loads((root / "models/voiceprint/thresholds.json").read_text())
    assert calibration["system"] == "fused_mfcc_lda" and calibration["embedding_dim"] == 16 + 8 + 4  # 5 speakers
    assert calibration["thresholds"]["eer"] == pytest.approx(report["fused_mfcc_lda_asnorm"]["eer_threshold"])
    assert _trunks(root / "models/voiceprint/model.keras") == 1

    # With Adam, a margin change only changes the weights through which triplets are active; from 0 to 1 the
    # active set surely changes (were the weights identical, DVC would rightly skip everything downstream).
    assert experiment("triplet.alpha=1.0") == {"triplet", "tdnn_head", "evaluate"}
    # Augmentation: copies feed every training stage; masks and AAM touch softmax pre-training onwards. (A data
    # change reruns everything: the first repro showed every stage running.)
    assert experiment("augment.speed_perturb=true", "augment.copies=1", "augment.time_masks=2",
                      "softmax.loss=aam_softmax") == ALL_STAGES - {"download", "mfcc", "model_inputs"}
    augmented = json.loads((root / "metrics/augment.json").read_text())
    train_utterances = json.loads((root / "metrics/model_inputs.json").read_text())["utterances"]["train"]
    assert augmented["copies"] == train_utterances * 5 and augmented["failed"] == 0
    assert augmented["classes"] == 3 * 5                 # 5 training speakers, and their 0.9x and 1.1x twins


def _trunks(model_file: Path) -> int:
    """How many ResCNN trunks a saved model holds: copies of the trunk's first convolution, at any nesting."""
    filters = TINY["softmax"]["filters"]
    first_conv = f"conv{filters[0]}-s" + ("1" if len(set(filters)) < len(filters) else "")  # numbered if repeated

    def layers(node):
        if isinstance(node, dict):
            if node.get("class_name") == "Conv2D":
                yield node["config"]["name"]
            for value in node.values():
                yield from layers(value)
        elif isinstance(node, list):
            for value in node:
                yield from layers(value)

    return list(layers(json.loads(zipfile.ZipFile(model_file).read("config.json")))).count(first_conv)


def test_real_speech_from_a_folder(tmp_path, shared_dir):
    """The whole pipeline on real LibriSpeech recordings left where they are (data.source=folder)."""
    mini = shared_dir / "data/librispeech-mini"
    root, env = make_repo(tmp_path, {**TINY, "data": {"source": "folder", "folder": str(mini)},
                                     "model_inputs": {"eval_speakers": 4, "max_nontarget_trials": 3000}})
    assert stages_run(run(["dvc", "repro"], root, env)) == ALL_STAGES
    download = json.loads((root / "metrics/download.json").read_text())
    assert download["speakers"] == 13 and download["utterances"] == 220
    features = json.loads((root / "metrics/features.json").read_text())
    assert features["utterances_kept"] == 220 and features["rejected"] == 0
    report = json.loads((root / "metrics/eval.json").read_text())
    assert report["base"]["target_trials"] >= 100 and report["base"]["nontarget_trials"] >= 500
    # real speech: even the untrained-baseline statistics separate these speakers far better than chance
    assert report["mfcc_baseline"]["eer"] < 0.3
    assert stages_run(run(["dvc", "repro"], root, env)) == set()


def test_a_temp_experiment_shows_epoch_rows_while_the_stage_trains(tmp_path):
    """`dvc exp run --temp`: the softmax stage's DVCLive log has its first epoch rows on disk before the stage has
    written its model, and `dvc exp show` shows them in the running experiment's row."""
    import signal
    import time

    epochs = 40     # tiny epochs: long enough for `dvc exp show` to run while the stage still trains
    root, env = make_repo(tmp_path, {**TINY, "softmax": {**TINY["softmax"], "epochs": epochs}})
    proc = subprocess.Popen(["dvc", "exp", "run", "--temp", "softmax"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    exps = root / ".dvc/tmp/exps"      # the temporary workspace: exps/standalone/tmpXXXX in DVC 3
    seen = None
    try:
        deadline = time.monotonic() + 900
        while seen is None:
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            assert time.monotonic() < deadline
            for live in [*exps.glob("*/dvclive/softmax/metrics.json"), *exps.glob("*/*/dvclive/softmax/metrics.json")]:
                try:
                    summary = json.loads(live.read_text())
                except ValueError:      # caught mid-write
                    continue
                if "loss" in summary and not (live.parents[2] / "models/softmax.keras").exists():
                    seen = summary, _steps(live.parent / "plots/metrics/loss.tsv")
            time.sleep(0.05)
        shown = json.loads(run(["dvc", "exp", "show", "--json"], root, env))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)     # the experiment and its stage: the rest of training is not needed
        proc.wait()
    summary, steps = seen
    assert summary["step"] == steps[-1] and steps == list(range(len(steps)))
    live_rows = [rev["data"]["metrics"]["dvclive/softmax/metrics.json"]["data"]
                 for baseline in shown for exp in baseline.get("experiments") or [] for rev in exp["revs"]
                 if "dvclive/softmax/metrics.json" in ((rev.get("data") or {}).get("metrics") or {})]
    assert live_rows and all(0 <= row["step"] < epochs - 1 for row in live_rows), live_rows


def _steps(tsv: Path) -> list[int]:
    return [int(line.split("\t")[0]) for line in tsv.read_text().splitlines()[1:]]

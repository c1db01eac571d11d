"""Stage scripts on bad input: clear one-line errors naming the key or file; bad files listed, not fatal."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import REPO
from voiceprint.data.corpus import synthetic


def run_stage(name, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO), VOICEPRINT_WORKERS="2", TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=cwd, env=env, capture_output=True,
                          text=True)


def write_params(root, **sections):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture
def corpus(tmp_path):
    raw = tmp_path / "data/raw"
    manifest = synthetic.generate(raw, num_speakers=3, utterances_per_speaker=2, min_seconds=1.0, max_seconds=1.2,
                                  seed=0)
    return tmp_path, raw, manifest


def test_mfcc_lists_bad_files_and_keeps_going(corpus):
    root, raw, manifest = corpus
    (raw / "corrupt.flac").write_bytes(b"fLaC this is not audio")
    (raw / "empty.wav").write_bytes(b"")
    bad = pd.DataFrame([["corrupt.flac", "spk0000", "bad-1", 1.0, 16000], ["empty.wav", "spk0001", "bad-2", 1.0, 16000]],
                       columns=manifest.columns)
    pd.concat([manifest, bad]).to_csv(raw / "manifest.csv", index=False)
    write_params(root)
    proc = run_stage("mfcc", root)
    assert proc.returncode == 0, proc.stderr
    rejected = pd.read_csv(root / "data/features/rejected.csv")
    assert dict(zip(rejected.path, rejected.reason)) == {"corrupt.flac": "unreadable", "empty.wav": "empty"}
    assert all("corrupt.flac" in m or "empty.wav" in m for m in rejected.message)
    metrics = json.loads((root / "metrics/features.json").read_text())
    assert metrics["utterances_kept"] == len(manifest) and metrics["rejected"] == 2
    assert metrics["rejected_by_reason"] == {"unreadable": 1, "empty": 1}
    assert "rejected corrupt.flac: unreadable" in proc.stdout


def test_mfcc_fails_clearly_when_too_little_is_usable(corpus):
    root, raw, manifest = corpus
    manifest[manifest.speaker == "spk0000"].to_csv(raw / "manifest.csv", index=False)
    write_params(root)
    proc = run_stage("mfcc", root)
    assert proc.returncode == 1
    assert "error: stage mfcc: too little usable audio: 2 of 2 files usable, 1 speaker(s)" in proc.stderr
    assert not (root / "data/features").exists()   # nothing half-written


KILL_A_WORKER = """
import os, runpy, signal
import voiceprint.features.runner as features

real = features._featurize_one

def die_on_stuck(task):     # in a forked worker: SIGKILL mid-file, as the out-of-memory killer does it
    if task[1].endswith("stuck.wav"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(task)

die_on_stuck.__module__, die_on_stuck.__qualname__ = features.__name__, "_featurize_one"  # pickled by name
features._featurize_one = die_on_stuck
runpy.run_module("stages.mfcc", run_name="__main__", alter_sys=True)
"""


def test_mfcc_fails_in_seconds_naming_the_file_when_a_worker_is_killed(corpus):
    root, raw, manifest = corpus
    shutil.copy(raw / manifest.path[0], raw / "stuck.wav")
    stuck = pd.DataFrame([["stuck.wav", "spk0000", "stuck", 1.0, 16000]], columns=manifest.columns)
    pd.concat([manifest, stuck]).to_csv(raw / "manifest.csv", index=False)
    write_params(root)
    (root / "inject.py").write_text(KILL_A_WORKER)
    env = dict(os.environ, PYTHONPATH=str(REPO), VOICEPRINT_WORKERS="2", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen([sys.executable, "inject.py"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=60)     # before the fix: waits forever for the lost file
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the stage and any workers left
        proc.wait()
    assert proc.returncode == 1
    last = err.strip().splitlines()[-1]     # after the progress bar
    assert last.startswith("error: stage mfcc: a features worker process died") and "Traceback" not in err, err
    assert "data/raw/stuck.wav" in last
    assert sorted(p.name for p in (root / "data").iterdir()) == ["raw"]     # no .features.* left


def test_stale_features_temp_dirs_are_removed_at_the_next_start(corpus):
    root, raw, manifest = corpus
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (root / "data" / f".features.{dead}.abc12345" / "features").mkdir(parents=True)    # a stage killed mid-way
    (root / "data" / f".features.{os.getpid()}.def45678").mkdir()                     # a live process's
    manifest.to_csv(raw / "manifest.csv", index=False)
    write_params(root)
    proc = run_stage("mfcc", root)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (root / "data").iterdir()) == [f".features.{os.getpid()}.def45678", "features",
                                                                 "raw"]


@pytest.mark.parametrize("stage, section, values, message", [
    ("softmax", "softmax", {"epochs": "ten"}, "softmax.epochs: expected an integer, got 'ten'"),
    ("triplet", "triplet", {"alpha": -0.1}, "triplet.alpha: must be >= 0.0, got -0.1"),
    ("tdnn_head", "tdnn", {"loss": "mse"}, lambda: f"tdnn.loss: must be one of {registered('losses')}; got 'mse'"),
    ("mfcc", "features", {"kind": "mfcc"},
     lambda: f"features.kind: must be one of {registered('feature_kinds')}; got 'mfcc'"),
    ("download", "data", {"speakers": 1}, "data.speakers: must be >= 2, got 1"),
    ("download", "data", {"source": "folder", "folder": ""}, "data.folder: empty"),
    ("download", "data", {"source": "librispeech", "subsets": ["dev-cleen"]},
     "data.subsets: unknown value(s) ['dev-cleen']"),
    ("tdnn_head", "tdnn", {"contexts": [[-3, -1, 0, 1, 3]]},
     "tdnn.contexts: context [-3, -1, 0, 1, 3] must be evenly"),
    ("evaluate", "evaluate", {"p_target": 2}, "evaluate.p_target: must be <= 1.0"),
    ("evaluate", "evaluate", {"score_norm": "snorm"}, "evaluate.score_norm: must be one of none, as_norm; got 'snorm'"),
    ("evaluate", "evaluate", {"cohort_top_n": 1}, "evaluate.cohort_top_n: must be >= 2, got 1"),
    ("evaluate", "evaluate", {"trials": "/tmp/veri_test2.txt"},
     "evaluate.trials: '/tmp/veri_test2.txt': put the trial list under data/trials/"),
    ("evaluate", "evaluate", {"trials": "data/trials/nowhere.txt"},
     "evaluate.trials: trial list data/trials/nowhere.txt not found"),
    ("evaluate", "evaluate", {"calibration_prior": 1.0}, "evaluate.calibration_prior: must be < 1, got 1.0"),
    ("evaluate", "evaluate", {"calibration_speakers": 0}, "evaluate.calibration_speakers: must be > 0.0"),
    ("evaluate", "evaluate", {"fusion": "none"}, "evaluate.deploy: 'fused' needs evaluate.fusion concat or score"),
    ("evaluate", "tdnn", {"fusion": "score"}, "tdnn.fusion: moved to evaluate.fusion; set evaluate.fusion instead"),
    ("softmax", "softmax", {"init_checkpoint": "checkpoints/none.h5"},
     "softmax.init_checkpoint: checkpoint file checkpoints/none.h5 not found"),
    ("triplet", "triplet", {"init_checkpoint": "/tmp/x.h5"},
     "triplet.init_checkpoint: '/tmp/x.h5' must be a relative path inside checkpoints/"),
])
def test_bad_params_fail_at_once_naming_the_key(tmp_path, stage, section, values, message):
    write_params(tmp_path, **{section: values})
    proc = run_stage(stage, tmp_path)
    assert proc.returncode == 1
    assert (message() if callable(message) else message) in proc.stderr
    assert "Traceback" not in proc.stderr


def registered(registry: str) -> str:
    """The names a registry offers, as a choices error lists them (from the registry, not copied here)."""
    if registry == "losses":
        from voiceprint.losses import LOSSES
        return ", ".join(sorted(LOSSES))
    from voiceprint.features import FEATURE_KINDS
    return ", ".join(sorted(FEATURE_KINDS))


def test_softmax_init_checkpoint_of_another_size_names_the_params(tmp_path, shared_dir):
    import gzip
    import shutil

    (tmp_path / "checkpoints").mkdir()
    with gzip.open(shared_dir / "reference/rescnn_reference_random.h5.gz") as src, \
            open(tmp_path / "checkpoints/ref.h5", "wb") as dst:
        shutil.copyfileobj(src, dst)
    write_params(tmp_path, softmax={"init_checkpoint": "checkpoints/ref.h5"})
    proc = run_stage("softmax", tmp_path)
    assert proc.returncode == 1
    assert "softmax.init_checkpoint: checkpoints/ref.h5 holds a ResCNN with {'filters': [64, 128, 256, 512], " \
           "'blocks': 3, 'embedding_dim': 512}" in proc.stderr


def test_folder_source_lists_what_it_leaves_out(tmp_path):
    recordings = tmp_path / "recordings"
    manifest = synthetic.generate(recordings / "tmp", num_speakers=2, utterances_per_speaker=2, min_seconds=1.0,
                                  max_seconds=1.2, seed=0)
    for row in manifest.itertuples():         # <speaker>/<file> layout
        (recordings / row.speaker).mkdir(exist_ok=True)
        (recordings / "tmp" / row.path).rename(recordings / row.speaker / f"{row.utterance}.flac")
    shutil.rmtree(recordings / "tmp")
    first = sorted((recordings / manifest.speaker[0]).iterdir())[0]
    shutil.copy(first, recordings / manifest.speaker[0] / "copy.flac")
    (recordings / manifest.speaker[0] / "notes.txt").write_text("not audio")
    write_params(tmp_path, data={"source": "folder", "folder": str(recordings)})
    proc = run_stage("download", tmp_path)
    assert proc.returncode == 0, proc.stderr
    written = pd.read_csv(tmp_path / "data/raw/manifest.csv")
    assert len(written) == 4 and {"sha1", "bytes"} <= set(written.columns)
    assert all(Path(p).is_absolute() for p in written.path)
    rejected = pd.read_csv(tmp_path / "data/raw/rejected.csv")
    assert sorted(rejected.reason) == ["duplicate", "not_audio"]
    metrics = json.loads((tmp_path / "metrics/download.json").read_text())
    assert metrics["left_out_by_reason"] == {"duplicate": 1, "not_audio": 1}


def test_run_stage_reports_project_errors_in_one_line_and_keeps_tracebacks_of_bugs(capsys, monkeypatch):
    from voiceprint.core.errors import DataError, VoiceprintError
    from voiceprint.core.stage import TRACEBACK_ENV_VAR, run_stage as run
    from voiceprint.data.store import UnknownUtteranceError

    def fails_with(exc):
        def main():
            raise exc
        return main

    monkeypatch.delenv(TRACEBACK_ENV_VAR, raising=False)
    for exc, line in [(DataError("data/raw: too little usable audio"), "data/raw: too little usable audio"),
                      (UnknownUtteranceError("utterance 'u1' is not in the feature store"),
                       "utterance 'u1' is not in the feature store")]:
        with pytest.raises(SystemExit) as exit_:
            run(fails_with(exc))
        assert exit_.value.code == 1
        assert capsys.readouterr().err == f"error: stage test_stages: {line}\n"
    # A bug deep in a library (pandas, Keras) is no project error: it keeps its traceback.
    for bug in (ValueError("cannot reshape array"), KeyError("column"), FileNotFoundError("libfoo.so")):
        with pytest.raises(type(bug)):
            run(fails_with(bug))
        assert capsys.readouterr().err == ""
    monkeypatch.setenv(TRACEBACK_ENV_VAR, "1")     # and a project error's traceback on request
    with pytest.raises(VoiceprintError):
        run(fails_with(DataError("x")))


def test_expected_errors_are_project_errors_and_still_the_builtin_ones():
    from voiceprint.serving.api import InputError
    from voiceprint.data.audio import AudioError
    from voiceprint.serving.bundle import BundleError, ModelNotFoundError, ThresholdError
    from voiceprint.core.errors import MissingFileError, VoiceprintError
    from voiceprint.data.fetch import FetchError
    from voiceprint.training.original_h5 import CheckpointError
    from voiceprint.core.params import ParamsError
    from voiceprint.serving.registry import RegistryError
    from voiceprint.data.splits import SplitError

    for cls in (ParamsError, AudioError, SplitError, InputError, CheckpointError, BundleError, ThresholdError,
                FetchError):
        assert issubclass(cls, VoiceprintError) and issubclass(cls, ValueError), cls
    for cls in (ModelNotFoundError, MissingFileError):
        assert issubclass(cls, VoiceprintError) and issubclass(cls, FileNotFoundError), cls
    assert issubclass(RegistryError, VoiceprintError)


def _resolved_deps(root: Path) -> dict[str, set[str]]:
    from dvc.repo import Repo

    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    Repo.init(str(root), no_scm=True)
    with Repo(str(root)) as repo:
        return {stage.name: {dep.def_path for dep in stage.deps} for stage in repo.index.stages}


def test_training_stages_depend_on_the_init_checkpoint_file_they_read_not_the_folder(tmp_path):
    """Editing checkpoints/README.md, or adding a checkpoint for triplet, must not rerun softmax pre-training."""
    assert (REPO / "checkpoints/none").is_file()       # the default's dependency exists in a fresh clone
    for name in ("default", "triplet_init"):
        (tmp_path / name).mkdir()
    write_params(tmp_path / "default")
    deps = _resolved_deps(tmp_path / "default")
    for stage in ("softmax", "triplet"):
        assert "checkpoints/none" in deps[stage]
    write_params(tmp_path / "triplet_init",
                 triplet={"init_checkpoint": "checkpoints/ResCNN_triplet_training_checkpoint_265.h5"})
    deps = _resolved_deps(tmp_path / "triplet_init")
    assert "checkpoints/ResCNN_triplet_training_checkpoint_265.h5" in deps["triplet"]
    assert not any(d.startswith("checkpoints/Res") for d in deps["softmax"])
    for stage, paths in deps.items():           # no stage depends on the folder (or README) as a whole
        assert not any(Path(p) in (Path("checkpoints"), Path("checkpoints/README.md"), Path("."))
                       for p in paths), stage


def test_no_init_checkpoint_means_none():
    from voiceprint.training.original_h5 import init_checkpoint_path

    assert init_checkpoint_path("checkpoints/none", "softmax.init_checkpoint") is None
    assert init_checkpoint_path("", "softmax.init_checkpoint") is None

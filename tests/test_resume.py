"""Resuming interrupted training: fingerprinted resume states, bit-exact resumed runs, and a stage killed mid-epoch."""
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import REPO
from voiceprint.core.contracts import SoftmaxSettings, TripletSettings
from voiceprint.training.resume import RESUME_ROOT, STATE_FILE, ResumeState, Snapshot, enabled, fingerprint, \
    stage_resume_state
from voiceprint.core.runtime import configure_tensorflow
from voiceprint.data.store import FeatureStore, StoreWriter

TINY_MODEL = dict(filters=[4, 8, 8, 8], blocks=1, embedding_dim=8, frames=32, dropout=0.1)
SPLIT_COLUMNS = ["utterance", "speaker", "role", "label", "reason"]


def write_tiny_inputs(root: Path, *, speakers: int = 6, utterances: int = 4, seed: int = 0):
    """A stage's inputs in ``root``: data/features (random speaker-clustered frames), data/model_inputs (the last
    two speakers for evaluation, utterance 0 of the others for validation). Returns (store, split)."""
    rng = np.random.default_rng(seed)
    writer = StoreWriter(root / "data/features", num_bands=64, kind="test")
    rows = []
    for s in range(speakers):
        centre = rng.normal(size=64)
        for u in range(utterances):
            feats = centre + 0.5 * rng.normal(size=(int(rng.integers(20, 60)), 64))
            writer.add(f"s{s}-{u}", f"s{s}", f"s{s}/{u}.flac", feats, rng.normal(size=40))
            evaluation = s >= speakers - 2
            role = "evaluation" if evaluation else ("validation" if u == 0 else "train")
            rows.append((f"s{s}-{u}", f"s{s}", role, -1 if evaluation else s, ""))
    writer.close()
    split = pd.DataFrame(rows, columns=SPLIT_COLUMNS)
    (root / "data/model_inputs").mkdir(parents=True)
    split.to_csv(root / "data/model_inputs/utterances.csv", index=False)
    pd.DataFrame(columns=["label", "enroll", "test", "enroll_speaker", "test_speaker"]).to_csv(
        root / "data/model_inputs/trials.csv", index=False)
    return FeatureStore.open(root / "data/features"), split


def write_stage_params(root: Path, **sections) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def stage_env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3", OPENBLAS_NUM_THREADS="1",
                VOICEPRINT_THREADS="1", **extra)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_inputs(tmp_path_factory.mktemp("inputs"))


def _said(caplog) -> str:
    """What the package logged since the last call (and forget it)."""
    text = caplog.text
    caplog.clear()
    return text


def _weights(model):
    return b"".join(np.asarray(w).tobytes() for w in model.weights)


# --- fingerprints and the resume state's file ---

def test_fingerprint_covers_settings_and_bytes_not_location(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name / "sub").mkdir(parents=True)
        (tmp_path / name / "sub/x.bin").write_bytes(b"\x00\x01")
        (tmp_path / name / "y.txt").write_text("y")
    base = fingerprint({"lr": 0.001, "filters": [4, 8]}, [tmp_path / "a"])
    # pinned: a change of the scheme invalidates every saved resume state, which must be deliberate
    assert base == "b8bc4e79e8b3aafb74611509ecd2f43ca4e1e88f945b9df4d89c1121f808ef82"
    assert fingerprint({"filters": [4, 8], "lr": 0.001}, [tmp_path / "b"]) == base     # key order, location
    assert fingerprint({"lr": 0.002, "filters": [4, 8]}, [tmp_path / "a"]) != base
    (tmp_path / "b/sub/x.bin").write_bytes(b"\x00\x02")
    assert fingerprint({"lr": 0.001, "filters": [4, 8]}, [tmp_path / "b"]) != base
    with pytest.raises(FileNotFoundError, match="missing: input of the training stage not found"):
        fingerprint({}, [tmp_path / "missing"])


def test_stage_resume_state_fingerprints_where_training_runs(tmp_path, monkeypatch):
    from types import SimpleNamespace

    (tmp_path / "data").write_text("d")
    one = SimpleNamespace(name="auto", replicas=1, precision="float32", is_chief=True)
    monkeypatch.delenv("VOICEPRINT_RESUME", raising=False)
    resume_state = stage_resume_state("softmax", {"lr": 0.001}, [tmp_path / "data"], one)
    assert resume_state.directory == RESUME_ROOT / "softmax" and resume_state.writer
    others = [SimpleNamespace(**{**vars(one), key: value}) for key, value in
              (("name", "mirrored"), ("replicas", 2), ("precision", "mixed_bfloat16"))]
    prints = {stage_resume_state("softmax", {"lr": 0.001}, [tmp_path / "data"], d).fingerprint for d in others}
    assert len(prints) == 3 and resume_state.fingerprint not in prints
    worker = SimpleNamespace(**{**vars(one), "is_chief": False})
    assert not stage_resume_state("softmax", {"lr": 0.001}, [tmp_path / "data"], worker).writer
    monkeypatch.setenv("VOICEPRINT_RESUME", "0")
    assert stage_resume_state("softmax", {"lr": 0.001}, [tmp_path / "data"], one) is None


def test_resume_switch(monkeypatch):
    monkeypatch.delenv("VOICEPRINT_RESUME", raising=False)
    assert enabled()
    monkeypatch.setenv("VOICEPRINT_RESUME", "0")
    assert not enabled()
    monkeypatch.setenv("VOICEPRINT_RESUME", "no")
    with pytest.raises(ValueError, match="VOICEPRINT_RESUME must be 0 or 1, got 'no'"):
        enabled()


def test_resume_state_round_trip_and_every_reason_to_start_over(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="voiceprint")
    directory = tmp_path / "resume"
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([7], dtype=np.int64)]
    history = [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}]
    ResumeState(directory, "abc").save(Snapshot(2, history, arrays))
    assert sorted(p.name for p in directory.iterdir()) == [STATE_FILE]     # no temporary file left

    loaded = ResumeState(directory, "abc").load([(2, 3), (1,)])
    assert loaded.epoch == 2 and loaded.history == history
    for got, want in zip(loaded.arrays, arrays):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    assert "resuming from" in _said(caplog)

    assert ResumeState(directory, "other").load([(2, 3), (1,)]) is None
    assert "made with other params, inputs or code; training starts over" in _said(caplog)
    assert ResumeState(directory, "abc").load([(2, 3)]) is None
    assert "its 2 variables do not fit the model's 1" in _said(caplog)
    (directory / STATE_FILE).write_bytes(b"torn")
    assert ResumeState(directory, "abc").load([(2, 3), (1,)]) is None
    assert "it cannot be read" in _said(caplog)
    assert ResumeState(tmp_path / "none", "abc").load([]) is None         # nothing to resume: silent
    assert _said(caplog) == ""

    reader = ResumeState(tmp_path / "worker", "abc", writer=False)       # multi-worker, not the chief
    reader.save(Snapshot(1, history[:1], arrays))
    assert not reader.directory.exists()
    ResumeState(directory, "abc").remove()
    assert not directory.exists()


# --- resumed training equals uninterrupted training, bit for bit ---

def _fail_at(monkeypatch, batches_class, *, counter: int, batch: int, seed: int):
    """Make ``batches_class`` raise when batch ``batch`` of epoch counter ``counter`` (training batches of
    ``seed``) is read: training dies in the middle of that epoch."""
    original = batches_class.__getitem__

    def failing(self, i):
        if self.seed == seed and self.epoch == counter and i == batch:
            raise RuntimeError("injected interruption")
        return original(self, i)

    monkeypatch.setattr(batches_class, "__getitem__", failing)


def _saved_epoch(directory: Path) -> int:
    with np.load(directory / STATE_FILE, allow_pickle=False) as data:
        return json.loads(bytes(data["meta"]).decode())["epoch"]


def test_interrupted_softmax_resumes_to_the_same_weights(tiny, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="voiceprint")
    from voiceprint.training.batching import ClassificationBatches
    from voiceprint.training.fit import _train_counter, train_softmax

    store, split = tiny
    settings = SoftmaxSettings(epochs=3, batch_size=4, lr=1e-3, seed=5, **TINY_MODEL)
    configure_tensorflow(5)
    straight = train_softmax(store, split, settings, resume_state=ResumeState(tmp_path / "straight", "f"),
                            verbose=0)
    assert _saved_epoch(tmp_path / "straight") == 3

    # dies while reading batch 1 of the second epoch (index 1): the resume state holds epoch 1
    _fail_at(monkeypatch, ClassificationBatches, counter=_train_counter(1), batch=1, seed=5)
    configure_tensorflow(5)
    with pytest.raises(Exception, match="injected interruption"):
        train_softmax(store, split, settings, resume_state=ResumeState(tmp_path / "killed", "f"), verbose=0)
    assert _saved_epoch(tmp_path / "killed") == 1
    monkeypatch.undo()

    caplog.clear()
    configure_tensorflow(5)
    resumed = train_softmax(store, split, settings, resume_state=ResumeState(tmp_path / "killed", "f"), verbose=0)
    assert "1 epoch(s) done" in _said(caplog)
    assert _weights(resumed.model) == _weights(straight.model)
    pd.testing.assert_frame_equal(resumed.history, straight.history, check_exact=True)

    # no resume state at all: the same run as before resume existed
    configure_tensorflow(5)
    plain = train_softmax(store, split, settings, verbose=0)
    assert _weights(plain.model) == _weights(straight.model)
    pd.testing.assert_frame_equal(plain.history, straight.history, check_exact=True)


def test_interrupted_triplet_resumes_and_a_stale_resume_state_is_not_used(tiny, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="voiceprint")
    from voiceprint.training.batching import SpeakerBatches
    from voiceprint.training.fit import _train_counter, train_softmax, train_triplet

    store, split = tiny
    configure_tensorflow(1)
    base = train_softmax(store, split, SoftmaxSettings(epochs=1, batch_size=4, lr=1e-3, seed=1, **TINY_MODEL),
                         verbose=0).model
    start = base.get_weights()
    settings = TripletSettings(alpha=0.5, epochs=3, steps_per_epoch=3, speakers_per_batch=2, utterances_per_speaker=2,
                               frames=32, lr=1e-3, seed=7)

    def run(directory, fingerprint_value="f"):
        base.set_weights(start)
        configure_tensorflow(7)
        return train_triplet(base, store, split, settings, resume_state=ResumeState(directory, fingerprint_value),
                             verbose=0)

    straight = run(tmp_path / "straight")
    straight_weights = _weights(straight.model)

    _fail_at(monkeypatch, SpeakerBatches, counter=_train_counter(2), batch=1, seed=7)
    with pytest.raises(Exception, match="injected interruption"):
        run(tmp_path / "killed")
    assert _saved_epoch(tmp_path / "killed") == 2
    monkeypatch.undo()

    caplog.clear()
    resumed = run(tmp_path / "killed")
    assert "2 epoch(s) done" in _said(caplog)
    assert _weights(resumed.model) == straight_weights
    pd.testing.assert_frame_equal(resumed.history, straight.history, check_exact=True)

    # other params (here: another fingerprint) never resume: training starts over, and says so
    _fail_at(monkeypatch, SpeakerBatches, counter=_train_counter(2), batch=1, seed=7)
    with pytest.raises(Exception, match="injected interruption"):
        run(tmp_path / "stale")
    monkeypatch.undo()
    caplog.clear()
    fresh = run(tmp_path / "stale", "other params")
    assert "training starts over" in _said(caplog)
    assert _weights(fresh.model) == straight_weights and len(fresh.history) == 3


# --- the stage: killed mid-epoch by a signal, rerun, same bytes as an uninterrupted run ---

SOFTMAX_STAGE = dict(filters=[4, 8, 8, 8], blocks=1, embedding_dim=8, frames=32, epochs=4, batch_size=2)


def _stage_dir(root: Path) -> Path:
    write_tiny_inputs(root, speakers=6, utterances=16)
    write_stage_params(root, softmax=SOFTMAX_STAGE)
    return root


# Runs the softmax stage and SIGKILLs it from inside, while it reads batch 1 of its second epoch: as the
# out-of-memory killer would, but at a fixed point, so that the test does not race a busy machine's scheduler.
KILL_MID_EPOCH = """
import os, runpy, signal
from voiceprint.training.batching import ClassificationBatches
from voiceprint.training.fit import _train_counter

read = ClassificationBatches.__getitem__

def killed_mid_epoch(self, i):
    if self.shuffle and self.epoch == _train_counter(1) and i == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return read(self, i)

ClassificationBatches.__getitem__ = killed_mid_epoch
runpy.run_module("stages.softmax", run_name="__main__", alter_sys=True)
"""


def test_softmax_stage_killed_mid_epoch_resumes_to_identical_outputs(tmp_path):
    straight, killed = _stage_dir(tmp_path / "straight"), _stage_dir(tmp_path / "killed")
    done = subprocess.run([sys.executable, "-m", "stages.softmax"], cwd=straight, env=stage_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert not (straight / "models/resume").exists()      # removed once the outputs are written

    state_dir = killed / "models/resume/softmax"
    (killed / "kill_mid_epoch.py").write_text(KILL_MID_EPOCH)
    died = subprocess.run([sys.executable, "kill_mid_epoch.py"], cwd=killed, env=stage_env(), capture_output=True,
                          text=True, timeout=600)
    assert died.returncode == -signal.SIGKILL, died.stderr
    epochs_done = _saved_epoch(state_dir)
    assert epochs_done == 1 and not (killed / "models/softmax.keras").exists()

    rerun = subprocess.run([sys.executable, "-m", "stages.softmax"], cwd=killed, env=stage_env(),
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming from models/resume/softmax/{STATE_FILE}: {epochs_done} epoch(s) done" in rerun.stderr
    for output in ("models/softmax.keras", "plots/softmax.csv"):
        assert (killed / output).read_bytes() == (straight / output).read_bytes(), output
    # the live log went on from the resume state: the same rows as the uninterrupted run's, one per epoch
    live = Path("dvclive/softmax")
    tables = sorted(p.relative_to(straight) for p in (straight / live / "plots/metrics").glob("*.tsv"))
    assert {t.name for t in tables} >= {"loss.tsv", "accuracy.tsv", "val_loss.tsv", "val_accuracy.tsv"}
    for output in [*tables, live / "metrics.json"]:
        assert (killed / output).read_text() == (straight / output).read_text(), output
    assert len((straight / live / "plots/metrics/loss.tsv").read_text().splitlines()) == 1 + SOFTMAX_STAGE["epochs"]
    assert not (killed / "models/resume").exists()

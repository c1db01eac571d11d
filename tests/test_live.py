"""Live training logs (voiceprint/training/live.py): DVCLive files written per epoch, continued on resume."""
import json
from pathlib import Path

import pandas as pd

from voiceprint.training.live import EpochLog, logged_steps
from voiceprint.training.resume import ResumeState

ROWS = [{"epoch": 1, "loss": 2.0, "val_loss": 2.5}, {"epoch": 2, "loss": 1.5, "val_loss": 2.25},
        {"epoch": 3, "loss": 1.25, "val_loss": 2.125}]


def _tsv(directory: Path, name: str) -> list[tuple[int, float]]:
    table = pd.read_csv(directory / "plots" / "metrics" / f"{name}.tsv", sep="\t")
    return list(zip(table.step.tolist(), table[name].tolist()))


def _write(directory: Path, rows, done=()) -> None:
    log = EpochLog(directory, done)
    for row in rows:
        log.log_epoch(row)
    log.close()


def test_each_epoch_is_a_step_in_dvclive_files(tmp_path):
    _write(tmp_path / "live", ROWS)
    assert _tsv(tmp_path / "live", "loss") == [(0, 2.0), (1, 1.5), (2, 1.25)]
    assert _tsv(tmp_path / "live", "val_loss") == [(0, 2.5), (1, 2.25), (2, 2.125)]
    assert json.loads((tmp_path / "live" / "metrics.json").read_text()) == {"step": 2, "loss": 1.25,
                                                                           "val_loss": 2.125}


def test_a_resumed_run_continues_the_log_and_repairs_a_missing_epoch(tmp_path):
    straight, resumed, behind = tmp_path / "straight", tmp_path / "resumed", tmp_path / "behind"
    _write(straight, ROWS)
    _write(resumed, ROWS[:1])                   # killed after epoch 1 (resume state and log agree) ...
    _write(resumed, ROWS[1:], done=ROWS[:1])    # ... resumed: the same log goes on from step 1
    _write(behind, ROWS[:1])                    # killed between epoch 2's resume state and its log row ...
    _write(behind, ROWS[2:], done=ROWS[:2])     # ... the row comes from the resume state's history
    for directory in (resumed, behind):
        for name in ("loss", "val_loss"):
            assert _tsv(directory, name) == _tsv(straight, name), (directory, name)
        assert (directory / "metrics.json").read_text() == (straight / "metrics.json").read_text()


def test_a_log_that_does_not_match_the_resume_state_is_written_anew(tmp_path):
    _write(tmp_path / "live", ROWS)             # three steps, but the resume state says one epoch is done
    _write(tmp_path / "live", ROWS[1:2], done=ROWS[:1])
    assert _tsv(tmp_path / "live", "loss") == [(0, 2.0), (1, 1.5)]
    _write(tmp_path / "fresh", ROWS[:1])        # no resume state: a new run starts a new log
    _write(tmp_path / "fresh", ROWS[:1])
    assert logged_steps(tmp_path / "fresh") == [0]


def test_an_empty_log_still_has_its_declared_folders(tmp_path):
    _write(tmp_path / "live", [])
    assert (tmp_path / "live" / "plots" / "metrics").is_dir() and logged_steps(tmp_path / "live") == []


class _Watching(ResumeState):
    """A resume state that records, each time an epoch is saved, the steps already in the live log."""

    def __init__(self, directory, live_dir):
        super().__init__(directory, "f")
        self.live_dir, self.seen = live_dir, []

    def save(self, snapshot):
        self.seen.append((snapshot.epoch, logged_steps(self.live_dir)))
        super().save(snapshot)


def test_training_writes_each_epoch_to_the_live_log_while_it_runs(tmp_path):
    from tests.test_resume import TINY_MODEL, write_tiny_inputs
    from voiceprint.core.contracts import SoftmaxSettings
    from voiceprint.core.runtime import configure_tensorflow
    from voiceprint.training.fit import train_softmax

    store, split = write_tiny_inputs(tmp_path / "inputs", speakers=4, utterances=3)
    live_dir = tmp_path / "dvclive" / "softmax"
    resume_state = _Watching(tmp_path / "resume", live_dir)
    configure_tensorflow(3)
    trained = train_softmax(store, split, SoftmaxSettings(epochs=3, batch_size=4, lr=1e-3, seed=3, **TINY_MODEL),
                            verbose=0, resume_state=resume_state, live_dir=live_dir)
    # When epoch n's resume state is saved, steps 0 .. n-2 (epochs 1 .. n-1) are already on disk.
    assert resume_state.seen == [(1, []), (2, [0]), (3, [0, 1])]
    assert [v for _, v in _tsv(live_dir, "loss")] == trained.history["loss"].tolist()
    assert [v for _, v in _tsv(live_dir, "accuracy")] == trained.history["accuracy"].tolist()


def test_a_row_cut_short_by_a_kill_makes_the_log_start_over_from_the_resume_state(tmp_path):
    _write(tmp_path / "live", ROWS[:2])
    tsv = tmp_path / "live" / "plots" / "metrics" / "loss.tsv"
    tsv.write_text(tsv.read_text() + "2\t")         # killed while DVCLive appended epoch 3's row
    assert logged_steps(tmp_path / "live") == []
    _write(tmp_path / "live", ROWS[2:], done=ROWS[:2])
    assert _tsv(tmp_path / "live", "loss") == [(0, 2.0), (1, 1.5), (2, 1.25)]


def test_an_epoch_logged_for_some_metrics_only_makes_the_log_start_over(tmp_path):
    _write(tmp_path / "live", ROWS[:1])
    log = EpochLog(tmp_path / "live", ROWS[:1])
    log.live.log_metric("loss", 1.5)                # killed before val_loss of epoch 2 was written
    assert logged_steps(tmp_path / "live") == []
    _write(tmp_path / "live", ROWS[2:], done=ROWS[:2])
    assert _tsv(tmp_path / "live", "val_loss") == [(0, 2.5), (1, 2.25), (2, 2.125)]
    assert _tsv(tmp_path / "live", "loss") == [(0, 2.0), (1, 1.5), (2, 1.25)]


def test_a_head_logs_each_epoch_of_its_own_training_loop(tmp_path):
    import numpy as np

    from voiceprint.models import build_head
    from voiceprint.core.runtime import configure_tensorflow
    from voiceprint.training.fit import array_batches, fit_head

    configure_tensorflow(0)
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 8)
    x = (rng.normal(size=(4, 6))[y] + 0.3 * rng.normal(size=(32, 6))).astype(np.float32)
    batching = dict(loss="softmax", batch_size=8, utterances_per_speaker=2, steps=4)
    head = build_head("dense", input_dim=6, units=8, layers_count=1, dropout=0.0, output_dim=4, contexts=None)
    history = fit_head(head, array_batches(x, y, seed=0, **batching),
                       array_batches(x, y, seed=1, shuffle=False, **batching), loss="softmax", num_classes=4,
                       lr=1e-2, epochs=3, verbose=0, live_dir=tmp_path / "live")
    for name in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert _tsv(tmp_path / "live", name) == list(enumerate(history[name].tolist())), name

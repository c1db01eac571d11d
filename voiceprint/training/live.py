"""Live training logs in DVCLive's layout: one row per epoch, written as each epoch ends.

Every training stage logs to ``dvclive/<stage>/``: ``metrics.json`` (the latest epoch's values and its ``step``,
declared as the stage's metrics) and ``plots/metrics/<name>.tsv`` (one row per epoch, declared as plots), so
``dvc exp show`` and ``dvc plots show`` see a run's curves while it trains, in the workspace and in
``dvc exp run --temp``/``--queue`` runs alike. Step ``n`` is epoch ``n + 1``. The stage's ``dvc.yaml`` entries
declare these files (``Live(dvcyaml=False)``); DVCLive never makes experiments of its own inside a stage
(``save_dvc_exp=False``).

A resumed run (voiceprint/training/resume.py) continues the same log (``Live(resume=True)``) from its resume state's
epoch.
The resume state is saved before the epoch is logged, so a kill between the two leaves the log one epoch behind
the resume state: the missing row is written from the resume state's history. A log torn by a kill while DVCLive wrote
it (an epoch in some metrics' files and not others, a row cut short), or that does not match the resume state's
epochs at all (removed, or from another run), is written anew from that history.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Iterable

logger = logging.getLogger(__name__)

LIVE_ROOT = Path("dvclive")
# The per-epoch history keys that are not metrics.
NOT_METRICS = ("epoch",)


def live_dir(stage: str) -> Path:
    """Where training stage ``stage`` writes its live log."""
    return LIVE_ROOT / stage


def logged_steps(directory: str | Path) -> list[int]:
    """The steps in the log at ``directory``: those every metric's plot holds, when they all hold the same ones.
    [] when there is no log, or when a kill left it torn (a row cut short, or an epoch logged for some metrics and
    not others): the log is then written anew from the resume state."""
    tables = sorted((Path(directory) / "plots" / "metrics").glob("*.tsv"))
    steps = []
    try:
        for tsv in tables:
            with open(tsv, newline="") as fh:
                rows = list(csv.DictReader(fh, delimiter="\t"))
            for row in rows:
                float(row[tsv.stem])        # a row cut short has no value
            steps.append([int(row["step"]) for row in rows])
    except (ValueError, KeyError, TypeError):
        return []
    return steps[0] if steps and all(s == steps[0] for s in steps) else []


class EpochLog:
    """The live log of one training run at ``directory``: :meth:`log_epoch` after every epoch, :meth:`close` at
    the end. ``done``: history rows of epochs already completed (a resumed run; [] starts a new log)."""

    def __init__(self, directory: str | Path, done: Iterable[dict] = ()):
        from dvclive import Live

        self.directory = Path(directory)
        done = list(done)
        steps = logged_steps(self.directory)
        resume = bool(done) and steps == list(range(len(steps))) and len(steps) in (len(done), len(done) - 1)
        if done and not resume:
            logger.info("%s: the live log does not match the resume state's %d epoch(s): written anew from it",
                        self.directory, len(done))
        self.live = Live(dir=str(self.directory), resume=resume, report=None, save_dvc_exp=False, dvcyaml=False,
                         monitor_system=False)
        # DVCLive reads the next step from metrics.json, which cannot tell "step 0 logged" from "nothing logged".
        self.live.step = len(steps) if resume else 0
        for row in done[self.live.step:]:
            self.log_epoch(row)

    def log_epoch(self, row: dict) -> None:
        """Log one epoch's row (``epoch`` plus metric values) as the next step and write the files."""
        for name, value in row.items():
            if name not in NOT_METRICS and value is not None:
                self.live.log_metric(name, float(value))
        self.live.next_step()

    def close(self) -> None:
        """Write the summary; the plots folder exists even when no epoch was logged (a declared output)."""
        self.live.end()
        (self.directory / "plots" / "metrics").mkdir(parents=True, exist_ok=True)

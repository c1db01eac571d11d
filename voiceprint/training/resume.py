"""Resuming an interrupted training stage from its last completed epoch.

After every epoch the stage's resume state (``models/resume/<stage>/state.npz``) is replaced, by an
atomic rename, with the complete training state: every model variable (weights, BatchNormalization statistics,
dropout seed state), every optimizer variable (step count, Adam moments, loss scale) and the per-epoch history
so far. A kill at any moment leaves the previous resume state or the new one, never a torn one; a rerun continues
after the last completed epoch. Batches are a function of (seed, epoch, batch) (voiceprint/training/batching.py), so the
resumed run computes exactly what an uninterrupted run would: the same final weights, bit for bit
(tests/test_resume.py).

A resume state records a fingerprint of what it was made with: the stage's settings, the bytes of its inputs and the
package's source code. A run whose fingerprint differs (other params, data or code) never resumes from it: it
starts over and says so. The stage removes the resume state once its outputs are written: the outputs are all a
completed stage needs, and a full-size resume state costs three times the model's size in disk.

Not Keras' BackupAndRestore: it restores weights, optimizer and epoch, but not the history of earlier epochs, and
it records nothing of the params and data it was made with.
The file is a plain ``.npz`` (arrays + JSON bytes) read with ``allow_pickle=False``: nothing is unpickled.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from voiceprint.core.errors import DataError, MissingFileError

logger = logging.getLogger(__name__)

STATE_FILE = "state.npz"
RESUME_ROOT = Path("models/resume")
FORMAT = 1
_META = "meta"                          # key of the JSON bytes in the .npz; the arrays are "v0", "v1", ...


def fingerprint(settings: dict, inputs: Iterable[str | Path]) -> str:
    """sha256 over the JSON of ``settings`` and the bytes of ``inputs``: files, or directories whose files are
    taken in sorted order with their names relative to the directory (where the checkout lies does not count)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in map(Path, inputs):
        if not path.exists():
            raise MissingFileError(f"{path}: input of the training stage not found")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            name = file.relative_to(path).as_posix() if path.is_dir() else file.name
            digest.update(f"\0{name}\0{file.stat().st_size}\0".encode())
            with open(file, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def package_sources() -> list[Path]:
    """The package's Python files (not its bytecode caches): a code change starts training over, as DVC reruns
    the stage when its code deps change."""
    return sorted(Path(__file__).resolve().parents[1].rglob("*.py"))


def enabled() -> bool:
    """``VOICEPRINT_RESUME`` (default 1): 0 turns saving the resume state off. An environment variable, not a param: it
    changes disk use and what an interruption costs, never results."""
    value = os.environ.get("VOICEPRINT_RESUME", "1")
    if value not in ("0", "1"):
        raise DataError(f"VOICEPRINT_RESUME must be 0 or 1, got {value!r}")
    return value == "1"


def stage_resume_state(stage: str, settings: dict, inputs: Iterable[str | Path], distribution) -> "ResumeState | None":
    """The resume state of training stage ``stage``, or None when ``VOICEPRINT_RESUME=0``.

    Its fingerprint covers ``settings``, where training runs (``distribution``'s strategy, replica count and
    precision: another precision's state would not fit), the bytes of ``inputs`` (data, starting model, the stage
    script) and the package's code. Only the chief (``distribution.is_chief``) writes it."""
    if not enabled():
        return None
    settings = {**settings, "strategy": distribution.name, "replicas": distribution.replicas,
                "precision": distribution.precision}
    return ResumeState.for_stage(stage, fingerprint(settings, [*inputs, *package_sources()]),
                                writer=distribution.is_chief)


@dataclass
class Snapshot:
    """The training state after ``epoch`` completed epochs."""
    epoch: int
    history: list[dict]                 # one row per completed epoch: {"epoch": 1, "loss": ..., ...}
    arrays: list[np.ndarray]            # the values of the variables, in training-state order


class ResumeState:
    """The resume state (one ``.npz`` file) of one training run, identified by ``fingerprint``.

    ``writer=False`` (multi-worker training, all but the chief): reads the chief's resume state (a shared filesystem
    is needed to resume on several machines) but never writes or removes it.
    """

    def __init__(self, directory: str | Path, fingerprint: str, *, writer: bool = True):
        self.directory, self.fingerprint, self.writer = Path(directory), fingerprint, writer
        self.path = self.directory / STATE_FILE

    @classmethod
    def for_stage(cls, stage: str, fingerprint: str, *, writer: bool = True) -> "ResumeState":
        return cls(RESUME_ROOT / stage, fingerprint, writer=writer)

    def load(self, shapes: list[tuple]) -> Snapshot | None:
        """The saved state if it was made with this fingerprint and fits variables of ``shapes``; else None,
        having logged why the run starts over."""
        if not self.path.is_file():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as data:
                meta = json.loads(bytes(data[_META]).decode())
                arrays = [data[f"v{i}"] for i in range(len(meta["shapes"]))]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return self._start_over(f"it cannot be read ({exc})")
        if meta.get("format") != FORMAT or meta.get("fingerprint") != self.fingerprint:
            return self._start_over("it was made with other params, inputs or code")
        saved = [tuple(s) for s in meta["shapes"]]
        if saved != [tuple(s) for s in shapes]:
            return self._start_over(f"its {len(saved)} variables do not fit the model's {len(shapes)}")
        logger.info("resuming from %s: %d epoch(s) done", self.path, meta["epoch"])
        return Snapshot(meta["epoch"], meta["history"], arrays)

    def _start_over(self, why: str) -> None:
        logger.warning("not resuming from %s: %s; training starts over", self.path, why)
        return None

    def save(self, snapshot: Snapshot) -> None:
        """Replace the resume state atomically (write a temporary sibling, then rename over it)."""
        if not self.writer:
            return
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "epoch": snapshot.epoch,
                "history": snapshot.history,
                "shapes": [list(a.shape) for a in snapshot.arrays]}
        arrays = {f"v{i}": a for i, a in enumerate(snapshot.arrays)}
        arrays[_META] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{STATE_FILE}.", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def remove(self) -> None:
        """Delete the resume state's directory (the stage's outputs are written)."""
        if self.writer:
            shutil.rmtree(self.directory, ignore_errors=True)
            if self.directory.parent == RESUME_ROOT:
                with contextlib.suppress(OSError):      # not empty: another stage's resume state is there
                    RESUME_ROOT.rmdir()

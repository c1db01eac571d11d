"""Writing stage outputs: atomically (temporary name, then rename), deterministically, with versions recorded.

A stage killed half-way must never leave a file that looks finished, and the same inputs and seed must give the
same bytes, so DVC sees "unchanged" and its run cache works.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

import voiceprint

FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path (file or directory) that replaces ``final`` only if the block succeeds.

    A directory replaces a directory (stage outputs such as data/features); a file never replaces a directory
    (IsADirectoryError, nothing removed): ``-o results.npy`` naming a user's folder must not delete it.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(final)
    # The pid in the name tells a later run whether the writer still runs.
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", dir=final.parent)) / final.name
    try:
        yield tmp
        final_is_dir = final.is_dir() and not final.is_symlink()
        if tmp.is_dir() and final_is_dir:
            shutil.rmtree(final)
        elif final_is_dir:
            raise IsADirectoryError(21, "is a directory; refusing to replace it with a file", str(final))
        elif tmp.is_dir() and (final.exists() or final.is_symlink()):
            final.unlink()      # rename() cannot put a directory over a file
        os.replace(tmp, final)  # a file over a file (or a link) in one step
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def _remove_stale_temps(final: Path) -> None:
    """Remove temporaries of ``final`` whose writer is gone: a process killed mid-write (kill -9, the OOM killer)
    never reaches the clean-up in atomic_path, and its data/.features.* would stay forever."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.(\d+)\.[a-z0-9_]{{8}}")
    for stale in final.parent.iterdir():
        match = pattern.fullmatch(stale.name)
        if match and not _alive(int(match[1])):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # another user's process
        return True
    return True


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_csv(path: str | Path, frame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, lineterminator="\n")


def write_rows(path: str | Path, header: list[str], rows) -> None:
    """A CSV of ``rows`` under ``header``, written atomically with the csv module: what the runtime's commands
    write without pandas (a pipeline dependency whose 3.x needs numpy 2; the runtime installs next to numpy 1.26).
    Floats are written in full (``repr``), so they read back exactly."""
    import csv

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def software_versions() -> dict[str, str]:
    """Versions of what produced a result, written beside every metrics file (``versions_path``)."""
    import importlib.metadata as md

    versions = {"python": platform.python_version(), "voiceprint": voiceprint.__version__}
    for dist in ("numpy", "librosa", "soundfile", "pandas", "tensorflow-cpu", "tensorflow", "keras", "dvc"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[dist] = md.version(dist)
    return versions


def _missing(value) -> bool:
    import math

    return value is None or (isinstance(value, float) and math.isnan(value))


def to_builtin(value):
    """numpy scalars/arrays -> plain Python, so metrics JSON holds numbers, never strings or numpy reprs."""
    import numpy as np

    if isinstance(value, dict):
        # Absent numbers are left out rather than written as null/NaN: metrics hold numbers only.
        return {str(k): to_builtin(v) for k, v in value.items() if not _missing(v)}
    if isinstance(value, (list, tuple)):
        return [to_builtin(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_builtin(value.tolist())
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return None if np.isnan(value) else float(value)
    return value


def versions_path(metrics_path: str | Path) -> Path:
    """Where the software versions behind a metrics file go: ``metrics/<name>.json`` -> ``versions/<name>.json``
    (a folder beside ``metrics/``, not declared as metrics: strings would be columns in ``dvc exp show``);
    a metrics file elsewhere gets a ``<stem>.versions.json`` sibling."""
    path = Path(metrics_path)
    if path.parent.name == "metrics":
        return path.parent.parent / "versions" / path.name
    return path.with_name(f"{path.stem}.versions.json")


def write_metrics(path: str | Path, metrics: dict) -> None:
    """Small JSON for git, numbers only; the software versions that produced them go to ``versions_path(path)``."""
    write_text(path, json.dumps(to_builtin(metrics), indent=2, sort_keys=True) + "\n")
    write_text(versions_path(path), json.dumps(software_versions(), indent=2, sort_keys=True) + "\n")


def _renumber_shared_ids(config, ids=None):
    """Keras marks objects shared between layers with ``shared_object_id`` = Python ``id()`` of the object,
    which differs in every process; renumber them 0, 1, ... in order of appearance (same sharing, stable bytes)."""
    ids = {} if ids is None else ids
    if isinstance(config, dict):
        return {k: (ids.setdefault(v, len(ids)) if k == "shared_object_id" else _renumber_shared_ids(v, ids))
                for k, v in config.items()}
    if isinstance(config, list):
        return [_renumber_shared_ids(v, ids) for v in config]
    return config


def save_keras_model(model, path: str | Path) -> None:
    """Save a ``.keras`` archive atomically and byte-reproducibly, without optimizer state.

    Keras stamps the save date into metadata.json and the zip entries, and object ids into config.json; we drop
    the date, fix the entry times and renumber the ids, so identical weights give an identical file in any
    process (DVC then sees an unchanged output). A compiled model would also store its optimizer (Adam: two
    moments per weight, so twice the file); nothing reads it (fine-tuning starts a fresh optimizer, and resuming
    keeps its own state, voiceprint.training.resume), so the model is saved as a fresh, uncompiled wrapper of its
    layers.
    """
    path = Path(path)
    if getattr(model, "optimizer", None) is not None:
        import keras

        def one(tensors):   # a single tensor stays single, so the config is the one an uncompiled save writes
            return tensors[0] if len(tensors) == 1 else tensors

        model = keras.Model(one(model.inputs), one(model.outputs), name=model.name)
    with atomic_path(path) as tmp:
        raw = tmp.with_name("raw.keras")
        model.save(raw)
        with zipfile.ZipFile(raw) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for name in sorted(src.namelist()):
                data = src.read(name)
                if name == "metadata.json":
                    meta = json.loads(data)
                    meta.pop("date_saved", None)
                    data = json.dumps(meta, sort_keys=True).encode()
                elif name == "config.json":
                    data = json.dumps(_renumber_shared_ids(json.loads(data)), sort_keys=True).encode()
                info = zipfile.ZipInfo(name, date_time=FIXED_ZIP_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                dst.writestr(info, data)
        raw.unlink()

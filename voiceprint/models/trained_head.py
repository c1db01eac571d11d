"""A trained head on disk, stored apart from the trunk it reads (the tdnn_head stage's ``models/tdnn_head``).

    head.keras    the head alone: the tap's output -> the head embedding (not normalised)
    head.json     {"kind": ..., "tap": "embedding" | "frames", "trunk": null | "trunk.keras"}
    trunk.keras   only when the trunk was trained with the head (``tdnn.train_trunk``)

The head of a frozen trunk is small (the default dense head: 2.2 MB against the trunk's 3.4 MB) and holds no copy
of the base model: base+head and fused systems are built with :func:`voiceprint.models.fuse_models` as ONE trunk pass
feeding both outputs, so a bundle carries one trunk, not two.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import keras

from voiceprint.core.errors import DataError
from voiceprint.models.heads import TAPS, attach_head, base_and_head, fuse_models

HEAD_FILE = "head.keras"
TRUNK_FILE = "trunk.keras"
META_FILE = "head.json"


@dataclass
class TrainedHead:
    head: keras.Model               # tap output -> head embedding (not normalised)
    kind: str                       # the registered head's name (tdnn.kind)
    tap: str                        # the part of the trunk it reads (voiceprint.models.TAPS)
    trunk: keras.Model | None = None   # the trunk trained with it; None: it reads the base model as it is

    def system(self, base: keras.Model) -> keras.Model:
        """features -> L2-normalised head embedding (the ``head`` system), through its own trunk or ``base``."""
        return attach_head(self.trunk if self.trunk is not None else base, self.head, self.tap)

    def with_base(self, base: keras.Model) -> keras.Model:
        """features -> ``[base embedding, head embedding]`` in one trunk pass (voiceprint.models.base_and_head)."""
        return base_and_head(base, self.head, self.tap, head_trunk=self.trunk)

    def fused(self, base: keras.Model, base_weight: float) -> keras.Model:
        """The fused system as one model: one trunk pass unless the head has its own trained trunk."""
        return fuse_models(base, self.head, base_weight, self.tap, head_trunk=self.trunk)


def save_head(directory: str | Path, trained: TrainedHead) -> Path:
    """Write ``directory`` (head.keras, head.json, trunk.keras only for a trained trunk) atomically."""
    from voiceprint.core.outputs import atomic_path, save_keras_model

    directory = Path(directory)
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        save_keras_model(trained.head, tmp / HEAD_FILE)
        if trained.trunk is not None:
            save_keras_model(trained.trunk, tmp / TRUNK_FILE)
        meta = {"kind": trained.kind, "tap": trained.tap, "trunk": TRUNK_FILE if trained.trunk is not None else None}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return directory


def load_head(directory: str | Path) -> TrainedHead:
    """Read what :func:`save_head` wrote (Keras safe mode), with errors naming the file and the reason."""
    from voiceprint.core.errors import MissingFileError
    from voiceprint.core.runtime import load_model

    directory = Path(directory)
    meta_file = directory / META_FILE
    if not meta_file.is_file():
        raise MissingFileError(f"head {meta_file} not found; run the tdnn_head stage that writes it (dvc repro)")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{meta_file}: not readable JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("tap") not in TAPS or not isinstance(meta.get("kind"), str):
        raise DataError(f"{meta_file}: expected {{'kind': <name>, 'tap': one of {', '.join(TAPS)}, 'trunk': ...}}")
    if meta.get("trunk") not in (None, TRUNK_FILE):
        raise DataError(f"{meta_file}: 'trunk' must be null or {TRUNK_FILE!r}, got {meta.get('trunk')!r}")
    head = load_model(directory / HEAD_FILE, what="head")
    trunk = load_model(directory / TRUNK_FILE, what="head's trunk") if meta["trunk"] else None
    return TrainedHead(head, meta["kind"], meta["tap"], trunk)

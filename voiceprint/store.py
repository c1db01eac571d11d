"""The feature store: one float16 frame matrix on disk, an index, and memory-mapped random crops.

Layout of a store directory::

    frames.f16    raw float16, shape (total_frames, num_bands), utterances back to back
    index.csv     utterance, speaker, path, offset, frames   (offset/frames in rows of frames.f16)
    baseline.npy  float32 (utterances, 40): per-utterance MFCC mean+std for the no-training baseline
    store.json    {"dtype", "num_bands", "kind", "utterances", "total_frames"}

Raw frames with an offset index let a reader memory-map the file and copy only the crop it needs, so a 1,000 h
store never has to fit in RAM. float16 halves the disk of float32; the features are normalised (|x| < ~50), where
float16's ~3 significant digits are far below the noise the model sees.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

FRAMES_FILE = "frames.f16"
INDEX_FILE = "index.csv"
BASELINE_FILE = "baseline.npy"
META_FILE = "store.json"
INDEX_COLUMNS = ["utterance", "speaker", "path", "offset", "frames"]


class StoreWriter:
    """Append utterances one at a time (streaming: memory stays at one utterance)."""

    def __init__(self, directory: str | Path, *, num_bands: int, kind: str, meta: dict | None = None):
        """``meta``: how the features were made (e.g. VAD, minimum length), recorded in store.json."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.num_bands = num_bands
        self.kind = kind
        self.meta = dict(meta or {})
        self._frames_fh = open(self.directory / FRAMES_FILE, "wb")
        self._rows: list[dict] = []
        self._baseline: list[np.ndarray] = []
        self._offset = 0

    def add(self, utterance: str, speaker: str, path: str, features: np.ndarray, baseline: np.ndarray) -> None:
        if features.ndim != 2 or features.shape[1] != self.num_bands:
            raise ValueError(f"{path}: features of shape {features.shape}, expected (frames, {self.num_bands})")
        self._frames_fh.write(np.ascontiguousarray(features, dtype=np.float16).tobytes())
        self._rows.append(dict(utterance=utterance, speaker=speaker, path=path,
                               offset=self._offset, frames=len(features)))
        self._baseline.append(np.asarray(baseline, dtype=np.float32))
        self._offset += len(features)

    def close(self) -> pd.DataFrame:
        self._frames_fh.close()
        index = pd.DataFrame(self._rows, columns=INDEX_COLUMNS)
        index.to_csv(self.directory / INDEX_FILE, index=False, lineterminator="\n")
        baseline = np.stack(self._baseline) if self._baseline else np.zeros((0, 40), np.float32)
        np.save(self.directory / BASELINE_FILE, baseline)
        meta = {**self.meta, "dtype": "float16", "num_bands": self.num_bands, "kind": self.kind,
                "utterances": len(index), "total_frames": int(self._offset)}
        (self.directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return index


@dataclass
class FeatureStore:
    """Read side: ``store[i]`` is utterance i's (frames, bands) float32 array; ``crop`` copies only a window."""

    directory: Path
    index: pd.DataFrame
    frames: np.ndarray          # memory map, (total_frames, num_bands) float16
    baseline: np.ndarray
    kind: str

    @classmethod
    def open(cls, directory: str | Path) -> "FeatureStore":
        directory = Path(directory)
        try:
            meta = json.loads((directory / META_FILE).read_text())
            index = pd.read_csv(directory / INDEX_FILE, dtype={"utterance": str, "speaker": str, "path": str})
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{directory}: not a feature store ({exc.filename} missing); "
                                    "run the mfcc stage first") from None
        total, bands = int(meta["total_frames"]), int(meta["num_bands"])
        if total:
            frames = np.memmap(directory / FRAMES_FILE, dtype=np.float16, mode="r", shape=(total, bands))
        else:
            frames = np.zeros((0, bands), np.float16)
        baseline = np.load(directory / BASELINE_FILE, allow_pickle=False)
        return cls(directory, index, frames, baseline, meta["kind"])

    def __len__(self) -> int:
        return len(self.index)

    @property
    def num_bands(self) -> int:
        return self.frames.shape[1]

    def position(self, utterances) -> np.ndarray:
        """Row numbers of the given utterance ids (KeyError naming the first unknown id)."""
        lookup = pd.Series(np.arange(len(self.index)), index=self.index["utterance"])
        missing = pd.Index(utterances).difference(lookup.index)
        if len(missing):
            raise KeyError(f"utterance {missing[0]!r} is not in the feature store {self.directory}")
        return lookup.loc[list(utterances)].to_numpy()

    def __getitem__(self, i: int) -> np.ndarray:
        start, n = int(self.index.offset.iat[i]), int(self.index.frames.iat[i])
        return np.asarray(self.frames[start:start + n], dtype=np.float32)

    def crop(self, i: int, length: int, rng: np.random.Generator | None) -> np.ndarray:
        """A ``length``-frame window of utterance i: uniformly random start (``rng``) or centred (``rng=None``).

        Shorter utterances are zero-padded at the end, as the original recipe does.
        """
        start, n = int(self.index.offset.iat[i]), int(self.index.frames.iat[i])
        out = np.zeros((length, self.num_bands), np.float32)
        if n <= length:
            out[:n] = self.frames[start:start + n]
        else:
            shift = int(rng.integers(0, n - length + 1)) if rng is not None else (n - length) // 2
            out[:] = self.frames[start + shift:start + shift + length]
        return out

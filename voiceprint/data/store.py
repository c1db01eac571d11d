"""The feature store: float16 frame matrices on disk, an index, and memory-mapped random crops.

A store directory has one of two layouts; :meth:`FeatureStore.open` reads both the same way.

Single file (``StoreWriter(directory, ...)``, what the mfcc stage writes)::

    frames.f16    raw float16, shape (total_frames, num_bands), utterances back to back
    index.csv     utterance, speaker, path, offset, frames   (offset/frames in rows of frames.f16)
    baseline.npy  float32 (utterances, 40): per-utterance MFCC mean+std for the no-training baseline
    store.json    {"dtype", "num_bands", "kind", "utterances", "total_frames"} + how the features were made

Sharded (``StoreWriter(directory, ..., shard=name)`` once per shard, e.g. per corpus subset)::

    shards/<name>.f16           the shard's frames, as frames.f16
    shards/<name>.baseline.npy  the shard's baseline vectors
    index.csv     utterance, speaker, path, shard, offset, frames   (offset in rows of the shard's file)
    store.json    as above, plus "shards": [{"name", "utterances", "frames"}] in index order

Writing a shard adds it (or replaces the shard of that name) and rewrites only index.csv and store.json: the other
shards' files are not touched, so a corpus can grow a subset at a time.

Raw frames with an offset index let a reader memory-map the files and copy only the crop it needs, so a 1,000 h
store (46 GB: 100 frames/s x 64 bands x 2 bytes = 46 MB per hour) never has to fit in RAM. float16 halves the disk
of float32; the features are normalised (|x| < ~50), where float16's ~3 significant digits are far below the noise
the model sees.
"""
from __future__ import annotations

import json
import mmap
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from voiceprint.core.errors import DataError, MissingFileError, VoiceprintError

FRAMES_FILE = "frames.f16"
INDEX_FILE = "index.csv"
BASELINE_FILE = "baseline.npy"
META_FILE = "store.json"
SHARDS_DIR = "shards"
INDEX_COLUMNS = ["utterance", "speaker", "path", "offset", "frames"]
SHARDED_INDEX_COLUMNS = ["utterance", "speaker", "path", "shard", "offset", "frames"]
BASELINE_DIM = 40
_SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class UnknownUtteranceError(VoiceprintError, KeyError):
    """An utterance the split names is not in the feature store (the split and the features do not match)."""


_INDEX_TYPES = {"utterance": str, "speaker": str, "path": str, "shard": str}


class StoreWriter:
    """Append utterances one at a time (streaming: memory stays at one utterance plus the index rows).

    ``shard=None`` writes a single-file store (replacing whatever the directory held); ``shard=name`` writes that
    shard of a sharded store in ``directory``, which may already hold other shards (same kind, bands and meta).
    One writer per store at a time: a shard's close() rewrites the shared index.csv and store.json.
    """

    def __init__(self, directory: str | Path, *, num_bands: int, kind: str, meta: dict | None = None,
                 shard: str | None = None, shard_info: dict | None = None):
        """``meta``: how the features were made (e.g. VAD, minimum length), recorded in store.json.
        ``shard_info``: JSON-able facts about this shard's input (e.g. a hash of its manifest rows), kept in its
        store.json entry so a caller can tell whether the shard is up to date (:func:`shard_entries`)."""
        self.directory = Path(directory)
        self.num_bands = num_bands
        self.kind = kind
        self.meta = dict(meta or {})
        self.shard = shard
        self.shard_info = dict(shard_info or {})
        if shard is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._frames_path = self.directory / FRAMES_FILE
        else:
            if not isinstance(shard, str) or not _SHARD_NAME.fullmatch(shard):
                raise ValueError(f"shard name {shard!r}: use letters, digits, '.', '_', '-' (not first)")
            self._existing = _existing_shards(self.directory, self._header())
            (self.directory / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
            self._frames_path = self.directory / SHARDS_DIR / f"{shard}.f16.partial"
        self._frames_fh = open(self._frames_path, "wb")
        self._rows: list[dict] = []
        self._baseline: list[np.ndarray] = []
        self._offset = 0

    @classmethod
    def for_features(cls, directory: str | Path, settings, *, meta: dict | None = None, **kwargs) -> "StoreWriter":
        """A writer for features made with ``settings`` (:class:`voiceprint.features.FeatureSettings`), recorded in
        store.json (:attr:`FeatureStore.features` reads them back); ``meta``: more to record."""
        return cls(directory, num_bands=settings.num_bands, kind=settings.kind,
                   meta={**settings.store_meta(), **(meta or {})}, **kwargs)

    def _header(self) -> dict:
        """store.json fields every shard of a store must share."""
        return {**self.meta, "dtype": "float16", "num_bands": self.num_bands, "kind": self.kind}

    def add(self, utterance: str, speaker: str, path: str, features: np.ndarray, baseline: np.ndarray) -> None:
        if features.ndim != 2 or features.shape[1] != self.num_bands:
            raise ValueError(f"{path}: features of shape {features.shape}, expected (frames, {self.num_bands})")
        self._frames_fh.write(np.ascontiguousarray(features, dtype=np.float16).tobytes())
        self._rows.append(dict(utterance=utterance, speaker=speaker, path=path,
                               offset=self._offset, frames=len(features)))
        self._baseline.append(np.asarray(baseline, dtype=np.float32))
        self._offset += len(features)

    def close(self) -> pd.DataFrame:
        """Finish the files; returns this writer's index rows (for a shard: the shard's rows)."""
        self._frames_fh.close()
        index = pd.DataFrame(self._rows, columns=INDEX_COLUMNS)
        baseline = np.stack(self._baseline) if self._baseline else np.zeros((0, BASELINE_DIM), np.float32)
        if self.shard is None:
            index.to_csv(self.directory / INDEX_FILE, index=False, lineterminator="\n")
            np.save(self.directory / BASELINE_FILE, baseline)
            _write_meta(self.directory, {**self._header(), "utterances": len(index),
                                         "total_frames": int(self._offset)})
            return index
        self._close_shard(index, baseline)
        return index

    def _close_shard(self, index: pd.DataFrame, baseline: np.ndarray) -> None:
        shards, others = self._existing
        others = others[others.shard != self.shard]
        clash = set(others.utterance) & set(index.utterance)
        if clash:
            raise DataError(f"shard {self.shard!r}: utterance {sorted(clash)[0]!r} is already in another shard of "
                            f"{self.directory}")
        entry = {**self.shard_info, "name": self.shard, "utterances": len(index), "frames": int(self._offset)}
        names = [s["name"] for s in shards]
        # a rewritten shard keeps its place, so the positions of the other shards' utterances do not move
        shards = [entry if s["name"] == self.shard else s for s in shards] if self.shard in names else [*shards, entry]
        rows = index.assign(shard=self.shard)[SHARDED_INDEX_COLUMNS]
        combined = pd.concat([others[others.shard == s["name"]] if s is not entry else rows for s in shards],
                             ignore_index=True)
        shard_dir = self.directory / SHARDS_DIR
        np.save(shard_dir / f"{self.shard}.baseline.npy", baseline)
        os.replace(self._frames_path, shard_dir / f"{self.shard}.f16")
        _replace(self.directory / INDEX_FILE, lambda p: combined.to_csv(p, index=False, lineterminator="\n"))
        _write_meta(self.directory, {**self._header(), "utterances": len(combined),
                                     "total_frames": int(sum(s["frames"] for s in shards)), "shards": shards})


def shard_entries(directory: str | Path) -> list[dict]:
    """The shards of the store in ``directory`` as listed in its store.json (name, utterances, frames and the
    writer's shard_info), in index order; [] when there is no store yet or it is a single-file one."""
    meta_path = Path(directory) / META_FILE
    return json.loads(meta_path.read_text()).get("shards", []) if meta_path.exists() else []


def _replace(path: Path, write) -> None:
    """Write ``path`` through a temporary sibling and an atomic rename: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.partial")
    write(tmp)
    os.replace(tmp, path)


def _write_meta(directory: Path, meta: dict) -> None:
    _replace(directory / META_FILE, lambda p: p.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n"))


def _existing_shards(directory: Path, header: dict) -> tuple[list[dict], pd.DataFrame]:
    """(shard entries, index rows) of the sharded store in ``directory`` (none yet: empty); ValueError if it is a
    single-file store or was made differently (another kind, band count or meta)."""
    meta_path = directory / META_FILE
    if not meta_path.exists():
        return [], pd.DataFrame(columns=SHARDED_INDEX_COLUMNS)
    meta = json.loads(meta_path.read_text())
    if "shards" not in meta:
        raise DataError(f"{meta_path}: a single-file store; shards go into a directory of their own")
    for key in sorted(set(header) | set(meta) - {"shards", "utterances", "total_frames"}):
        if meta.get(key) != header.get(key):
            raise DataError(f"{meta_path}: {key} is {meta.get(key)!r} in the store, {header.get(key)!r} for the "
                            "new shard; all shards of a store must be made the same way")
    return meta["shards"], pd.read_csv(directory / INDEX_FILE, dtype=_INDEX_TYPES)


class FeatureStore:
    """Read side: ``store[i]`` is utterance i's (frames, bands) float32 array; ``crop`` copies only a window.

    Attributes: ``directory``, ``index`` (the index.csv table), ``baseline`` ((utterances, 40) float32), ``kind``,
    ``shards`` (one read-only float16 memory map per frames file; a single-file store has one).
    """

    def __init__(self, directory: Path, index: pd.DataFrame, shards: list[np.ndarray], shard_of: np.ndarray,
                 baseline: np.ndarray, kind: str, num_bands: int):
        self.directory, self.index, self.shards, self.baseline, self.kind = directory, index, shards, baseline, kind
        self._num_bands = num_bands
        # plain arrays: crop() is on the training hot path, and pandas' scalar access costs ~10 us
        self._shard_of = shard_of
        self._offsets = index["offset"].to_numpy(np.int64)
        self._lengths = index["frames"].to_numpy(np.int64)
        self._lookup: pd.Index | None = None  # utterance id -> row, built on first use

    @classmethod
    def open(cls, directory: str | Path) -> "FeatureStore":
        directory = Path(directory)
        try:
            meta = json.loads((directory / META_FILE).read_text())
            index = pd.read_csv(directory / INDEX_FILE, dtype=_INDEX_TYPES)
        except FileNotFoundError as exc:
            raise MissingFileError(f"{directory}: not a feature store ({exc.filename} missing); "
                                   "run the mfcc stage first") from None
        bands, meta_path = int(meta["num_bands"]), directory / META_FILE
        if "shards" not in meta:
            frames = _memmap(directory / FRAMES_FILE, int(meta["total_frames"]), bands, meta_path)
            baseline = np.load(directory / BASELINE_FILE, allow_pickle=False)
            return cls(directory, index, [frames], np.zeros(len(index), np.int64), baseline, meta["kind"], bands)
        entries = meta["shards"]
        shards = [_memmap(directory / SHARDS_DIR / f"{e['name']}.f16", int(e["frames"]), bands, meta_path)
                  for e in entries]
        baselines = [np.load(directory / SHARDS_DIR / f"{e['name']}.baseline.npy", allow_pickle=False)
                     for e in entries]
        counts = [int(e["utterances"]) for e in entries]
        if len(index) != sum(counts) or (index["shard"].to_numpy() != np.repeat([e["name"] for e in entries],
                                                                                 counts)).any():
            raise DataError(f"{directory / INDEX_FILE}: its rows do not follow the shards listed in {meta_path} "
                            "(a store being written, or edited by hand)")
        baseline = np.concatenate(baselines) if baselines else np.zeros((0, BASELINE_DIM), np.float32)
        shard_of = np.repeat(np.arange(len(entries), dtype=np.int64), counts)
        return cls(directory, index, shards, shard_of, baseline, meta["kind"], bands)

    @classmethod
    def union(cls, first: "FeatureStore", *others: "FeatureStore") -> "FeatureStore":
        """One read view over several stores made the same way (e.g. the corpus and its augmented copies):
        rows are ``first``'s, then each other's, in order; nothing is copied (the memory maps are shared)."""
        stores = [first, *others]
        for other in others:
            if (other.kind, other.num_bands) != (first.kind, first.num_bands):
                raise DataError(f"{other.directory}: features {other.kind}/{other.num_bands} bands cannot join "
                                 f"{first.directory}: {first.kind}/{first.num_bands} bands")
        shard_base = np.cumsum([0] + [len(s.shards) for s in stores])[:-1]
        return cls(first.directory, pd.concat([s.index for s in stores], ignore_index=True),
                   [m for s in stores for m in s.shards],
                   np.concatenate([s._shard_of + b for s, b in zip(stores, shard_base)]),
                   np.concatenate([s.baseline for s in stores]), first.kind, first.num_bands)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def features(self):
        """How the features were made (:class:`voiceprint.features.FeatureSettings`, from store.json), with the
        values then in use for keys a store from before them lacks."""
        from voiceprint.features.settings import FeatureSettings

        meta = json.loads((self.directory / META_FILE).read_text())
        return FeatureSettings.from_store(self.kind, self.num_bands, meta)

    @property
    def num_bands(self) -> int:
        return self._num_bands

    @property
    def frames(self) -> np.ndarray:
        """The frame matrix of a single-file store (a memory map)."""
        if len(self.shards) != 1:
            raise AttributeError(f"{self.directory} has {len(self.shards)} shards, not one frame matrix; "
                                 "use store[i] or store.crop()")
        return self.shards[0]

    def position(self, utterances) -> np.ndarray:
        """Row numbers of the given utterance ids (KeyError naming the first unknown id)."""
        if self._lookup is None:
            lookup = pd.Index(self.index["utterance"])
            if not lookup.is_unique:
                raise DataError(f"{self.directory / INDEX_FILE}: utterance "
                                f"{lookup[lookup.duplicated()][0]!r} appears more than once")
            self._lookup = lookup
        wanted = pd.Index(utterances)
        rows = self._lookup.get_indexer(wanted)
        if (rows < 0).any():
            raise UnknownUtteranceError(f"utterance {wanted[np.argmax(rows < 0)]!r} is not in the feature store "
                                        f"{self.directory}")
        return rows

    def _read(self, i: int, first: int, count: int) -> np.ndarray:
        """Frames first .. first + count of utterance i (a view of the memory map), their pages requested in one go."""
        frames = self.shards[self._shard_of[i]]
        start = int(self._offsets[i]) + first
        mapped = frames.base  # the mmap.mmap (_memmap); empty shards are plain arrays
        if isinstance(mapped, mmap.mmap) and count and hasattr(mmap, "MADV_WILLNEED"):
            row = self.num_bands * frames.itemsize
            begin = start * row // mmap.PAGESIZE * mmap.PAGESIZE
            mapped.madvise(mmap.MADV_WILLNEED, begin, (start + count) * row - begin)
        return frames[start:start + count]

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self._read(i, 0, int(self._lengths[i])), dtype=np.float32)

    def crop(self, i: int, length: int, rng: np.random.Generator | None, dtype=np.float32) -> np.ndarray:
        """A ``length``-frame window of utterance i: uniformly random start (``rng``) or centred (``rng=None``).

        Shorter utterances are zero-padded at the end, as the original recipe does. ``dtype=np.float16`` returns
        the stored values as they are: a plain copy, 5x faster than numpy's conversion to float32 (which is
        exact, so the model may as well do it on its device).
        """
        n = int(self._lengths[i])
        out = np.zeros((length, self.num_bands), dtype)
        if n <= length:
            out[:n] = self._read(i, 0, n)
        else:
            shift = int(rng.integers(0, n - length + 1)) if rng is not None else (n - length) // 2
            out[:] = self._read(i, shift, length)
        return out


def _memmap(path: Path, rows: int, bands: int, meta_path: Path) -> np.ndarray:
    """Read-only (rows, bands) float16 map of ``path``; a clear error if its size disagrees with store.json."""
    expected = rows * bands * 2
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise MissingFileError(f"{path}: missing (described in {meta_path})") from None
    if size != expected:
        raise DataError(f"{path}: {size} bytes, but {meta_path} says {rows} frames x {bands} bands of float16 = "
                        f"{expected} bytes (truncated, or from another store)")
    if rows == 0:
        return np.zeros((0, bands), np.float16)
    with open(path, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mmap, "MADV_RANDOM"):
        # Crops are random reads: without this a page fault reads ahead the device's whole read-ahead window
        # (8 MiB here) per 20 KiB crop, 7-12 ms each on a store larger than RAM.  _read() asks for exactly the
        # pages it needs instead.
        mapped.madvise(mmap.MADV_RANDOM)
    return np.ndarray((rows, bands), np.float16, buffer=mapped)  # read-only, like the map

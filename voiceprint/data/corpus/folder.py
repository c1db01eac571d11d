"""Any folder of recordings (or a CSV list of them) -> a manifest, plus every file left out and why.

``scan(source)`` accepts

* a LibriSpeech tree: ``source`` holds ``LibriSpeech/<subset>/<speaker>/<chapter>/`` or ``<subset>/<speaker>/
  <chapter>/`` with subset names such as ``dev-clean`` or ``train-clean-100``; speaker = the LibriSpeech speaker id,
  utterance = the file stem (``84-121123-0000``);
* any other folder: ``<speaker>/**/<file>``; speaker = the first-level folder name, utterance =
  ``<speaker>/<path below it, without the extension>``;
* a CSV file with columns ``path,speaker`` (paths relative to the CSV's folder, or absolute); utterance =
  ``<speaker>/<path relative to the CSV's folder, without the extension>``.

Where two files would get the same utterance id (``a.wav`` and ``a.flac``), both keep their extension in it.

Nothing is skipped silently: every file found (or CSV row) ends in the manifest or in the rejected list. Durations
come from the file headers only (fast); decoding problems inside the audio are found later by the mfcc stage.
Manifest paths are absolute and each row carries the file's ``sha1`` and ``bytes``, so a changed recording
changes the manifest (and DVC reruns the features).  Both tables are sorted by path.
"""
from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

import pandas as pd
import soundfile as sf

from voiceprint.data.audio import AUDIO_EXTENSIONS
from voiceprint.data.corpus import MANIFEST_COLUMNS
from voiceprint.core.errors import DataError, MissingFileError

__all__ = ["FOLDER_MANIFEST_COLUMNS", "REJECTED_COLUMNS", "REJECT_REASONS", "scan"]

FOLDER_MANIFEST_COLUMNS = MANIFEST_COLUMNS + ["sha1", "bytes"]
REJECTED_COLUMNS = ["path", "speaker", "reason", "message"]
REJECT_REASONS = {
    "not_audio": "extension is not an audio type this build decodes",
    "permission_denied": "cannot be read (permission denied)",
    "duplicate": "same content as another file (the first in path order is kept)",
    "missing": "listed in the CSV but does not exist (or a broken link)",
    "bad_manifest_row": "CSV row without a usable path or speaker",
    "no_speaker": "audio outside any speaker folder",
    "empty": "contains no samples",
    "unreadable": "header cannot be decoded",
    "not_a_file": "a fifo, device or socket (or a link to one), not a regular file",
    "bad_filename": "path is not valid UTF-8 (listed with \\x escapes); rename it to include it",
}
LIBRISPEECH_SUBSET = re.compile(r"^(dev|test|train)-(clean|other)(-\d+)?$")


def scan(source: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(manifest, rejected) of a folder of recordings or a CSV manifest (see the module docstring).

    manifest columns: :data:`FOLDER_MANIFEST_COLUMNS` (path absolute, speaker, utterance, duration in seconds,
    sample_rate, sha1, bytes); rejected columns: :data:`REJECTED_COLUMNS`, reason one of :data:`REJECT_REASONS`.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: ``source`` is a file but not a ``.csv``, or a CSV that cannot be parsed or lacks the
            columns ``path`` / ``speaker`` (the message names the file and the columns).
    """
    source = Path(os.path.abspath(source))
    if source.is_dir():
        candidates, rejected = _scan_tree(source)
    elif source.is_file():
        if source.suffix.lower() != ".csv":
            raise DataError(f"{source}: expected a folder of recordings or a .csv manifest (path,speaker)")
        candidates, rejected = _scan_csv(source)
    else:
        raise MissingFileError(f"{source}: no such folder or CSV file")

    kept = []
    for item in sorted(candidates, key=lambda c: (c["path"], c["speaker"])):
        problem = _probe(item)
        if problem is not None:
            rejected.append(dict(path=item["path"], speaker=item["speaker"], reason=problem[0], message=problem[1]))
        else:
            kept.append(item)
    kept = _drop_duplicates(kept, rejected)
    _assign_utterance_ids(kept)
    manifest = pd.DataFrame(kept, columns=FOLDER_MANIFEST_COLUMNS + ["_key", "_fallback_key"])
    manifest = manifest[FOLDER_MANIFEST_COLUMNS].sort_values(["path", "speaker"], ignore_index=True)
    rejected_frame = pd.DataFrame(rejected, columns=REJECTED_COLUMNS).map(_printable)
    rejected_frame = rejected_frame.sort_values(["path", "reason", "speaker"], ignore_index=True)
    return manifest, rejected_frame


# --- sources ------------------------------------------------------------------------------------------------


def _walk(root: Path, rejected: list[dict]):
    """Every file under ``root`` (relative paths, sorted), following folder links once; unreadable folders and
    links back to folders already scanned go to ``rejected``."""
    seen = set()

    def on_error(exc: OSError):
        reason = "permission_denied" if isinstance(exc, PermissionError) else "unreadable"
        rejected.append(dict(path=str(exc.filename), speaker="", reason=reason,
                             message=f"{exc.filename}: folder cannot be listed: {exc.strerror}"))

    for folder, dirs, files in os.walk(root, onerror=on_error, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link to a folder scanned already (or a link loop)
            rejected.append(dict(path=folder, speaker="", reason="duplicate",
                                 message=f"{folder}: links to {real}, which is scanned already"))
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        for name in sorted(files):
            yield Path(folder, name).relative_to(root)


def _librispeech_root(source: Path) -> Path | None:
    for root in (source / "LibriSpeech", source):
        if root.is_dir() and any(p.is_dir() and LIBRISPEECH_SUBSET.match(p.name) for p in root.iterdir()):
            return root
    return None


def _scan_tree(source: Path) -> tuple[list[dict], list[dict]]:
    libri = _librispeech_root(source)
    candidates, rejected = [], []
    for rel in _walk(source, rejected):
        path = str(source / rel)
        if _printable(path) != path:
            # Names the OS gave as bytes that are not UTF-8: the manifest (a UTF-8 CSV) cannot hold them.
            speaker = _printable(rel.parts[0]) if len(rel.parts) >= 2 else ""
            rejected.append(dict(path=path, speaker=speaker, reason="bad_filename",
                                 message=f"{_printable(path)}: {REJECT_REASONS['bad_filename']}"))
            continue
        if libri is not None:
            parts = (source / rel).relative_to(libri).parts if (source / rel).is_relative_to(libri) else ()
            in_place = len(parts) == 4 and LIBRISPEECH_SUBSET.match(parts[0]) is not None
            speaker = parts[1] if in_place else ""
            where = "not in a LibriSpeech <subset>/<speaker>/<chapter>/ folder"
            key, fallback = Path(rel.name).stem, "/".join(parts)
        else:
            in_place = len(rel.parts) >= 2
            speaker = rel.parts[0] if in_place else ""
            where = "directly in the scanned folder, not in a <speaker>/ folder"
            below = Path(*rel.parts[1:]) if in_place else rel
            key, fallback = f"{speaker}/{below.with_suffix('').as_posix()}", f"{speaker}/{below.as_posix()}"
        if rel.suffix.lower() not in AUDIO_EXTENSIONS:
            rejected.append(dict(path=path, speaker=speaker, reason="not_audio", message=_not_audio(path)))
        elif not in_place:
            rejected.append(dict(path=path, speaker="", reason="no_speaker", message=f"{path}: audio {where}"))
        else:
            candidates.append(dict(path=path, speaker=speaker, _key=key, _fallback_key=fallback))
    return candidates, rejected


def _scan_csv(csv_path: Path) -> tuple[list[dict], list[dict]]:
    bad_lines: list[list[str]] = []
    try:
        # Strings as written: a speaker called "NA" or "007" stays that; rows with too many fields are kept aside.
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True,
                            engine="python", on_bad_lines=lambda fields: bad_lines.append(fields))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{csv_path}: cannot be read as CSV: {exc}") from None
    missing = [c for c in ("path", "speaker") if c not in table.columns]
    if missing:
        raise DataError(f"{csv_path}: missing column(s) {', '.join(missing)}; a manifest needs the columns "
                        f"path,speaker (found: {', '.join(map(str, table.columns)) or 'none'})")
    folder = csv_path.parent
    candidates = []
    rejected = [dict(path=str(csv_path), speaker="", reason="bad_manifest_row",
                     message=f"{csv_path}: row with more fields than columns: {fields}") for fields in bad_lines]
    for line, (raw_path, speaker) in enumerate(zip(table["path"], table["speaker"]), start=2):
        # A row with fewer fields than columns reads as missing values.
        raw_path, speaker = ("" if pd.isna(v) else str(v).strip() for v in (raw_path, speaker))
        where = f"{csv_path}, line {line}"
        if not raw_path or not speaker:
            rejected.append(dict(path=raw_path or str(csv_path), speaker=speaker, reason="bad_manifest_row",
                                 message=f"{where}: empty {'path' if not raw_path else 'speaker'}"))
            continue
        path = os.path.abspath(folder / raw_path)  # an absolute raw_path replaces the folder
        if os.path.isdir(path):
            rejected.append(dict(path=path, speaker=speaker, reason="bad_manifest_row",
                                 message=f"{where}: {path} is a folder, not a file"))
            continue
        if not os.path.exists(path):
            rejected.append(dict(path=path, speaker=speaker, reason="missing",
                                 message=f"{where}: {path} does not exist"
                                         + (" (broken link)" if os.path.lexists(path) else "")))
            continue
        if Path(path).suffix.lower() not in AUDIO_EXTENSIONS:
            rejected.append(dict(path=path, speaker=speaker, reason="not_audio", message=_not_audio(path)))
            continue
        rel = Path(os.path.relpath(path, folder)).as_posix()  # '../' for files outside the CSV's folder
        candidates.append(dict(path=path, speaker=speaker, _key=f"{speaker}/{Path(rel).with_suffix('').as_posix()}",
                               _fallback_key=f"{speaker}/{rel}"))
    return candidates, rejected


# --- per file -----------------------------------------------------------------------------------------------


def _printable(text):
    """A name as decoded by the OS (undecodable bytes as surrogates) -> valid UTF-8 text, bytes as \\xNN."""
    if not isinstance(text, str):
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _not_audio(path: str) -> str:
    return (f"{path}: extension {Path(path).suffix or '(none)'} is not an audio type this build decodes "
            f"({', '.join(sorted(AUDIO_EXTENSIONS))})")


def _probe(item: dict) -> tuple[str, str] | None:
    """Fill sha1, bytes, duration, sample_rate of ``item`` from the file; (reason, message) if it is unusable."""
    path = item["path"]
    try:
        # Before opening: a fifo blocks open() until a writer comes, /dev/zero never ends; either hangs the scan.
        if not stat.S_ISREG(os.stat(path).st_mode):
            return "not_a_file", f"{path}: {REJECT_REASONS['not_a_file']}"
        digest = hashlib.sha1()
        size = 0
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
    except PermissionError as exc:
        return "permission_denied", f"{path}: {exc.strerror}"
    except FileNotFoundError:
        return "missing", f"{path}: does not exist (a broken link?)"
    except OSError as exc:
        return "unreadable", f"{path}: {type(exc).__name__}: {exc}"
    if size == 0:
        return "empty", f"{path}: zero-byte file"
    try:
        info = sf.info(path)
    except (sf.SoundFileError, RuntimeError, ValueError) as exc:
        return "unreadable", f"{path}: {type(exc).__name__}: {exc}"
    if info.frames <= 0 or info.samplerate <= 0:
        return "empty", f"{path}: header says {info.frames} samples at {info.samplerate} Hz"
    item.update(sha1=digest.hexdigest(), bytes=size, sample_rate=int(info.samplerate),
                duration=info.frames / info.samplerate)
    return None


def _drop_duplicates(items: list[dict], rejected: list[dict]) -> list[dict]:
    """Keep the first file (in path order) of each content; later copies go to ``rejected`` naming the kept one."""
    first: dict[str, dict] = {}
    kept = []
    for item in items:
        original = first.setdefault(item["sha1"], item)
        if original is item:
            kept.append(item)
        else:
            rejected.append(dict(path=item["path"], speaker=item["speaker"], reason="duplicate",
                                 message=f"{item['path']}: same content (sha1 {item['sha1']}) as "
                                         f"{original['path']} (speaker {original['speaker']}), which is kept"))
    return kept


def _assign_utterance_ids(items: list[dict]) -> None:
    counts = pd.Series([item["_key"] for item in items], dtype=object).value_counts()
    for item in items:
        item["utterance"] = item["_key"] if counts[item["_key"]] == 1 else item["_fallback_key"]
    ids = pd.Series([item["utterance"] for item in items], dtype=object)
    if ids.duplicated().any():  # distinct files have distinct fallback keys; this guards the rule itself
        raise DataError(f"utterance ids not unique: {sorted(set(ids[ids.duplicated()]))[:5]}")

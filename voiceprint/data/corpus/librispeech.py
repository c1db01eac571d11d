"""LibriSpeech (OpenSLR SLR12): download the chosen subsets, verify them, extract them, list their utterances.

Archives are kept in the downloads directory (:func:`voiceprint.data.fetch.downloads_dir`, outside DVC) and reused
once verified; the audio is extracted to ``<raw>/LibriSpeech/<subset>/<speaker>/<chapter>/*.flac`` beside the
corpus's own metadata files (README, LICENSE: CC BY 4.0, SPEAKERS, CHAPTERS, BOOKS).
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

import pandas as pd
import soundfile as sf

from voiceprint.data import fetch
from voiceprint.data.corpus import MANIFEST_COLUMNS
from voiceprint.core.errors import DataError

MIRROR = "https://www.openslr.org/resources/12"

# Extracted FLAC takes about as much room as the tar.gz (gzip cannot shrink FLAC): 1.06x measured on
# librispeech-mini (42.4 MB of files from a 39.9 MB archive); 1.1 leaves a margin for filesystem blocks.
EXTRACT_FACTOR = 1.1


@dataclass(frozen=True)
class Archive:
    md5: str
    size: int       # bytes


# md5: OpenSLR's published list https://www.openslr.org/resources/12/md5sum.txt; the same seven values are
# pinned in PaddlePaddle/PaddleSpeech dataset/librispeech/librispeech.py (MD5_TEST_CLEAN ... MD5_TRAIN_OTHER_500).
# Sizes in bytes: the final release as listed in kaldi-asr/kaldi egs/librispeech/s5/local/download_and_untar.sh
# (sizes_new, in md5sum.txt's alphabetical order).
SUBSETS = {
    "dev-clean": Archive("42e2234ba48799c1f50f24a7926300a1", 337_926_286),          # 322 MiB
    "dev-other": Archive("c8d0bcc9cca99d4f8b62fcc847357931", 314_305_928),          # 300 MiB
    "test-clean": Archive("32fa31d27d2e1cad72775fee3f4849a9", 346_663_984),         # 331 MiB
    "test-other": Archive("fb5a50374b501bb3bac4815ee91d3135", 328_757_843),         # 314 MiB
    "train-clean-100": Archive("2a93770f6d5c6c964bc36631d331a522", 6_387_309_499),  # 5.9 GiB
    "train-clean-360": Archive("c0e676e450a7ff2f54aeade5171606fa", 23_049_477_885),  # 21.5 GiB
    "train-other-500": Archive("d1a0fd59409feb2c614ce4d30c387708", 30_593_501_606),  # 28.5 GiB
}


def check_subsets(subsets: Sequence[str]) -> list[str]:
    """The requested subsets, validated, in sorted order (so outputs never depend on the order listed)."""
    if isinstance(subsets, str) or not isinstance(subsets, (list, tuple)) or not subsets:
        raise DataError(f"data.subsets: expected a non-empty list of LibriSpeech subsets, got {subsets!r}; "
                        f"valid: {', '.join(SUBSETS)}")
    unknown = [s for s in subsets if s not in SUBSETS]
    if unknown:
        raise DataError(f"data.subsets: unknown subset(s) {unknown}; valid: {', '.join(SUBSETS)}")
    repeated = sorted({s for s in subsets if list(subsets).count(s) > 1})
    if repeated:
        raise DataError(f"data.subsets: {repeated} listed more than once")
    return sorted(subsets)


def check_mirror(mirror: str) -> str:
    """The mirror's base URL without a trailing slash; archives are ``{mirror}/{subset}.tar.gz``."""
    parts = urlsplit(mirror) if isinstance(mirror, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise DataError(f"data.mirror: expected an http(s) base URL such as {MIRROR}, got {mirror!r}")
    return mirror.rstrip("/")


def archive_url(mirror: str, subset: str) -> str:
    return f"{check_mirror(mirror)}/{subset}.tar.gz"


def extract_room(subset: str) -> int:
    return math.ceil(SUBSETS[subset].size * EXTRACT_FACTOR)


def prepare(raw_dir: str | Path, subsets: Sequence[str], *, mirror: str = MIRROR,
            downloads: str | Path | None = None, progress: bool = True, retries: int = 5,
            backoff: float = 2.0) -> tuple[pd.DataFrame, dict[str, fetch.Fetched]]:
    """Download (or reuse), verify and extract ``subsets`` into ``raw_dir``.

    Returns the manifest (columns :data:`MANIFEST_COLUMNS`, paths relative to ``raw_dir``, sorted by path) and
    what happened to each archive (bytes downloaded, or reused).
    """
    subsets = check_subsets(subsets)
    mirror = check_mirror(mirror)
    raw_dir = Path(raw_dir)
    downloads = Path(downloads) if downloads is not None else fetch.downloads_dir()
    archives = {s: downloads / f"{s}.tar.gz" for s in subsets}
    # Checked for all subsets at once with the published sizes, so a request for several large subsets fails
    # now rather than after hours of downloading; each download checks again with the server's Content-Length.
    needs = [(raw_dir, extract_room(s), f"extracting {s}") for s in subsets]
    for s, archive in archives.items():
        if not archive.exists():
            part = fetch.part_path(archive)
            done = part.stat().st_size if part.exists() else 0
            needs.append((downloads, SUBSETS[s].size - done, f"downloading {archive.name}"))
    fetch.check_free_space(needs)
    fetched = {}
    for s in subsets:
        fetched[s] = fetch.download(archive_url(mirror, s), archives[s], md5=SUBSETS[s].md5,
                                    size_hint=SUBSETS[s].size,
                                    also_needed=[(raw_dir, extract_room(s), f"extracting {s}")],
                                    retries=retries, backoff=backoff, progress=progress)
        _extract_subset(archives[s], raw_dir, s, progress=progress)
    return build_manifest(raw_dir, subsets), fetched


def _extract_subset(archive: Path, raw_dir: Path, subset: str, *, progress: bool) -> None:
    """Extract one archive and merge its LibriSpeech/ tree into ``raw_dir/LibriSpeech``."""
    staging = raw_dir / f".{subset}.extracted"
    fetch.extract_tar(archive, staging, max_ratio=None, progress=progress)   # md5-pinned: its size is known
    try:
        found = sorted(p.name for p in staging.iterdir())
        root = staging / "LibriSpeech"
        if found != ["LibriSpeech"] or not (root / subset).is_dir():
            raise DataError(f"{archive}: expected a LibriSpeech/{subset}/ tree, found {found} at the top "
                            f"and {sorted(p.name for p in root.iterdir()) if root.is_dir() else []} inside")
        target = raw_dir / "LibriSpeech"
        target.mkdir(parents=True, exist_ok=True)
        for entry in sorted(root.iterdir()):
            if entry.is_dir() and entry.name != subset:
                raise DataError(f"{archive}: unexpected directory LibriSpeech/{entry.name}/ in the archive "
                                f"of {subset}")
            if (target / entry.name).exists():
                if entry.name == subset:
                    raise DataError(f"{target / subset}: already exists; refusing to merge {archive} into it")
                continue    # README/LICENSE/SPEAKERS/...: the same text in every subset's archive
            os.replace(entry, target / entry.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build_manifest(raw_dir: str | Path, subsets: Sequence[str]) -> pd.DataFrame:
    """One row per FLAC under ``raw_dir/LibriSpeech/<subset>``; duration and rate from the file header.

    A file whose header cannot be read is listed with an empty duration and rate, so the feature stage rejects it
    with a reason instead of the file vanishing here.
    """
    raw_dir = Path(raw_dir)
    rows = []
    for subset in subsets:
        base = raw_dir / "LibriSpeech" / subset
        files = sorted(base.rglob("*.flac"))
        if not files:
            raise DataError(f"{base}: no .flac files for subset {subset}")
        for path in files:
            parts = path.relative_to(base).parts
            rel = path.relative_to(raw_dir).as_posix()
            if len(parts) != 3 or not path.stem.startswith(f"{parts[0]}-{parts[1]}-"):
                raise DataError(f"{rel}: not in the LibriSpeech layout "
                                f"<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<n>.flac")
            duration, rate = _header(path)
            rows.append((rel, parts[0], path.stem, duration, rate))
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    manifest["sample_rate"] = manifest["sample_rate"].astype("Int64")     # empty (not 0) where unreadable
    return manifest.sort_values("path", ignore_index=True)


def _header(path: Path) -> tuple[float, int | None]:
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError):
        return math.nan, None
    return info.frames / info.samplerate, info.samplerate

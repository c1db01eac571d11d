"""Downloading large archives over real networks, and unpacking them safely.

:func:`download` writes to ``<name>.part``, resumes it with an HTTP Range request after a cut connection, retries
timeouts, connection resets and 5xx answers with exponential backoff (a bounded number of times), checks free disk
space before it transfers anything, and renames the file into place only once its md5 is the published one. A
verified file is recorded in a sidecar ``<name>.verified.json`` (size, mtime, md5), so later runs reuse it without
hashing gigabytes again. :func:`extract_tar` refuses members that would land outside the target (absolute paths,
``..``, links pointing outside, paths through links) and device files or fifos, and renames a temporary directory into place only when
everything is extracted.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import posixpath
import shutil
import ssl
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence

from tqdm import tqdm

import voiceprint
from voiceprint.core.errors import VoiceprintError
from voiceprint.core.outputs import write_text

logger = logging.getLogger(__name__)

DOWNLOADS_ENV = "VOICEPRINT_DOWNLOADS"
DEFAULT_DOWNLOADS = Path("data/downloads")
PART_SUFFIX = ".part"
SIDECAR_SUFFIX = ".verified.json"
CHUNK_BYTES = 1 << 20
USER_AGENT = f"voiceprint/{voiceprint.__version__} (+python urllib)"

# A space need: (directory, bytes, what for). Needs of directories on one filesystem add up.
SpaceNeed = tuple[Path, int, str]


class FetchError(VoiceprintError, ValueError):
    """A download or archive cannot be used; the message names the URL or file and the reason.
    A VoiceprintError, so stage scripts report it in one line like other bad input."""


class ChecksumMismatch(FetchError):
    """The bytes received are not the published archive."""


class UnsafeArchive(FetchError):
    """An archive member would write outside the target directory, or is a device file or fifo."""


class NotEnoughSpace(FetchError):
    """Too little free disk space for a download and what follows it."""


class _Retry(Exception):
    """A transient failure of one attempt (timeout, reset, 5xx, cut connection): worth another try."""


class _TooSlow(_Retry):
    """An attempt below the minimum rate: retried, but never counted as progress, whatever it added."""


@dataclass(frozen=True)
class Fetched:
    path: Path
    size: int
    downloaded_bytes: int   # transferred by this call (0 when an earlier verified file was reused)
    reused: bool


def downloads_dir() -> Path:
    """Where archives are kept between runs: $VOICEPRINT_DOWNLOADS, else data/downloads. An environment variable,
    not a param: where an archive is cached never changes results."""
    return Path(os.environ.get(DOWNLOADS_ENV) or DEFAULT_DOWNLOADS)


def part_path(dest: str | Path) -> Path:
    dest = Path(dest)
    return dest.with_name(dest.name + PART_SUFFIX)


def md5_of(path: str | Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def human_bytes(n: float) -> str:
    if n < 1024 ** 3:
        return f"{n / 1024 ** 2:.1f} MiB"
    return f"{n / 1024 ** 3:.2f} GiB"


def check_free_space(needs: Iterable[SpaceNeed]) -> None:
    """Fail with :class:`NotEnoughSpace` when a filesystem has less free space than the needs placed on it."""
    by_filesystem: dict[int, list] = {}
    for directory, nbytes, purpose in needs:
        existing = Path(directory).absolute()
        while not existing.exists():        # the directory may not be created yet
            existing = existing.parent
        entry = by_filesystem.setdefault(existing.stat().st_dev, [existing, 0, []])
        entry[1] += max(0, int(nbytes))
        entry[2].append(f"{purpose}: {human_bytes(max(0, nbytes))} in {directory}")
    for existing, needed, parts in by_filesystem.values():
        free = shutil.disk_usage(existing).free
        if needed > free:
            raise NotEnoughSpace(
                f"not enough disk space: {human_bytes(needed)} needed on the filesystem of {existing} "
                f"({'; '.join(parts)}), {human_bytes(free)} available")


def download(url: str, dest: str | Path, *, md5: str, size_hint: int | None = None,
             also_needed: Sequence[SpaceNeed] = (), retries: int = 5, backoff: float = 2.0,
             max_backoff: float = 60.0, timeout: float = 60.0, min_rate: float = 1024.0, rate_window: float = 60.0,
             progress: bool = True) -> Fetched:
    """Download ``url`` to ``dest`` unless a verified copy is already there; return what was done.

    ``size_hint`` (bytes) is used for the disk check when the server sends no length; ``also_needed`` adds what
    must fit afterwards (room to extract). ``retries`` bounds the consecutive attempts that did not make the part
    file longer than it has ever been; one that did resets the count, so a long transfer over a flaky line keeps
    going, while a server that restarts the file and cuts it at the same byte every time is given up on.
    Waits grow as ``backoff * 2**k`` seconds, at most ``max_backoff``. ``timeout`` bounds each wait for bytes;
    an attempt that receives under ``min_rate`` bytes/s over ``rate_window`` seconds (a trickle that never trips
    the timeout) is cut and counts as a retry without progress.
    """
    dest = Path(dest)
    md5 = md5.lower()
    if dest.exists():
        if not _recorded_as_verified(dest, md5):
            actual = md5_of(dest)
            if actual != md5:
                raise ChecksumMismatch(f"{dest}: already present but its md5 is {actual}, expected {md5} "
                                       f"(the archive at {url}); delete it to download it again")
            _record_verified(dest, md5)
        return Fetched(dest, dest.stat().st_size, 0, True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    transfer = _Transfer(url, part, size_hint=size_hint, also_needed=also_needed, timeout=timeout,
                         min_rate=min_rate, rate_window=rate_window, progress=progress)
    failures = 0
    best = part.stat().st_size if part.exists() else 0
    while True:
        try:
            transfer.attempt()
            break
        except _Retry as exc:
            # Progress is the longest part file so far, not bytes received: bytes that rewrite a restarted file
            # from zero (a server ignoring Range) do not bring the end closer.
            size = part.stat().st_size if part.exists() else 0
            failures = 0 if size > best and not isinstance(exc, _TooSlow) else failures + 1
            best = max(best, size)
            if failures > retries:
                kept = (f"; the partial download {part} ({part.stat().st_size} bytes) is kept and the next run "
                        "resumes it" if part.exists() else "")
                raise FetchError(f"{url}: giving up after {retries + 1} attempts without progress; last error: "
                                 f"{exc}{kept}") from None
            delay = min(max_backoff, backoff * 2 ** max(0, failures - 1))
            logger.warning("%s: %s; retrying in %.1f s (%d of %d retries without progress used)", dest.name, exc,
                           delay, failures, retries)
            time.sleep(delay)
    actual = md5_of(part)
    if actual != md5:
        # A bad file cannot be repaired by resuming it: remove it so the next run starts from byte 0.
        part.unlink()
        raise ChecksumMismatch(f"{url}: md5 mismatch: expected {md5}, got {actual}; the downloaded file was "
                               "removed (nothing was extracted), the next run downloads it again from the start")
    os.replace(part, dest)
    _record_verified(dest, md5)
    return Fetched(dest, dest.stat().st_size, transfer.received, False)


def _sidecar(dest: Path) -> Path:
    return dest.with_name(dest.name + SIDECAR_SUFFIX)


def _stamp(dest: Path, md5: str) -> dict:
    st = dest.stat()
    return {"md5": md5, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _recorded_as_verified(dest: Path, md5: str) -> bool:
    try:
        return json.loads(_sidecar(dest).read_text()) == _stamp(dest, md5)
    except (FileNotFoundError, ValueError):     # no record, or an unreadable one: verify again
        return False


def _record_verified(dest: Path, md5: str) -> None:
    write_text(_sidecar(dest), json.dumps(_stamp(dest, md5), sort_keys=True) + "\n")


def _content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """'bytes 100-199/1000' -> (100, 199, 1000); 'bytes */1000' -> (None, None, 1000); unknown parts -> None."""
    if not value or not value.startswith("bytes "):
        return None, None, None
    span, _, total = value[6:].partition("/")
    start, _, end = span.partition("-")
    return tuple(int(v) if v.isdigit() else None for v in (start, end, total))


class _Transfer:
    """One file's download into its .part file; :meth:`attempt` is one HTTP request."""

    def __init__(self, url: str, part: Path, *, size_hint, also_needed, timeout, min_rate, rate_window, progress):
        self.url, self.part, self.size_hint = url, part, size_hint
        self.name = part.name[:-len(PART_SUFFIX)]
        self.also_needed, self.timeout, self.progress = list(also_needed), timeout, progress
        self.min_rate, self.rate_window = min_rate, rate_window
        self.received = 0       # bytes received over all attempts

    def attempt(self) -> None:
        """Return when the part file holds the whole resource; raise _Retry on a transient failure."""
        offset = self.part.stat().st_size if self.part.exists() else 0
        headers = {"User-Agent": USER_AGENT}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            response = urllib.request.urlopen(urllib.request.Request(self.url, headers=headers),
                                              timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code == 416 and offset:
                if _content_range(exc.headers.get("Content-Range"))[2] == offset:
                    return      # the part file is already complete
                self.part.unlink()
                raise _Retry(f"HTTP 416 for bytes {offset}- (partial file longer than the archive); "
                             "restarting from the beginning") from None
            if exc.code in (408, 429) or exc.code >= 500:
                raise _Retry(f"HTTP {exc.code} {exc.reason}") from None
            raise FetchError(f"{self.url}: HTTP {exc.code} {exc.reason}; not retrying (check the URL: "
                             "data.mirror and the subset name)") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ssl.SSLCertVerificationError):    # retrying cannot fix a certificate
                raise FetchError(f"{self.url}: {exc.reason}") from None
            raise _Retry(f"{type(exc.reason).__name__}: {exc.reason}") from None
        except (OSError, http.client.HTTPException) as exc:     # timeouts, refused/reset connections, DNS
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
        with response:
            self._receive(response, offset)

    def _receive(self, response, offset: int) -> None:
        if response.status == 206:
            value, length = response.headers.get("Content-Range"), response.headers.get("Content-Length")
            start, end, total = _content_range(value)
            # The rest of the file from our offset, as one span that agrees with the body's length; anything else
            # is a protocol error, and appending it would corrupt the part file (or find none to remove).
            if (start != offset or end is None or total not in (None, end + 1)
                    or (length is not None and length != str(end - start + 1))):
                self.part.unlink(missing_ok=True)
                raise _Retry(f"asked for bytes {offset}-, the server sent HTTP 206 with Content-Range {value!r}"
                             f" and Content-Length {length!r}; restarting from the beginning")
            mode = "ab"
        elif response.status == 200:
            # No Range asked, or the server ignores Range and sends everything: start the part file over.
            mode, offset = "wb", 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        else:
            raise FetchError(f"{self.url}: unexpected HTTP status {response.status}")
        remaining = (total if total is not None else self.size_hint or 0) - offset
        check_free_space([(self.part.parent, remaining, f"downloading {self.name}"), *self.also_needed])
        with open(self.part, mode) as out, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                                 unit_divisor=1024, desc=self.name,
                                                 disable=not self.progress) as bar:
            window_start, window_bytes = time.monotonic(), 0
            while True:
                try:
                    # read1: what has arrived (read would wait for a whole chunk), so the rate is checked and
                    # progress shown from the first bytes on.
                    chunk = response.read1(CHUNK_BYTES)
                except (OSError, http.client.HTTPException) as exc:
                    raise _Retry(f"{type(exc).__name__}: {exc}") from None
                if not chunk:
                    break
                out.write(chunk)
                self.received += len(chunk)
                bar.update(len(chunk))
                window_bytes += len(chunk)
                elapsed = time.monotonic() - window_start
                if elapsed >= self.rate_window:
                    if window_bytes < self.min_rate * elapsed:
                        raise _TooSlow(f"under {self.min_rate:.0f} bytes/s for {elapsed:.1f} s ({window_bytes} "
                                       "bytes); too slow")
                    window_start, window_bytes = time.monotonic(), 0
        size = self.part.stat().st_size
        # http.client returns b"" when the connection closes early, so the length is checked here.
        if total is not None and size != total:
            raise _Retry(f"connection closed after {size} of {total} bytes")


def extract_tar(archive: str | Path, dest: str | Path, *, max_ratio: float | None = 100.0,
                progress: bool = False) -> int:
    """Extract a (compressed) tar into the new directory ``dest``; return the number of regular files.

    Every member is checked before it is written (absolute paths, ``..``, links leaving ``dest``, paths through
    links, device files and fifos are refused with an error naming the member), then extracted with tarfile's
    ``data`` filter as a second line of defence. Extraction goes to a temporary sibling renamed to ``dest`` only
    when complete. Each file's declared size must fit on the disk, and all of them together at most ``max_ratio``
    times the archive's size (a decompression bomb); ``None`` for an md5-pinned archive, whose size is known.
    """
    archive, dest = Path(archive), Path(dest)
    if dest.exists():
        raise FetchError(f"{dest}: already exists; refusing to extract {archive} over it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extracting-", dir=dest.parent))
    files = 0
    try:
        # Stream mode: one pass over the compressed data (random access would decompress it twice).
        with tarfile.open(archive, "r|*") as tar, tqdm(desc=f"extract {archive.name}", unit=" files",
                                                       disable=not progress) as bar:
            seen, limit, total = _Seen(), max_ratio and max_ratio * archive.stat().st_size, 0
            for member in tar:
                _check_member(archive, member, seen)
                total += member.size if member.isfile() else 0
                if limit and total > limit:
                    raise UnsafeArchive(f"{archive}: member {member.name!r} refused: the archive would expand to "
                                        f"over {max_ratio:g} times its size (a decompression bomb?); nothing was "
                                        "extracted")
                if member.isfile():
                    check_free_space([(work, member.size, f"extracting {member.name}")])
                try:
                    tar.extract(member, work, filter="data")
                except tarfile.FilterError as exc:
                    raise UnsafeArchive(f"{archive}: member {member.name!r} refused: {exc}; "
                                        "nothing was extracted") from None
                files += member.isfile()
                bar.update(member.isfile())
        os.replace(work, dest)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise FetchError(f"{archive}: damaged or not a tar archive: {exc}; nothing was extracted") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return files


class _Seen:
    """What earlier members made: symlinks (whose meaning the OS resolves) and regular files (by path parts)."""

    def __init__(self):
        self.links: set[tuple[str, ...]] = set()
        self.files: set[tuple[str, ...]] = set()


def _check_member(archive: Path, member: tarfile.TarInfo, seen: _Seen) -> None:
    """Refuse a member unless where it lands, and where any link it makes resolves, follows from names alone.

    Lexical checks alone are not enough: a path through an extracted symlink, or '..' after a symlink in a link
    target, resolves on disk somewhere else than its text says, and chains of links nested past PATH_MAX defeat
    os.path.realpath and with it the ``data`` filter (CVE-2025-4517). So a member may not pass through an earlier
    link, '..' may only open a symlink target, and a hard link must name a file extracted earlier. Under these
    rules every link resolves inside the target by induction, whatever the Python version.
    """
    def refused(why: str) -> UnsafeArchive:
        return UnsafeArchive(f"{archive}: member {member.name!r} refused: {why}; nothing was extracted")

    path = PurePosixPath(member.name)
    if path.is_absolute():
        raise refused("absolute path")
    if ".." in path.parts:
        raise refused("'..' in its path")
    parts = path.parts
    through = next((parts[:i] for i in range(1, len(parts) + 1) if parts[:i] in seen.links), None)
    if through is not None:
        raise refused(f"its path passes through the link {'/'.join(through)!r} extracted earlier")
    if member.issym():
        if PurePosixPath(member.linkname).is_absolute():
            raise refused(f"link to the absolute path {member.linkname!r}")
        target = [p for p in member.linkname.split("/") if p not in ("", ".")]
        if ".." in target[next((i for i, p in enumerate(target) if p != ".."), len(target)):]:
            raise refused(f"link to {member.linkname!r} has '..' after a name (resolved on disk, not as written)")
        # A symlink resolves from its own directory.
        if posixpath.normpath(path.parent / member.linkname).split("/")[0] == "..":
            raise refused(f"link to {member.linkname!r} points outside the target directory")
        seen.links.add(parts)
        seen.files.discard(parts)
    elif member.islnk():
        # A hard link resolves from the archive root, and the OS follows a symlink at its end.
        if PurePosixPath(member.linkname).is_absolute():
            raise refused(f"link to the absolute path {member.linkname!r}")
        if posixpath.normpath(member.linkname).split("/")[0] == "..":
            raise refused(f"link to {member.linkname!r} points outside the target directory")
        if PurePosixPath(member.linkname).parts not in seen.files:
            raise refused(f"hard link to {member.linkname!r}, which is not a file extracted earlier")
        seen.files.add(parts)
    elif member.ischr() or member.isblk() or member.isfifo():
        raise refused("device file or fifo")
    elif member.isfile():
        seen.files.add(parts)
    elif not member.isdir():
        raise refused(f"unsupported member type {member.type!r}")

"""Downloading large archives over real networks, and unpacking them safely.

:func:`download` writes to ``<name>.part``, resumes it with an HTTP Range request after a cut connection, retries
timeouts, connection resets and 5xx answers with exponential backoff (a bounded number of times), checks free disk
space before it transfers anything, and renames the file into place only once its md5 is the published one. A
verified file is recorded in a sidecar ``<name>.verified.json`` (size, mtime, md5), so later runs reuse it without
hashing gigabytes again. :func:`extract_tar` refuses members that would land outside the target (absolute paths,
``..``, links pointing outside) and device files or fifos, and renames a temporary directory into place only when
everything is extracted.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import posixpath
import shutil
import ssl
import sys
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
from voiceprint.errors import VoiceprintError
from voiceprint.outputs import write_text

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
             max_backoff: float = 60.0, timeout: float = 60.0, progress: bool = True) -> Fetched:
    """Download ``url`` to ``dest`` unless a verified copy is already there; return what was done.

    ``size_hint`` (bytes) is used for the disk check when the server sends no length; ``also_needed`` adds what
    must fit afterwards (room to extract). ``retries`` bounds the consecutive attempts that brought no new bytes;
    an attempt that advanced the download resets the count, so a long transfer over a flaky line keeps going.
    Waits grow as ``backoff * 2**k`` seconds, at most ``max_backoff``.
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
                         progress=progress)
    failures = 0
    while True:
        received_before = transfer.received
        try:
            transfer.attempt()
            break
        except _Retry as exc:
            failures = 0 if transfer.received > received_before else failures + 1
            if failures > retries:
                kept = (f"; the partial download {part} ({part.stat().st_size} bytes) is kept and the next run "
                        "resumes it" if part.exists() else "")
                raise FetchError(f"{url}: giving up after {retries + 1} attempts without progress; last error: "
                                 f"{exc}{kept}") from None
            delay = min(max_backoff, backoff * 2 ** max(0, failures - 1))
            print(f"  {dest.name}: {exc}; retrying in {delay:.1f} s "
                  f"({failures} of {retries} retries without progress used)", file=sys.stderr)
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


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """'bytes 100-199/1000' -> (100, 1000); 'bytes */1000' -> (None, 1000); unknown parts -> None."""
    if not value or not value.startswith("bytes "):
        return None, None
    span, _, total = value[6:].partition("/")
    start = span.partition("-")[0]
    return (int(start) if start.isdigit() else None), (int(total) if total.isdigit() else None)


class _Transfer:
    """One file's download into its .part file; :meth:`attempt` is one HTTP request."""

    def __init__(self, url: str, part: Path, *, size_hint, also_needed, timeout, progress):
        self.url, self.part, self.size_hint = url, part, size_hint
        self.name = part.name[:-len(PART_SUFFIX)]
        self.also_needed, self.timeout, self.progress = list(also_needed), timeout, progress
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
                if _content_range(exc.headers.get("Content-Range"))[1] == offset:
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
            start, total = _content_range(response.headers.get("Content-Range"))
            if start != offset:
                self.part.unlink()
                raise _Retry(f"asked for bytes {offset}-, the server sent Content-Range "
                             f"{response.headers.get('Content-Range')!r}; restarting from the beginning")
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
            while True:
                try:
                    chunk = response.read(CHUNK_BYTES)
                except (OSError, http.client.HTTPException) as exc:
                    raise _Retry(f"{type(exc).__name__}: {exc}") from None
                if not chunk:
                    break
                out.write(chunk)
                self.received += len(chunk)
                bar.update(len(chunk))
        size = self.part.stat().st_size
        # http.client returns b"" when the connection closes early, so the length is checked here.
        if total is not None and size != total:
            raise _Retry(f"connection closed after {size} of {total} bytes")


def extract_tar(archive: str | Path, dest: str | Path, *, progress: bool = False) -> int:
    """Extract a (compressed) tar into the new directory ``dest``; return the number of regular files.

    Every member is checked before it is written (absolute paths, ``..``, links leaving ``dest``, device files
    and fifos are refused with an error naming the member), then extracted with tarfile's ``data`` filter as a
    second line of defence. Extraction goes to a temporary sibling renamed to ``dest`` only when complete.
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
            for member in tar:
                _check_member(archive, member)
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


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    def refused(why: str) -> UnsafeArchive:
        return UnsafeArchive(f"{archive}: member {member.name!r} refused: {why}; nothing was extracted")

    path = PurePosixPath(member.name)
    if path.is_absolute():
        raise refused("absolute path")
    if ".." in path.parts:
        raise refused("'..' in its path")
    if member.issym() or member.islnk():
        if PurePosixPath(member.linkname).is_absolute():
            raise refused(f"link to the absolute path {member.linkname!r}")
        # A symlink resolves from its own directory, a hard link from the archive root.
        base = path.parent if member.issym() else PurePosixPath()
        if posixpath.normpath(base / member.linkname).split("/")[0] == "..":
            raise refused(f"link to {member.linkname!r} points outside the target directory")
    elif member.ischr() or member.isblk() or member.isfifo():
        raise refused("device file or fifo")
    elif not (member.isfile() or member.isdir()):
        raise refused(f"unsupported member type {member.type!r}")

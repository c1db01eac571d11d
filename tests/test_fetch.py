"""Resumable download and safe extraction against a real HTTP server on 127.0.0.1 (no network, no shared data)."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import time
from collections import namedtuple
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from voiceprint.data import fetch
from voiceprint.data.fetch import ChecksumMismatch, FetchError, NotEnoughSpace, UnsafeArchive


class FileServer:
    """Serves ``files`` (URL path -> bytes) with HTTP Range support; ``script[path]`` lists what the next
    requests for that path get instead of a normal answer: an HTTP status (int), ``("cut", n)`` (full headers,
    then only n bytes and the connection closes), ``"ignore_range"`` (200 with everything), ``("cut_ignoring_range",
    n)`` (both), ``("overlong", n)`` (200 with everything, Content-Length n bytes too large), ``("content_range",
    value)`` (206 from the asked offset, even 0, with this Content-Range header), ``("trickle", s)`` (one byte every
    s seconds) or ``("stall", s)`` (no answer for s seconds). ``requests`` records (path, Range header) of every request."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.script: dict[str, list] = {}
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                queue = server.script.get(self.path)
                action = queue.pop(0) if queue else None
                if isinstance(action, int):
                    return self.send_error(action)
                if isinstance(action, tuple) and action[0] == "stall":
                    time.sleep(action[1])
                    return self.send_error(503)
                if self.path not in server.files:
                    return self.send_error(404)
                data = server.files[self.path]
                kind = action[0] if isinstance(action, tuple) else action
                ignore_range = kind in ("ignore_range", "cut_ignoring_range", "overlong")
                start = int(rng[len("bytes="):].rstrip("-")) if rng and not ignore_range else 0
                if start >= len(data) and rng and not ignore_range:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                self.send_response(206 if start or kind == "content_range" else 200)
                if start or kind == "content_range":
                    self.send_header("Content-Range", action[1] if kind == "content_range"
                                     else f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start + (action[1] if kind == "overlong" else 0)))
                self.end_headers()
                body = data[start:]
                if kind in ("cut", "cut_ignoring_range"):
                    body = body[:action[1]]
                if kind == "trickle":
                    for i in range(len(body)):     # until the client hangs up (a write then fails)
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                        time.sleep(action[1])
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        class QuietServer(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass    # the client hanging up early (timeouts, refused downloads) is part of the tests

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.close()


PAYLOAD = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()
FAST = dict(backoff=0.001, progress=False)


def serve_payload(server):
    server.files["/a.bin"] = PAYLOAD
    return server.url + "/a.bin"


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir())


def test_clean_download_verifies_and_records_it(server, tmp_path):
    url = serve_payload(server)
    result = fetch.download(url, tmp_path / "a.bin", md5=PAYLOAD_MD5, **FAST)
    assert result == fetch.Fetched(tmp_path / "a.bin", len(PAYLOAD), len(PAYLOAD), False)
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD
    assert server.requests == [("/a.bin", None)]
    assert leftovers(tmp_path) == ["a.bin", "a.bin.verified.json"]
    stat = (tmp_path / "a.bin").stat()
    assert json.loads((tmp_path / "a.bin.verified.json").read_text()) == {
        "md5": PAYLOAD_MD5, "size": len(PAYLOAD), "mtime_ns": stat.st_mtime_ns}


def test_cut_connection_is_resumed_with_a_range_request(server, tmp_path):
    url = serve_payload(server)
    server.script["/a.bin"] = [("cut", 123_456)]
    result = fetch.download(url, tmp_path / "a.bin", md5=PAYLOAD_MD5, **FAST)
    assert server.requests == [("/a.bin", None), ("/a.bin", "bytes=123456-")]
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD
    assert result.downloaded_bytes == len(PAYLOAD) and not result.reused


def test_partial_file_from_an_earlier_run_is_resumed(server, tmp_path):
    url = serve_payload(server)
    fetch.part_path(tmp_path / "a.bin").write_bytes(PAYLOAD[:1000])
    result = fetch.download(url, tmp_path / "a.bin", md5=PAYLOAD_MD5, **FAST)
    assert server.requests == [("/a.bin", "bytes=1000-")]
    assert result.downloaded_bytes == len(PAYLOAD) - 1000
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD


def test_server_ignoring_range_restarts_the_file_cleanly(server, tmp_path):
    url = serve_payload(server)
    fetch.part_path(tmp_path / "a.bin").write_bytes(b"x" * 1000)     # appending to this would break the md5
    server.script["/a.bin"] = ["ignore_range"]
    result = fetch.download(url, tmp_path / "a.bin", md5=PAYLOAD_MD5, **FAST)
    assert server.requests == [("/a.bin", "bytes=1000-")]
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD and result.downloaded_bytes == len(PAYLOAD)


def test_416_on_a_complete_part_file_verifies_it_without_a_body(server, tmp_path):
    url = serve_payload(server)
    fetch.part_path(tmp_path / "a.bin").write_bytes(PAYLOAD)
    result = fetch.download(url, tmp_path / "a.bin", md5=PAYLOAD_MD5, **FAST)
    assert server.requests == [("/a.bin", f"bytes={len(PAYLOAD)}-")]
    assert result.downloaded_bytes == 0 and (tmp_path / "a.bin").read_bytes() == PAYLOAD


def test_416_on_a_part_file_longer_than_the_archive_restarts(server, tmp_path):
    url = serve_payload(server)
    fetch.part_path(tmp_path / "a.bin").write_bytes(PAYLOAD + b"junk")
    fetch.download(url, tmp_path / "a.bin", md5=PAYLOAD_MD5, **FAST)
    assert server.requests == [("/a.bin", f"bytes={len(PAYLOAD) + 4}-"), ("/a.bin", None)]
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD


def test_md5_mismatch_names_url_and_both_md5s_and_leaves_nothing(server, tmp_path):
    url = serve_payload(server)
    wrong = "0" * 32
    with pytest.raises(ChecksumMismatch) as err:
        fetch.download(url, tmp_path / "a.bin", md5=wrong, **FAST)
    assert str(err.value).startswith(f"{url}: md5 mismatch: expected {wrong}, got {PAYLOAD_MD5}")
    assert "downloads it again from the start" in str(err.value)
    assert leftovers(tmp_path) == []


def test_server_errors_are_retried_with_backoff(server, tmp_path, caplog):
    url = serve_payload(server)
    server.script["/a.bin"] = [500, 500]
    fetch.download(url, tmp_path / "a.bin", md5=PAYLOAD_MD5, **FAST)
    assert len(server.requests) == 3 and (tmp_path / "a.bin").read_bytes() == PAYLOAD
    assert caplog.text.count("HTTP 500") == 2


def test_timeouts_are_retried(server, tmp_path):
    url = serve_payload(server)
    server.script["/a.bin"] = [("stall", 1.0)]
    fetch.download(url, tmp_path / "a.bin", md5=PAYLOAD_MD5, timeout=0.2, **FAST)
    assert len(server.requests) == 2 and (tmp_path / "a.bin").read_bytes() == PAYLOAD


def test_retries_are_bounded_and_progress_resets_the_count(server, tmp_path):
    url = serve_payload(server)
    server.script["/a.bin"] = [("cut", 1000)] + [503] * 10
    with pytest.raises(FetchError) as err:
        fetch.download(url, tmp_path / "a.bin", md5=PAYLOAD_MD5, retries=2, **FAST)
    part = fetch.part_path(tmp_path / "a.bin")
    assert str(err.value) == (f"{url}: giving up after 3 attempts without progress; last error: HTTP 503 Service "
                              f"Unavailable; the partial download {part} (1000 bytes) is kept and the next run "
                              "resumes it")
    assert len(server.requests) == 4 and part.stat().st_size == 1000


@pytest.mark.parametrize("action", [("cut_ignoring_range", 1000), ("overlong", 100)])
def test_retries_are_bounded_when_the_file_restarts_without_growing(server, tmp_path, action):
    # Each attempt receives bytes, but the part file starts over and never gets past its best length before.
    url = serve_payload(server)
    server.script["/a.bin"] = [action] * 20
    with pytest.raises(FetchError, match=rf"^{url}: giving up after 3 attempts without progress"):
        fetch.download(url, tmp_path / "a.bin", md5=PAYLOAD_MD5, retries=2, **FAST)
    assert len(server.requests) == 4


def test_206_with_the_wrong_content_range_restarts_cleanly(server, tmp_path, caplog):
    url = serve_payload(server)
    server.script["/a.bin"] = [("content_range", "bytes 5-299999/300000")]    # to a request without Range
    fetch.download(url, tmp_path / "a.bin", md5=PAYLOAD_MD5, **FAST)
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD and len(server.requests) == 2
    assert "Content-Range 'bytes 5-299999/300000'" in caplog.text


def test_206_with_the_wrong_content_range_every_time_fails_naming_the_url(server, tmp_path):
    url = serve_payload(server)
    fetch.part_path(tmp_path / "a.bin").write_bytes(PAYLOAD[:1000])
    server.script["/a.bin"] = [("content_range", "bytes 0-9/10")] * 10
    with pytest.raises(FetchError, match=rf"^{url}: giving up after 3 attempts .*Content-Range 'bytes 0-9/10'"):
        fetch.download(url, tmp_path / "a.bin", md5=PAYLOAD_MD5, retries=2, **FAST)
    assert len(server.requests) == 3


def test_a_trickling_server_is_given_up_on(server, tmp_path, capsys):
    # Each byte comes well within the socket timeout, so only a minimum rate can tell the line is useless.
    url = serve_payload(server)
    server.script["/a.bin"] = [("trickle", 0.02)] * 5
    started = time.monotonic()
    with pytest.raises(FetchError, match=rf"^{url}: giving up after 2 attempts without progress; last error: "
                                         r"under 1000 bytes/s for [0-9.]+ s"):
        fetch.download(url, tmp_path / "a.bin", md5=PAYLOAD_MD5, retries=1, min_rate=1000, rate_window=0.3,
                       **FAST)
    assert time.monotonic() - started < 5 and len(server.requests) == 2


@pytest.mark.parametrize("status", [404, 403])
def test_client_errors_fail_at_once_naming_the_url(server, tmp_path, status):
    url = serve_payload(server)
    server.script["/a.bin"] = [status]
    with pytest.raises(FetchError, match=rf"^{url}: HTTP {status} .*not retrying"):
        fetch.download(url, tmp_path / "a.bin", md5=PAYLOAD_MD5, **FAST)
    assert len(server.requests) == 1 and leftovers(tmp_path) == []


def test_verified_file_is_not_fetched_again(server, tmp_path):
    url = serve_payload(server)
    fetch.download(url, tmp_path / "a.bin", md5=PAYLOAD_MD5, **FAST)
    server.requests.clear()
    again = fetch.download(url, tmp_path / "a.bin", md5=PAYLOAD_MD5, **FAST)
    assert again == fetch.Fetched(tmp_path / "a.bin", len(PAYLOAD), 0, True)
    # A file without a valid record (copied in by hand, or touched) is hashed once, never fetched.
    (tmp_path / "a.bin.verified.json").unlink()
    assert fetch.download(url, tmp_path / "a.bin", md5=PAYLOAD_MD5, **FAST).reused
    assert (tmp_path / "a.bin.verified.json").exists()
    assert server.requests == []


def test_present_file_with_the_wrong_md5_is_an_error_not_a_download(server, tmp_path):
    url = serve_payload(server)
    (tmp_path / "a.bin").write_bytes(b"not it")
    with pytest.raises(ChecksumMismatch, match=rf"a.bin: already present but its md5 is "
                                               rf"{hashlib.md5(b'not it').hexdigest()}, expected {PAYLOAD_MD5}"):
        fetch.download(url, tmp_path / "a.bin", md5=PAYLOAD_MD5, **FAST)
    assert server.requests == []


Usage = namedtuple("Usage", "total used free")


def test_disk_space_is_checked_before_the_body_is_read(server, tmp_path, monkeypatch):
    url = serve_payload(server)
    monkeypatch.setattr(fetch.shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(NotEnoughSpace) as err:
        fetch.download(url, tmp_path / "dl" / "a.bin", md5=PAYLOAD_MD5,
                       also_needed=[(tmp_path / "raw", 900_000, "extracting a")], **FAST)
    message = str(err.value)
    assert message.startswith(f"not enough disk space: 1.1 MiB needed on the filesystem of {tmp_path / 'dl'} (")
    assert f"downloading a.bin: 0.3 MiB in {tmp_path / 'dl'}" in message
    assert f"extracting a: 0.9 MiB in {tmp_path / 'raw'}" in message and message.endswith("1.0 MiB available")
    assert not fetch.part_path(tmp_path / "dl" / "a.bin").exists() and not (tmp_path / "dl" / "a.bin").exists()


def test_disk_check_adds_needs_only_on_the_same_filesystem(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch.shutil, "disk_usage", lambda path: Usage(100, 0, 100))
    fetch.check_free_space([(tmp_path / "a", 60, "a"), (tmp_path, 40, "b")])
    with pytest.raises(NotEnoughSpace):
        fetch.check_free_space([(tmp_path / "a", 60, "a"), (tmp_path, 41, "b")])


# --- extraction ---------------------------------------------------------------------------------------------

def make_tar(path, members):
    """members: (name, kind, payload-or-linkname) with kind file | dir | symlink | hardlink | fifo | chardev."""
    types = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE,
             "chardev": tarfile.CHRTYPE, "dir": tarfile.DIRTYPE}
    with tarfile.open(path, "w:gz") as tar:
        for name, kind, value in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
                continue
            info.type = types[kind]
            if kind in ("symlink", "hardlink"):
                info.linkname = value
            tar.addfile(info)
    return path


GOOD = [("top/", "dir", None), ("top/a.txt", "file", b"alpha"), ("top/sub/b.txt", "file", b"beta"),
        ("top/link", "symlink", "sub/b.txt")]


def test_extracts_into_place(tmp_path):
    archive = make_tar(tmp_path / "good.tar.gz", GOOD)
    assert fetch.extract_tar(archive, tmp_path / "out") == 2
    assert (tmp_path / "out/top/a.txt").read_bytes() == b"alpha"
    assert (tmp_path / "out/top/link").read_bytes() == b"beta" and (tmp_path / "out/top/link").is_symlink()
    assert leftovers(tmp_path) == ["good.tar.gz", "out"]


@pytest.mark.parametrize("member, why", [
    (("../evil.txt", "file", b"x"), "'..' in its path"),
    (("top/../../evil.txt", "file", b"x"), "'..' in its path"),
    (("/tmp/evil.txt", "file", b"x"), "absolute path"),
    (("top/escape", "symlink", "../../evil.txt"), "link to '../../evil.txt' points outside the target directory"),
    (("top/passwd", "symlink", "/etc/passwd"), "link to the absolute path '/etc/passwd'"),
    (("top/hard", "hardlink", "../evil.txt"), "link to '../evil.txt' points outside the target directory"),
    (("top/pipe", "fifo", None), "device file or fifo"),
    (("top/tty", "chardev", None), "device file or fifo"),
])
def test_unsafe_members_are_refused_and_nothing_is_written(tmp_path, member, why):
    work = tmp_path / "work"
    work.mkdir()
    archive = make_tar(work / "bad.tar.gz", GOOD + [member])      # good members first: they must vanish too
    with pytest.raises(UnsafeArchive) as err:
        fetch.extract_tar(archive, work / "out")
    assert str(err.value) == f"{archive}: member {member[0]!r} refused: {why}; nothing was extracted"
    assert leftovers(work) == ["bad.tar.gz"]
    assert leftovers(tmp_path) == ["work"]


def test_decompression_bomb_is_refused_unless_pinned(tmp_path):
    archive = make_tar(tmp_path / "bomb.tar.gz", [("top/zeros", "file", bytes(5_000_000))])   # ~5 KB packed
    with pytest.raises(UnsafeArchive, match=r"member 'top/zeros' refused: the archive would expand to over 100 "
                                            r"times its size"):
        fetch.extract_tar(archive, tmp_path / "out")
    assert leftovers(tmp_path) == ["bomb.tar.gz"]
    assert fetch.extract_tar(archive, tmp_path / "out", max_ratio=None) == 1     # an md5-pinned archive


def test_extraction_checks_disk_space_member_by_member(tmp_path, monkeypatch):
    archive = make_tar(tmp_path / "good.tar.gz", GOOD + [("top/big", "file", PAYLOAD)])
    monkeypatch.setattr(fetch.shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 100_000, 100_000))
    with pytest.raises(NotEnoughSpace, match=r"not enough disk space: .*extracting top/big"):
        fetch.extract_tar(archive, tmp_path / "out")
    assert leftovers(tmp_path) == ["good.tar.gz"]


def test_damaged_archive_is_a_clear_error(tmp_path):
    archive = make_tar(tmp_path / "good.tar.gz", GOOD + [("top/big", "file", PAYLOAD)])
    data = archive.read_bytes()
    archive.write_bytes(data[:len(data) // 2])
    with pytest.raises(FetchError, match=r"good.tar.gz: damaged or not a tar archive: .*nothing was extracted"):
        fetch.extract_tar(archive, tmp_path / "out")
    assert leftovers(tmp_path) == ["good.tar.gz"]


def test_refuses_to_extract_over_an_existing_directory(tmp_path):
    archive = make_tar(tmp_path / "good.tar.gz", GOOD)
    (tmp_path / "out").mkdir()
    with pytest.raises(FetchError, match="out: already exists"):
        fetch.extract_tar(archive, tmp_path / "out")


def test_downloads_dir_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(fetch.DOWNLOADS_ENV, raising=False)
    assert fetch.downloads_dir() == fetch.DEFAULT_DOWNLOADS
    monkeypatch.setenv(fetch.DOWNLOADS_ENV, str(tmp_path))
    assert fetch.downloads_dir() == tmp_path


def test_symlink_chain_past_path_max_cannot_escape(tmp_path):
    """CVE-2025-4517: links nested deeper than PATH_MAX stop os.path.realpath (and so the ``data`` filter) from
    resolving them; a link then climbs out of the target, and members written through it land outside."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "flag").write_text("outside")     # beside the extraction directory, which is work/.out.extracting-*
    steps = "abcdefghijklmnop"
    # As long as fits: the unresolved path stays under PATH_MAX, the resolved one overflows it.
    dest_len = len(str(work / ".out.extracting-xxxxxxxx")) + 1
    component = "d" * min(247, (4096 - dest_len) // (len(steps) + 1))
    members, path = [], ""
    for step in steps:
        members += [(f"{path}{component}", "dir", None), (f"{path}{step}", "symlink", component)]
        path += component + "/"
    climb = "/".join(steps) + "/" + "l" * 254
    members += [(climb, "symlink", "/".join([".."] * len(steps))),
                ("escape", "symlink", climb + "/.."),          # lexically inside, really the target's parent
                ("flaglink", "hardlink", "escape/flag"), ("flaglink", "file", b"overwritten"),
                ("escape/newfile", "file", b"new")]
    archive = make_tar(tmp_path / "chain.tar", members)
    with pytest.raises(UnsafeArchive, match="nothing was extracted"):
        fetch.extract_tar(archive, work / "out")
    assert (work / "flag").read_text() == "outside" and leftovers(work) == ["flag"]


@pytest.mark.parametrize("members, why", [
    ([("top/", "dir", None), ("a", "symlink", "top"), ("a/f", "file", b"x")], "passes through the link 'a'"),
    ([("top/", "dir", None), ("up", "symlink", "top/../x")], "'..' after a name"),
    ([("f", "file", b"x"), ("s", "symlink", "f"), ("h", "hardlink", "s")], "not a file extracted earlier"),
])
def test_links_are_refused_when_the_tree_could_resolve_them_elsewhere(tmp_path, members, why):
    archive = make_tar(tmp_path / "bad.tar.gz", members)
    with pytest.raises(UnsafeArchive, match=why):
        fetch.extract_tar(archive, tmp_path / "out")
    assert leftovers(tmp_path) == ["bad.tar.gz"]

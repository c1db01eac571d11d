"""LibriSpeech source end to end against a local HTTP mirror serving archives built from ../shared librispeech-mini
(two or three speakers per archive, so the whole file runs in seconds)."""
from __future__ import annotations

import hashlib
import json
import tarfile

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import yaml

from tests.conftest import REPO, SHARED
from tests.test_fetch import FileServer, Usage
from voiceprint.data import fetch
from voiceprint.data.corpus import MANIFEST_COLUMNS, librispeech
from voiceprint.data.corpus.librispeech import Archive
from voiceprint.core.params import ParamsError

# Archive name -> speakers of librispeech-mini's test-other/ packed under LibriSpeech/<archive name>/.
CONTENTS = {"dev-clean": ("367", "533"), "test-other": ("1688",)}


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    source = SHARED / "data/librispeech-mini/LibriSpeech"
    # Module-scoped fixtures run before the shared_dir skip in `mirror`, so absence is tolerated here.
    if not source.is_dir():
        return None
    out = tmp_path_factory.mktemp("mirror")
    built = {}
    for subset, speakers in CONTENTS.items():
        path = out / f"{subset}.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            for name in ("LICENSE.TXT", "SPEAKERS.TXT"):
                tar.add(source / name, arcname=f"LibriSpeech/{name}")
            for speaker in speakers:
                tar.add(source / "test-other" / speaker, arcname=f"LibriSpeech/{subset}/{speaker}")
        built[subset] = path.read_bytes()
    return built


@pytest.fixture
def mirror(shared_dir, archives, monkeypatch):
    """A local mirror serving the test archives, with the md5/size table pointed at them."""
    if archives is None:
        pytest.skip(f"{SHARED}/data/librispeech-mini not present")
    server = FileServer()
    for subset, data in archives.items():
        server.files[f"/slr12/{subset}.tar.gz"] = data
        monkeypatch.setitem(librispeech.SUBSETS, subset, Archive(hashlib.md5(data).hexdigest(), len(data)))
    yield server
    server.close()


FAST = dict(progress=False, backoff=0.001)


def test_clean_download_extracts_and_lists_every_utterance(mirror, archives, tmp_path):
    raw, downloads = tmp_path / "raw", tmp_path / "dl"
    manifest, fetched = librispeech.prepare(raw, ["test-other", "dev-clean"], mirror=mirror.url + "/slr12/",
                                            downloads=downloads, **FAST)
    assert sorted(mirror.requests) == [("/slr12/dev-clean.tar.gz", None), ("/slr12/test-other.tar.gz", None)]
    assert {s: (f.downloaded_bytes, f.reused) for s, f in fetched.items()} == {
        s: (len(data), False) for s, data in archives.items()}
    assert list(manifest.columns) == MANIFEST_COLUMNS and len(manifest) == 30
    assert manifest.path.is_monotonic_increasing
    assert manifest.groupby("speaker").size().to_dict() == {"1688": 10, "367": 10, "533": 10}
    first = manifest.iloc[0]
    assert (first.path, first.speaker, first.utterance, first.duration, first.sample_rate) == (
        "LibriSpeech/dev-clean/367/130732/367-130732-0000.flac", "367", "367-130732-0000", 2.365, 16000)
    assert manifest.set_index("utterance").loc["1688-142285-0000", "duration"] == 15.0
    assert all((raw / p).is_file() for p in manifest.path)
    # Both archives' trees merged under one LibriSpeech/, the corpus licence kept, no staging left behind.
    assert sorted(p.name for p in raw.iterdir()) == ["LibriSpeech"]
    assert sorted(p.name for p in (raw / "LibriSpeech").iterdir()) == [
        "LICENSE.TXT", "SPEAKERS.TXT", "dev-clean", "test-other"]
    assert sorted(p.name for p in downloads.iterdir()) == [
        "dev-clean.tar.gz", "dev-clean.tar.gz.verified.json", "test-other.tar.gz", "test-other.tar.gz.verified.json"]


def test_verified_archive_is_reused_and_the_manifest_is_byte_identical(mirror, tmp_path):
    outputs = []
    for run in ("first", "second"):
        manifest, fetched = librispeech.prepare(tmp_path / run, ["dev-clean"], mirror=mirror.url + "/slr12",
                                                downloads=tmp_path / "dl", **FAST)
        manifest.to_csv(tmp_path / f"{run}.csv", index=False, lineterminator="\n")
        outputs.append((tmp_path / f"{run}.csv").read_bytes())
    assert fetched["dev-clean"].reused and fetched["dev-clean"].downloaded_bytes == 0
    assert len(mirror.requests) == 1        # the second run asked the server nothing
    assert outputs[0] == outputs[1]


def test_cut_download_resumes_and_verifies(mirror, archives, tmp_path):
    cut = len(archives["dev-clean"]) // 2
    mirror.script["/slr12/dev-clean.tar.gz"] = [("cut", cut)]
    manifest, fetched = librispeech.prepare(tmp_path / "raw", ["dev-clean"], mirror=mirror.url + "/slr12",
                                            downloads=tmp_path / "dl", **FAST)
    assert mirror.requests == [("/slr12/dev-clean.tar.gz", None), ("/slr12/dev-clean.tar.gz", f"bytes={cut}-")]
    assert fetch.md5_of(tmp_path / "dl/dev-clean.tar.gz") == librispeech.SUBSETS["dev-clean"].md5
    assert len(manifest) == 20


def test_corrupted_archive_is_refused_and_nothing_is_extracted(mirror, archives, tmp_path):
    data = bytearray(archives["dev-clean"])
    data[len(data) // 2] ^= 0xFF
    mirror.files["/slr12/dev-clean.tar.gz"] = bytes(data)
    url = mirror.url + "/slr12/dev-clean.tar.gz"
    with pytest.raises(fetch.ChecksumMismatch) as err:
        librispeech.prepare(tmp_path / "raw", ["dev-clean"], mirror=mirror.url + "/slr12",
                            downloads=tmp_path / "dl", **FAST)
    assert str(err.value).startswith(f"{url}: md5 mismatch: expected {librispeech.SUBSETS['dev-clean'].md5}, "
                                     f"got {hashlib.md5(data).hexdigest()}")
    assert not (tmp_path / "raw").exists()
    assert list((tmp_path / "dl").iterdir()) == []


def test_missing_archive_fails_at_once(mirror, tmp_path):
    with pytest.raises(fetch.FetchError, match=r"/wrong/dev-clean.tar.gz: HTTP 404 .*not retrying"):
        librispeech.prepare(tmp_path / "raw", ["dev-clean"], mirror=mirror.url + "/wrong",
                            downloads=tmp_path / "dl", **FAST)
    assert len(mirror.requests) == 1


def test_disk_space_for_all_subsets_is_checked_before_any_request(mirror, archives, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch.shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - 10**6, 10**6))
    with pytest.raises(fetch.NotEnoughSpace) as err:
        librispeech.prepare(tmp_path / "raw", ["dev-clean", "test-other"], mirror=mirror.url + "/slr12",
                            downloads=tmp_path / "dl", **FAST)
    message = str(err.value)
    for subset in CONTENTS:
        assert f"extracting {subset}: " in message and f"downloading {subset}.tar.gz: " in message
    assert message.endswith("1.0 MiB available") and mirror.requests == []


# --- the stage ---------------------------------------------------------------------------------------------

def stage_dir(tmp_path, monkeypatch, **data):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(source="librispeech", **data)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(fetch.DOWNLOADS_ENV, str(tmp_path / "downloads"))


def test_stage_writes_manifest_and_metrics_and_reuses_the_archive(mirror, archives, tmp_path, monkeypatch):
    from stages import download

    stage_dir(tmp_path, monkeypatch, subsets=["dev-clean"], mirror=mirror.url + "/slr12")
    download.main()
    manifest_bytes = (tmp_path / "data/raw/manifest.csv").read_bytes()
    manifest = pd.read_csv(tmp_path / "data/raw/manifest.csv", dtype={"speaker": str})
    assert list(manifest.columns) == MANIFEST_COLUMNS and len(manifest) == 20
    assert manifest_bytes.splitlines()[1] == (
        b"LibriSpeech/dev-clean/367/130732/367-130732-0000.flac,367,367-130732-0000,2.365,16000")
    metrics = json.loads((tmp_path / "metrics/download.json").read_text())
    size = len(archives["dev-clean"])
    assert {k: metrics[k] for k in ("utterances", "speakers", "downloaded_bytes", "reused_bytes")} == {
        "utterances": 20, "speakers": 2, "downloaded_bytes": size, "reused_bytes": 0}
    assert metrics["hours"] == round(manifest.duration.sum() / 3600, 4) > 0
    assert metrics["subsets"]["dev-clean"] == {
        "utterances": 20, "speakers": 2, "hours": metrics["hours"], "downloaded_bytes": size, "reused_bytes": 0}
    assert (tmp_path / "downloads/dev-clean.tar.gz").is_file()

    download.main()         # again: archive reused, same bytes out
    assert len(mirror.requests) == 1
    assert (tmp_path / "data/raw/manifest.csv").read_bytes() == manifest_bytes
    metrics = json.loads((tmp_path / "metrics/download.json").read_text())
    assert (metrics["downloaded_bytes"], metrics["reused_bytes"]) == (0, size)


def test_stage_leaves_no_half_written_output_on_a_bad_archive(mirror, archives, tmp_path, monkeypatch):
    from stages import download

    mirror.files["/slr12/dev-clean.tar.gz"] = archives["dev-clean"][:-10] + b"0123456789"
    stage_dir(tmp_path, monkeypatch, subsets=["dev-clean"], mirror=mirror.url + "/slr12")
    with pytest.raises(fetch.ChecksumMismatch):
        download.main()
    assert list((tmp_path / "data").iterdir()) == []        # no data/raw, no temporary directory
    assert list((tmp_path / "downloads").iterdir()) == []   # no archive, no .part
    assert not (tmp_path / "metrics").exists()


@pytest.mark.parametrize("data, message", [
    ({"subsets": ["dev-clean", "dev-cleen"]}, "data.subsets: unknown value(s) ['dev-cleen']; valid: dev-clean, "),
    ({"subsets": []}, "data.subsets: expected a non-empty list of LibriSpeech subsets, got []"),
    ({"subsets": ["test-clean", "test-clean"]}, "data.subsets: ['test-clean'] listed more than once"),
    ({"subsets": "dev-clean"}, "data.subsets: expected a list of strings, got 'dev-clean'"),
    ({"mirror": "ftp://example.org/slr12"}, "data.mirror: expected an http(s) base URL such as "
                                            "https://www.openslr.org/resources/12, got 'ftp://example.org/slr12'"),
])
def test_stage_rejects_bad_params_naming_the_key(tmp_path, monkeypatch, data, message):
    from stages import download

    stage_dir(tmp_path, monkeypatch, **data)
    with pytest.raises((ParamsError, ValueError)) as err:
        download.main()
    assert message in str(err.value)
    assert not (tmp_path / "data").exists() or list((tmp_path / "data").iterdir()) == []


def test_manifest_lists_unreadable_files_without_duration(tmp_path):
    base = tmp_path / "LibriSpeech/dev-clean/84/121123"
    base.mkdir(parents=True)
    sf.write(base / "84-121123-0001.flac", np.zeros(8000, dtype=np.float32), 16000)
    (base / "84-121123-0000.flac").write_bytes(b"fLaC but truncated")
    manifest = librispeech.build_manifest(tmp_path, ["dev-clean"])
    manifest.to_csv(tmp_path / "manifest.csv", index=False, lineterminator="\n")
    assert (tmp_path / "manifest.csv").read_text().splitlines() == [
        "path,speaker,utterance,duration,sample_rate",
        "LibriSpeech/dev-clean/84/121123/84-121123-0000.flac,84,84-121123-0000,,",
        "LibriSpeech/dev-clean/84/121123/84-121123-0001.flac,84,84-121123-0001,0.5,16000"]


@pytest.mark.parametrize("where", ["84/84-121123-0000.flac", "84/121123/85-121123-0000.flac"])
def test_manifest_refuses_files_outside_the_librispeech_layout(tmp_path, where):
    path = tmp_path / "LibriSpeech/dev-clean" / where
    path.parent.mkdir(parents=True)
    sf.write(path, np.zeros(160, dtype=np.float32), 16000)
    with pytest.raises(ValueError, match=rf"^LibriSpeech/dev-clean/{where}: not in the LibriSpeech layout"):
        librispeech.build_manifest(tmp_path, ["dev-clean"])


def test_archive_table_is_complete():
    # Published md5s (OpenSLR md5sum.txt) and final-release sizes of all seven subsets, pinned here so an edit
    # to the table is seen.
    assert {s: (a.md5, a.size) for s, a in librispeech.SUBSETS.items()} == {
        "dev-clean": ("42e2234ba48799c1f50f24a7926300a1", 337926286),
        "dev-other": ("c8d0bcc9cca99d4f8b62fcc847357931", 314305928),
        "test-clean": ("32fa31d27d2e1cad72775fee3f4849a9", 346663984),
        "test-other": ("fb5a50374b501bb3bac4815ee91d3135", 328757843),
        "train-clean-100": ("2a93770f6d5c6c964bc36631d331a522", 6387309499),
        "train-clean-360": ("c0e676e450a7ff2f54aeade5171606fa", 23049477885),
        "train-other-500": ("d1a0fd59409feb2c614ce4d30c387708", 30593501606),
    }
    assert librispeech.archive_url("https://example.org/slr12/", "dev-clean") == (
        "https://example.org/slr12/dev-clean.tar.gz")

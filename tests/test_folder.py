"""Tests for voiceprint.data.corpus.folder.scan: folders and CSV manifests in, manifest + rejected list out."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from tests.conftest import REPO
from voiceprint.data.corpus import MANIFEST_COLUMNS
from voiceprint.data.corpus import folder as folder_module
from voiceprint.data.corpus.folder import FOLDER_MANIFEST_COLUMNS, REJECT_REASONS, REJECTED_COLUMNS, scan
from voiceprint.features import featurize_many


def _tone(path: Path, seconds: float = 0.5, sr: int = 16000, freq: float = 440.0, channels: int = 1, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    x = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    sf.write(str(path), np.stack([x] * channels, axis=1) if channels > 1 else x, sr, **kw)
    return path


def _reasons(rejected: pd.DataFrame) -> dict[str, str]:
    return dict(zip(rejected.path, rejected.reason))


# --- LibriSpeech layout and a CSV manifest on the shared corpora ----------------------------------------------


def test_scan_librispeech_layout(shared_dir):
    root = shared_dir / "data" / "librispeech-mini"
    manifest, rejected = scan(root)
    assert list(manifest.columns) == FOLDER_MANIFEST_COLUMNS == MANIFEST_COLUMNS + ["sha1", "bytes"]
    assert len(manifest) == 220 and manifest.speaker.nunique() == 13
    counts = manifest.groupby("speaker").size()
    assert counts.to_dict() == {s: (40 if s in {"19", "26", "27"} else 10) for s in counts.index}
    # LibriSpeech ids: speaker = first field of the file stem, utterance = the stem
    assert (manifest.utterance.str.split("-").str[0] == manifest.speaker).all()
    assert (manifest.utterance == manifest.path.map(lambda p: Path(p).stem)).all()
    assert manifest.utterance.is_unique and manifest.path.map(os.path.isabs).all()
    assert list(manifest.path) == sorted(manifest.path)
    assert set(manifest.sample_rate) == {16000}
    first = manifest.iloc[0]
    assert first.sha1 == hashlib.sha1(Path(first.path).read_bytes()).hexdigest()
    assert first.bytes == Path(first.path).stat().st_size
    assert first.duration == pytest.approx(sf.info(first.path).duration)
    # the transcripts and READMEs are listed, not skipped
    all_files = sorted(str(p) for p in root.rglob("*") if p.is_file())
    assert sorted(list(manifest.path) + list(rejected.path)) == all_files
    assert set(rejected.reason) == {"not_audio"} and rejected.path.str.endswith(".trans.txt").sum() == 6
    trans = rejected[rejected.path.str.endswith("26-496.trans.txt")].iloc[0]
    assert trans.speaker == "26" and "not an audio type" in trans.message
    again = scan(root)
    pd.testing.assert_frame_equal(again[0], manifest)
    pd.testing.assert_frame_equal(again[1], rejected)


def test_scan_csv_manifest_of_fsdd_and_featurize_a_sample(shared_dir, tmp_path):
    recordings = sorted((shared_dir / "data" / "fsdd" / "recordings").glob("*.wav"))
    rows = [{"path": str(p), "speaker": p.stem.split("_")[1]} for p in recordings]  # <digit>_<speaker>_<n>.wav
    csv = tmp_path / "fsdd.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    manifest, rejected = scan(csv)
    assert rejected.empty
    assert len(manifest) == 3000
    assert manifest.groupby("speaker").size().to_dict() == {
        s: 500 for s in ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")}
    assert set(manifest.sample_rate) == {8000} and manifest.utterance.is_unique
    # ids: speaker + path relative to the CSV's folder (here outside it), no extension
    assert manifest.utterance.iloc[0].startswith("george/../") and not manifest.utterance.iloc[0].endswith(".wav")

    sample = manifest.groupby("speaker").head(2)
    results = list(featurize_many(sample.path, "fbank_norm", workers=1, progress=False))
    assert [r[3] for r in results] == [None] * len(sample)
    for (_, feats, base, _, _), seconds in zip(results, sample.duration):
        # resampled to 16 kHz: the trimmed signal has at most 16000 * duration samples -> 100 frames per second
        assert feats.shape[1] == 64 and 2 <= feats.shape[0] <= int(seconds * 100) + 1
        assert base.shape == (40,)


# --- generic folders ------------------------------------------------------------------------------------------


def test_scan_speaker_folders_lists_every_file_with_a_reason(tmp_path, monkeypatch):
    root = tmp_path / "corpus"
    kept_wav = _tone(root / "alice" / "day1" / "a.wav")
    _tone(root / "alice" / "day1" / "a.flac", freq=300)       # same stem, other content: ids keep extensions
    _tone(root / "alice" / "b.ogg", sr=44100, channels=2, format="OGG", subtype="VORBIS")
    _tone(root / "bob" / "x.mp3", sr=22050, format="MP3")
    _tone(root / "bob" / "y.wav", sr=8000, subtype="FLOAT")
    copy = root / "bob" / "copy_of_a.wav"
    copy.write_bytes(kept_wav.read_bytes())                   # duplicate of alice/day1/a.wav
    (root / "bob" / "notes.txt").write_text("hello")
    (root / "bob" / "empty.wav").write_bytes(b"")
    (root / "bob" / "corrupt.flac").write_bytes(b"fLaC not really")
    (root / "README.md").write_text("about")
    _tone(root / "stray.wav")                                 # audio outside a speaker folder
    locked = _tone(root / "carol" / "locked.wav", freq=500)
    real_open = open

    def deny(path, *args, **kwargs):
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(folder_module, "open", deny, raising=False)
    manifest, rejected = scan(root)

    assert list(manifest.path) == [str(root / p) for p in
                                   ("alice/b.ogg", "alice/day1/a.flac", "alice/day1/a.wav", "bob/x.mp3", "bob/y.wav")]
    assert list(manifest.utterance) == ["alice/b", "alice/day1/a.flac", "alice/day1/a.wav", "bob/x", "bob/y"]
    assert list(manifest.speaker) == ["alice", "alice", "alice", "bob", "bob"]
    assert list(manifest.sample_rate) == [44100, 16000, 16000, 22050, 8000]
    np.testing.assert_allclose(manifest.duration, 0.5, atol=0.06)  # mp3 headers may pad a frame
    assert list(rejected.columns) == REJECTED_COLUMNS and set(rejected.reason) <= set(REJECT_REASONS)
    assert _reasons(rejected) == {
        str(root / "README.md"): "not_audio",
        str(root / "bob" / "copy_of_a.wav"): "duplicate",
        str(root / "bob" / "corrupt.flac"): "unreadable",
        str(root / "bob" / "empty.wav"): "empty",
        str(root / "bob" / "notes.txt"): "not_audio",
        str(root / "carol" / "locked.wav"): "permission_denied",
        str(root / "stray.wav"): "no_speaker",
    }
    duplicate = rejected.set_index("path").loc[str(copy)]
    assert duplicate.speaker == "bob" and str(kept_wav) in duplicate.message and "alice" in duplicate.message
    assert rejected.set_index("path").loc[str(root / "bob" / "notes.txt")].speaker == "bob"


def test_non_utf8_file_names_are_listed_with_escapes_not_fatal(tmp_path):
    ok = _tone(tmp_path / "spk" / "ok.wav")
    bad = os.fsencode(tmp_path / "spk") + b"/caf\xe9.wav"            # Latin-1 on a UTF-8 system
    with open(bad, "wb") as fh:
        fh.write(_tone(tmp_path / "other.wav", freq=300).read_bytes())
    os.remove(tmp_path / "other.wav")
    os.mkdir(os.fsencode(tmp_path) + b"/sp\xffk")                     # a speaker folder with such a name
    with open(os.fsencode(tmp_path) + b"/sp\xffk/u.wav", "wb") as fh:
        fh.write(b"RIFF")
    manifest, rejected = scan(tmp_path)
    assert list(manifest.path) == [str(ok)]
    assert _reasons(rejected) == {f"{tmp_path}/spk/caf\\xe9.wav": "bad_filename",
                                  f"{tmp_path}/sp\\xffk/u.wav": "bad_filename"}
    assert "not valid UTF-8" in rejected.message[0] and "bad_filename" in REJECT_REASONS
    rejected.to_csv(tmp_path / "rejected.csv", index=False)           # what failed the download stage
    assert "caf\\xe9.wav,spk,bad_filename" in (tmp_path / "rejected.csv").read_text(encoding="utf-8")


def test_fifo_and_link_to_a_device_are_rejected_without_hanging(tmp_path):
    _tone(tmp_path / "spk" / "ok.wav")
    os.mkfifo(tmp_path / "spk" / "pipe.wav")              # open() would wait for a writer forever
    os.symlink("/dev/zero", tmp_path / "spk" / "zero.wav")  # reading would never end
    code = ("import json, sys; from voiceprint.data.corpus.folder import scan; "
            "print(json.dumps(dict(zip(*scan(sys.argv[1])[1][['path', 'reason']].values.T))))")
    # A subprocess with a timeout: the bug is a hang, and a hung test must still end.
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {str(tmp_path / "spk" / "pipe.wav"): "not_a_file",
                                       str(tmp_path / "spk" / "zero.wav"): "not_a_file"}


def test_changed_file_changes_the_manifest(tmp_path):
    path = _tone(tmp_path / "spk" / "u.wav")
    before, _ = scan(tmp_path)
    _tone(path, freq=450)
    after, _ = scan(tmp_path)
    assert before.sha1[0] != after.sha1[0]
    assert before.drop(columns="sha1").equals(after.drop(columns="sha1"))  # same length: only the hash tells


def test_linked_folder_loop_is_reported_once(tmp_path):
    _tone(tmp_path / "spk" / "u.wav")
    os.symlink(tmp_path / "spk", tmp_path / "spk" / "again")
    manifest, rejected = scan(tmp_path)
    assert list(manifest.utterance) == ["spk/u"]
    assert _reasons(rejected) == {str(tmp_path / "spk" / "again"): "duplicate"}


def test_librispeech_layout_without_the_top_folder(tmp_path):
    _tone(tmp_path / "dev-clean" / "84" / "121123" / "84-121123-0000.flac", format="FLAC")
    _tone(tmp_path / "dev-clean" / "84" / "stray.flac", freq=300, format="FLAC")   # not in a chapter folder
    manifest, rejected = scan(tmp_path)
    assert list(zip(manifest.speaker, manifest.utterance)) == [("84", "84-121123-0000")]
    assert _reasons(rejected) == {str(tmp_path / "dev-clean" / "84" / "stray.flac"): "no_speaker"}


def test_empty_folder_gives_empty_tables(tmp_path):
    manifest, rejected = scan(tmp_path)
    assert manifest.empty and list(manifest.columns) == FOLDER_MANIFEST_COLUMNS
    assert rejected.empty and list(rejected.columns) == REJECTED_COLUMNS


# --- CSV manifests ---------------------------------------------------------------------------------------------


def test_csv_rows_each_end_in_manifest_or_rejected(tmp_path):
    audio = tmp_path / "audio"
    a = _tone(audio / "a.wav")
    b = _tone(audio / "sub" / "b.wav", freq=300)
    outside = _tone(tmp_path / "elsewhere" / "c.flac", freq=200, format="FLAC")
    (audio / "notes.txt").write_text("x")
    csv = audio / "list.csv"
    csv.write_text(
        "path,speaker,comment\n"
        "a.wav,NA,first\n"              # relative path; a speaker called NA stays NA
        "sub/b.wav, 007 ,\n"            # whitespace around fields is dropped; 007 stays a string
        f"{outside},x,absolute\n"
        "gone.wav,x,\n"
        ",x,\n"
        "a.wav,,\n"
        "sub,x,\n"
        "notes.txt,x,\n"
        "a.wav,NA,again\n"
        "a.wav,x,y,too many\n")
    manifest, rejected = scan(csv)
    assert list(manifest.path) == [str(a), str(b), str(outside)]
    assert list(manifest.speaker) == ["NA", "007", "x"]
    assert list(manifest.utterance) == ["NA/a", "007/sub/b", "x/../elsewhere/c"]
    by_reason = rejected.groupby("reason").size().to_dict()
    assert by_reason == {"bad_manifest_row": 4, "missing": 1, "not_audio": 1, "duplicate": 1}
    messages = " | ".join(rejected.message)
    assert f"{csv}, line 5: " in messages and "line 6: empty path" in messages and "line 7: empty speaker" in messages
    assert "is a folder" in messages and "more fields than columns" in messages
    assert rejected.set_index("reason").loc["duplicate", "path"] == str(a)


def test_csv_without_the_columns_names_file_and_columns(tmp_path):
    csv = tmp_path / "m.csv"
    csv.write_text("file,who\na.wav,x\n")
    with pytest.raises(ValueError, match=r"m\.csv: missing column\(s\) path, speaker.*found: file, who"):
        scan(csv)
    csv.write_text("path,who\na.wav,x\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) speaker"):
        scan(csv)


def test_bad_sources_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: no such folder or CSV file"):
        scan(tmp_path / "nowhere")
    (tmp_path / "list.txt").write_text("path,speaker\n")
    with pytest.raises(ValueError, match=r"list\.txt: expected a folder of recordings or a \.csv manifest"):
        scan(tmp_path / "list.txt")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match=r"empty\.csv: cannot be read as CSV"):
        scan(tmp_path / "empty.csv")

"""Atomic outputs: a replace removes nothing but the file it replaces, and ``-o`` never names a directory."""
from __future__ import annotations

import pytest

from voiceprint.serving import cli
from voiceprint.core.outputs import atomic_path, write_text


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_atomic_file_replaces_a_file_and_leaves_no_temp(tmp_path):
    (tmp_path / "out.txt").write_text("old")
    write_text(tmp_path / "out.txt", "new")
    assert (tmp_path / "out.txt").read_text() == "new" and _tree(tmp_path) == ["out.txt"]


def test_atomic_file_never_replaces_a_directory(tmp_path):
    target = tmp_path / "k.npy"
    (target / "sub").mkdir(parents=True)
    (target / "sub" / "f").write_text("precious")
    with pytest.raises(IsADirectoryError, match="k.npy"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"x")
    assert (target / "sub" / "f").read_text() == "precious" and _tree(tmp_path) == ["k.npy", "k.npy/sub",
                                                                                     "k.npy/sub/f"]


def test_atomic_directory_still_replaces_a_directory(tmp_path):
    (tmp_path / "raw" / "old").mkdir(parents=True)
    with atomic_path(tmp_path / "raw") as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("n")
    assert _tree(tmp_path) == ["raw", "raw/new"]


@pytest.mark.parametrize("argv, target", [
    (["embed", "a.wav", "-o", "{d}/k.npy"], "k.npy"),
    (["embed", "a.wav", "-o", "{d}/k.npy"], "k.paths.csv"),   # the row list beside a .npy
    (["embed", "a.wav", "-o", "{d}/k.csv"], "k.csv"),
    (["cluster", "a.wav", "-o", "{d}/k.csv"], "k.csv"),
])
def test_cli_refuses_a_directory_as_output_with_exit_2(tmp_path, capsys, argv, target):
    (tmp_path / target / "sub").mkdir(parents=True)
    (tmp_path / target / "sub" / "f").write_text("precious")
    code = cli.main([a.format(d=tmp_path) for a in argv] + ["--json"])
    out, err = capsys.readouterr()
    assert code == 2 and f"{tmp_path / target}: is a directory" in err
    assert (tmp_path / target / "sub" / "f").read_text() == "precious"


def test_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    for name in (f".out.txt.{dead}.abcd1234", f".out.txt.{os.getpid()}.efgh5678", f".out.txt.json.{dead}.abcd1234",
                 f".other.{dead}.abcd1234"):
        (tmp_path / name).mkdir()
    write_text(tmp_path / "out.txt", "x")
    assert _tree(tmp_path) == sorted([f".other.{dead}.abcd1234", f".out.txt.json.{dead}.abcd1234",
                                      f".out.txt.{os.getpid()}.efgh5678", "out.txt"])

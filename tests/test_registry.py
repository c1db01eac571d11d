"""The SQLite speaker registry: scores against mean enrolments, one model per registry, all-or-nothing enrolments,
several processes at once. No TensorFlow: embeddings are given directly."""
from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from voiceprint.serving.registry import Registry, RegistryError, default_registry_path

MODEL_A = "a" * 64
MODEL_B = "b" * 64
REPO = Path(__file__).resolve().parents[1]


def _sources(*names):
    return [(f"/audio/{n}.flac", f"{n:0>64}"[-64:]) for n in names]


@pytest.fixture
def registry(tmp_path):
    with Registry(tmp_path / "reg.sqlite") as reg:
        yield reg


def test_score_is_cosine_to_the_mean_enrolment(registry):
    registry.enroll("alice", np.array([[1, 0, 0], [0, 1, 0]]), model_sha256=MODEL_A, sources=_sources("a1", "a2"))
    registry.enroll("bob", np.array([[0, 0, 1]]), model_sha256=MODEL_A, sources=_sources("b1"))
    scores = registry.score(np.array([1.0, 0.0, 0.0]), model_sha256=MODEL_A)
    # alice's mean (0.5, 0.5, 0) has cosine 1/sqrt(2) with the probe; bob's (0, 0, 1) is orthogonal.
    assert [(s.speaker, s.enrollments) for s in scores] == [("alice", 2), ("bob", 1)]
    assert scores[0].score == pytest.approx(1 / np.sqrt(2), abs=1e-7)
    assert scores[1].score == pytest.approx(0.0, abs=1e-7)


def test_embeddings_are_stored_as_float32_bytes_with_provenance(registry):
    emb = np.array([[0.25, -0.5, 1.0]], dtype=np.float32)
    registry.enroll("alice", emb, model_sha256=MODEL_A, sources=[("/x/a.flac", "f" * 64)])
    row = sqlite3.connect(registry.path).execute(
        "SELECT embedding, embedding_dim, model_sha256, source_path, source_sha256 FROM enrollments").fetchone()
    assert np.frombuffer(row[0], dtype="<f4").tolist() == [0.25, -0.5, 1.0]
    assert row[1:] == (3, MODEL_A, "/x/a.flac", "f" * 64)
    assert sqlite3.connect(registry.path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_same_file_is_not_stored_twice_and_says_so(registry):
    first = registry.enroll("alice", np.eye(3)[:2], model_sha256=MODEL_A, sources=_sources("a1", "a2"))
    again = registry.enroll("alice", np.eye(3)[1:], model_sha256=MODEL_A, sources=_sources("a2", "a3"))
    assert (first.added, first.already_enrolled, first.enrollments) == (2, 0, 2)
    assert (again.added, again.already_enrolled, again.enrollments) == (1, 1, 3)


def test_another_models_embeddings_are_refused(registry):
    registry.enroll("alice", np.eye(3)[:1], model_sha256=MODEL_A, sources=_sources("a1"))
    with pytest.raises(RegistryError, match="different models"):
        registry.enroll("bob", np.eye(3)[1:2], model_sha256=MODEL_B, sources=_sources("b1"))
    with pytest.raises(RegistryError, match="different models"):
        registry.score(np.ones(3), model_sha256=MODEL_B)
    with pytest.raises(RegistryError, match="3-d embeddings, this model makes 4-d"):
        registry.score(np.ones(4), model_sha256=MODEL_A)
    assert [s.name for s in registry.speakers()] == ["alice"]


def test_list_and_remove(registry):
    registry.enroll("bob", np.eye(3)[:2], model_sha256=MODEL_A, sources=_sources("b1", "b2"))
    registry.enroll("alice", np.eye(3)[:1], model_sha256=MODEL_A, sources=_sources("a1"))
    assert [(s.name, s.enrollments, s.model_sha256) for s in registry.speakers()] == [
        ("alice", 1, MODEL_A), ("bob", 2, MODEL_A)]
    assert registry.remove("bob") == 2
    with pytest.raises(RegistryError, match="unknown speaker 'bob'.*enrolled: alice"):
        registry.remove("bob")
    assert [s.name for s in registry.speakers()] == ["alice"]


@pytest.mark.parametrize("name, why", [("", "non-empty"), ("  ", "non-empty"), ("Unknown", "reserved"),
                                       ("a\nb", "printable"), ("x" * 201, "printable"),
                                       ("unknown\u200b", "printable"),      # displays as "unknown"
                                       ("\u202eecilA", "printable"),         # right-to-left override
                                       ("a\x7fb", "printable"), ("ｕｎｋｎｏｗｎ", "reserved")])  # fullwidth
def test_bad_speaker_names(registry, name, why):
    with pytest.raises(RegistryError, match=why):
        registry.enroll(name, np.eye(3)[:1], model_sha256=MODEL_A, sources=_sources("a1"))


def test_speaker_names_are_stored_nfkc_normalised(registry):
    result = registry.enroll("Ａlice", np.eye(3)[:1], model_sha256=MODEL_A, sources=_sources("a1"))
    assert result.speaker == "Alice" and [s.name for s in registry.speakers()] == ["Alice"]


def test_reading_never_creates_or_converts_a_file(tmp_path):
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    with pytest.raises(RegistryError, match="empty.sqlite is empty.*not a voiceprint registry"):
        Registry(empty, create=False)
    assert empty.read_bytes() == b"" and sorted(p.name for p in tmp_path.iterdir()) == ["empty.sqlite"]


def test_missing_empty_and_foreign_files(tmp_path):
    with pytest.raises(RegistryError, match="does not exist"):
        Registry(tmp_path / "none.sqlite", create=False)
    assert not (tmp_path / "none.sqlite").exists()
    with Registry(tmp_path / "empty.sqlite") as reg, pytest.raises(RegistryError, match="is empty"):
        reg.score(np.ones(3), model_sha256=MODEL_A)
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)")
    with pytest.raises(RegistryError, match="not a voiceprint registry"):
        Registry(other)
    assert sqlite3.connect(other).execute("PRAGMA journal_mode").fetchone()[0] == "delete"   # left untouched
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(RegistryError, match="garbage.sqlite"):
        Registry(garbage)


def test_default_path_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VOICEPRINT_REGISTRY", str(tmp_path / "r.sqlite"))
    assert default_registry_path() == tmp_path / "r.sqlite"
    monkeypatch.delenv("VOICEPRINT_REGISTRY")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_registry_path() == tmp_path / "data" / "voiceprint" / "registry.sqlite"


def test_failure_between_inserts_leaves_no_half_enrolment(registry, monkeypatch):
    registry.enroll("alice", np.eye(3)[:1], model_sha256=MODEL_A, sources=_sources("a1"))
    real = Registry._insert_enrollment
    calls = []

    def fail_on_second(self, *args):
        calls.append(args[0])
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return real(self, *args)

    monkeypatch.setattr(Registry, "_insert_enrollment", fail_on_second)
    with pytest.raises(RuntimeError, match="injected"):
        registry.enroll("bob", np.eye(3), model_sha256=MODEL_A, sources=_sources("b1", "b2", "b3"))
    monkeypatch.undo()
    assert calls == ["bob", "bob"]           # the first row was inserted before the failure ...
    assert [s.name for s in registry.speakers()] == ["alice"]   # ... and rolled back
    assert registry.enroll("bob", np.eye(3), model_sha256=MODEL_A, sources=_sources("b1", "b2", "b3")).added == 3


# Child processes run plain Python (no pytest): each opens the registry itself, as separate programs would.
KILLED_MID_ENROLMENT = """
import os, signal, sys
import numpy as np
from voiceprint.serving.registry import Registry

real = Registry._insert_enrollment
count = []
def insert_then_die(self, *args):
    count.append(1)
    if len(count) == 2:   # one row already inserted, inside the open transaction
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *args)
Registry._insert_enrollment = insert_then_die
Registry(sys.argv[1]).enroll("bob", np.eye(3), model_sha256="a" * 64,
                             sources=[("/b%d.flac" % i, "%064d" % i) for i in range(3)])
"""

CONCURRENT_WORKER = """
import sys
import numpy as np
from voiceprint.serving.registry import Registry

path, worker = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(worker)
for k in range(5):
    with Registry(path, timeout=120) as reg:
        emb = rng.normal(size=(2, 8)).astype(np.float32)
        sources = [("/w%d/s%d/%d.flac" % (worker, k, j), "%032d%032d" % (worker * 10 + k, j)) for j in range(2)]
        reg.enroll("w%d-s%d" % (worker, k), emb, model_sha256="a" * 64, sources=sources)
        # A shared speaker every worker adds to, and a read between the writes.
        reg.enroll("shared", emb[:1], model_sha256="a" * 64, sources=sources[:1])
        assert reg.score(emb[0], model_sha256="a" * 64)
        np.save("%s.w%d.s%d.npy" % (path, worker, k), emb)
"""


def _python(code: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], cwd=REPO,
                            stderr=subprocess.PIPE, text=True)


def test_process_killed_inside_the_transaction_leaves_nothing(tmp_path):
    path = tmp_path / "reg.sqlite"
    with Registry(path) as reg:
        reg.enroll("alice", np.eye(3)[:1], model_sha256=MODEL_A, sources=_sources("a1"))
    child = _python(KILLED_MID_ENROLMENT, path)
    child.wait(timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr.read()
    with Registry(path, create=False) as reg:
        assert [(s.name, s.enrollments) for s in reg.speakers()] == [("alice", 1)]
        assert reg.enroll("bob", np.eye(3)[:1], model_sha256=MODEL_A, sources=_sources("b1")).added == 1


def test_concurrent_processes_enrol_and_read_consistently(tmp_path):
    path = tmp_path / "reg.sqlite"
    workers = [_python(CONCURRENT_WORKER, path, w) for w in range(4)]
    for w in workers:
        w.wait(timeout=300)
    assert [w.returncode for w in workers] == [0] * 4, [w.stderr.read() for w in workers]
    with Registry(path, create=False) as reg:
        counts = {s.name: s.enrollments for s in reg.speakers()}
        assert counts == {"shared": 20, **{f"w{w}-s{k}": 2 for w in range(4) for k in range(5)}}
        # Every stored embedding is intact: a speaker's mean is exactly the mean of what the worker wrote.
        names, means, _ = reg.speaker_means(MODEL_A, 8)
        for w in range(4):
            for k in range(5):
                expected = np.load(f"{path}.w{w}.s{k}.npy").astype(np.float64).mean(axis=0)
                expected /= np.linalg.norm(expected)
                np.testing.assert_allclose(means[names.index(f"w{w}-s{k}")], expected, atol=1e-6)

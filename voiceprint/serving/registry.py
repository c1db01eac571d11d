"""The persistent speaker registry: enrolment embeddings in one SQLite file, safe for several processes at once.

One row per enrolled recording: speaker name, the model's sha256 (which model made the embedding), the embedding as
little-endian float32 bytes (read back with ``numpy.frombuffer``: nothing is ever unpickled), the source file's
path and sha256, and the time. A speaker is the set of their rows; their score against a probe is the cosine
similarity to the mean of their enrolment embeddings.

Concurrency and crash safety: WAL journal (readers never block the writer), a busy timeout (writers wait for each
other instead of failing), and every enrolment is ONE ``BEGIN IMMEDIATE`` transaction (the write lock is taken
before anything is read, so two enrolments cannot interleave), so a process killed mid-enrolment leaves none of
that enrolment's rows. Embeddings of different models are not comparable: a registry holds one model's
embeddings, and enrolling or identifying with another model is refused.

Location: ``--registry`` / the ``VOICEPRINT_REGISTRY`` environment variable, else
``$XDG_DATA_HOME/voiceprint/registry.sqlite`` (``~/.local/share/voiceprint/registry.sqlite``): a user file, apart
from the model bundle, which a pipeline run replaces as a whole.
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
import time
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from voiceprint.core.errors import VoiceprintError

ENV_VAR = "VOICEPRINT_REGISTRY"
APPLICATION_ID = 0x56505247     # "VPRG": marks an SQLite file as a voiceprint registry
SCHEMA_VERSION = 1
RESERVED_NAMES = ("unknown",)   # identification's open-set answer
MAX_NAME_LENGTH = 200

SCHEMA = """
CREATE TABLE IF NOT EXISTS enrollments (
    id            INTEGER PRIMARY KEY,
    speaker       TEXT    NOT NULL,
    model_sha256  TEXT    NOT NULL,
    embedding_dim INTEGER NOT NULL,
    embedding     BLOB    NOT NULL,   -- embedding_dim little-endian float32 values
    source_path   TEXT    NOT NULL,
    source_sha256 TEXT    NOT NULL,
    enrolled_at   TEXT    NOT NULL,   -- UTC, ISO 8601
    UNIQUE (speaker, model_sha256, source_sha256)
);
CREATE INDEX IF NOT EXISTS enrollments_by_speaker ON enrollments (speaker);
"""


class RegistryError(VoiceprintError):
    """The registry cannot answer: missing or empty, unknown speaker, another model's embeddings, bad file."""


def default_registry_path() -> Path:
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "voiceprint" / "registry.sqlite"


def check_speaker_name(name: str) -> str:
    """The name, NFKC-normalised and stripped; RegistryError for an empty, reserved, over-long name, or one with
    control or format characters (zero-width spaces, direction overrides): those make a name display as another
    one ("unknown\u200b" shows as "unknown")."""
    if not isinstance(name, str) or not name.strip():
        raise RegistryError(f"speaker name {name!r}: must be a non-empty string")
    name = unicodedata.normalize("NFKC", name).strip()
    if name.casefold() in RESERVED_NAMES:
        raise RegistryError(f"speaker name {name!r} is reserved (identification answers it for no match)")
    # Cc control, Cf format, Co private use, Cn unassigned, Cs surrogates; Zl/Zp line and paragraph separators.
    invisible = {"Cc", "Cf", "Co", "Cn", "Cs", "Zl", "Zp"}
    if len(name) > MAX_NAME_LENGTH or any(unicodedata.category(c) in invisible for c in name):
        raise RegistryError(f"speaker name {name!r}: at most {MAX_NAME_LENGTH} printable characters")
    return name


@dataclass(frozen=True)
class EnrollResult:
    speaker: str
    added: int              # new recordings stored by this call
    already_enrolled: int   # recordings (same file bytes) this speaker already had for this model: not stored twice
    enrollments: int        # the speaker's total after the call


@dataclass(frozen=True)
class SpeakerInfo:
    name: str
    enrollments: int
    model_sha256: str
    first_enrolled: str
    last_enrolled: str


@dataclass(frozen=True)
class SpeakerScore:
    speaker: str
    score: float            # cosine similarity to the mean of the speaker's enrolment embeddings
    enrollments: int


class Registry:
    """An open registry file. ``create=False`` refuses a path that does not exist yet (RegistryError)."""

    def __init__(self, path: str | Path | None = None, *, create: bool = True, timeout: float = 60.0):
        self.path = Path(path) if path is not None else default_registry_path()
        if not self.path.exists():
            if not create:
                raise RegistryError(f"registry {self.path} does not exist: enrol a speaker first "
                                    "(voiceprint enroll NAME FILES...)")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif not self.path.is_file():
            raise RegistryError(f"registry {self.path} is not a file")
        try:
            # isolation_level=None: no implicit transactions; we issue BEGIN IMMEDIATE / COMMIT ourselves.
            self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise RegistryError(f"registry {self.path}: cannot open: {exc}") from None
        try:
            self._db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            with self._transaction("DEFERRED"):
                new = self._is_new()        # refuses another application's database before changing anything
            if new and not create:          # reading never creates or converts a file (an empty one included)
                raise RegistryError(f"registry {self.path} is empty ({self.path.stat().st_size} bytes), not a "
                                    "voiceprint registry: enrol a speaker first (voiceprint enroll NAME FILES...)")
            self._enable_wal(timeout)
            if new:
                with self._transaction():   # the write lock, then look again: another process may have won
                    if self._is_new():
                        self._create_schema()
        except (sqlite3.DatabaseError, RegistryError) as exc:
            self._db.close()
            if isinstance(exc, RegistryError):
                raise
            raise RegistryError(f"registry {self.path}: {exc}") from None

    # ----------------------------------------------------------------------------------------- setup

    def _enable_wal(self, timeout: float) -> None:
        if self._db.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
            return
        # The journal mode is stored in the file; switching needs a moment with no other connection, which the
        # busy handler does not always wait for, so retry briefly while other processes open the same file.
        deadline = time.monotonic() + timeout
        while True:
            try:
                mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        if mode.lower() != "wal":   # SQLite answers the old mode where WAL is impossible (some network filesystems)
            raise RegistryError(f"registry {self.path}: cannot use a WAL journal here (journal mode stays {mode}); "
                                "put the registry on a local disk")

    def _is_new(self) -> bool:
        """True for an empty database; RegistryError for another application's or a newer schema's file."""
        app_id = self._db.execute("PRAGMA application_id").fetchone()[0]
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        tables = self._db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app_id == 0 and tables == 0:
            return True
        if app_id != APPLICATION_ID:
            raise RegistryError(f"registry {self.path}: an SQLite database, but not a voiceprint registry")
        if version > SCHEMA_VERSION:
            raise RegistryError(f"registry {self.path}: schema version {version} is newer than this voiceprint "
                                f"understands ({SCHEMA_VERSION}); upgrade voiceprint")
        return False

    def _create_schema(self) -> None:
        # executescript would COMMIT the open transaction; run the statements one by one inside it instead.
        for statement in filter(str.strip, SCHEMA.split(";")):
            self._db.execute(statement)
        self._db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @contextlib.contextmanager
    def _transaction(self, mode: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
        """All or nothing. IMMEDIATE takes the write lock up front (writers queue on the busy timeout);
        DEFERRED reads one consistent snapshot. SQLite errors become RegistryError naming the file."""
        try:
            self._db.execute(f"BEGIN {mode}")
            try:
                yield self._db
            except BaseException:
                if self._db.in_transaction:   # SQLite may already have rolled back (e.g. disk full)
                    self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise RegistryError(f"registry {self.path}: {exc}") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------- writes

    def _insert_enrollment(self, speaker: str, model_sha256: str, embedding: np.ndarray, source_path: str,
                           source_sha256: str, enrolled_at: str) -> bool:
        """One row; False when this speaker already has this exact file for this model."""
        cursor = self._db.execute(
            "INSERT OR IGNORE INTO enrollments (speaker, model_sha256, embedding_dim, embedding, source_path, "
            "source_sha256, enrolled_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (speaker, model_sha256, int(embedding.shape[0]), embedding.astype("<f4").tobytes(), source_path,
             source_sha256, enrolled_at))
        return cursor.rowcount == 1

    def enroll(self, speaker: str, embeddings: np.ndarray, *, model_sha256: str,
               sources: Sequence[tuple[str, str]]) -> EnrollResult:
        """Store one embedding per source ``(path, sha256)`` for ``speaker``, all or nothing.

        Refuses (RegistryError) when the registry already holds embeddings of another model or dimension.
        """
        speaker = check_speaker_name(speaker)
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or len(embeddings) != len(sources) or len(sources) == 0:
            raise ValueError(f"enroll {speaker!r}: expected one embedding per source, got {embeddings.shape} "
                             f"for {len(sources)} sources")
        if not np.isfinite(embeddings).all():
            raise ValueError(f"enroll {speaker!r}: embeddings contain NaN or Inf")
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self._transaction():
            self._check_model(model_sha256, embeddings.shape[1], "enrol with")
            added = sum(self._insert_enrollment(speaker, model_sha256, emb, str(path), sha, now)
                        for emb, (path, sha) in zip(embeddings, sources))
            total = self._db.execute("SELECT count(*) FROM enrollments WHERE speaker = ?", (speaker,)).fetchone()[0]
        return EnrollResult(speaker, added, len(sources) - added, total)

    def remove(self, speaker: str) -> int:
        """Delete every enrolment of ``speaker``; returns how many. RegistryError for an unknown name."""
        with self._transaction():
            removed = self._db.execute("DELETE FROM enrollments WHERE speaker = ?", (speaker,)).rowcount
            if removed == 0:
                raise RegistryError(f"unknown speaker {speaker!r} in registry {self.path} "
                                    f"(enrolled: {', '.join(self._names()) or 'none'})")
        return removed

    # ----------------------------------------------------------------------------------------- reads

    def _names(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT DISTINCT speaker FROM enrollments ORDER BY speaker")]

    def _check_model(self, model_sha256: str, dim: int, verb: str) -> None:
        stored = self._db.execute("SELECT DISTINCT model_sha256, embedding_dim FROM enrollments").fetchall()
        others = sorted({sha for sha, _ in stored} - {model_sha256})
        if others:
            raise RegistryError(
                f"registry {self.path} holds embeddings of model {', '.join(s[:12] for s in others)}; cannot "
                f"{verb} model {model_sha256[:12]}: embeddings of different models are not comparable "
                "(re-enrol the speakers with this model into another --registry, or remove them)")
        if any(d != dim for _, d in stored):
            raise RegistryError(f"registry {self.path} holds {stored[0][1]}-d embeddings, this model makes {dim}-d")

    def speakers(self) -> list[SpeakerInfo]:
        with self._transaction("DEFERRED"):
            rows = self._db.execute(
                "SELECT speaker, count(*), min(model_sha256), min(enrolled_at), max(enrolled_at) FROM enrollments "
                "GROUP BY speaker ORDER BY speaker").fetchall()
        return [SpeakerInfo(*row) for row in rows]

    def speaker_means(self, model_sha256: str, dim: int) -> tuple[list[str], np.ndarray, list[int]]:
        """(names, unit-length mean embedding per speaker (S, dim), enrolment counts), sorted by name.

        RegistryError when the registry is empty or holds another model's embeddings.
        """
        with self._transaction("DEFERRED"):    # one consistent snapshot while other processes write
            self._check_model(model_sha256, dim, "identify with")
            rows = self._db.execute(
                "SELECT speaker, embedding FROM enrollments ORDER BY speaker, id").fetchall()
        if not rows:
            raise RegistryError(f"registry {self.path} is empty: enrol a speaker first "
                                "(voiceprint enroll NAME FILES...)")
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        for name, blob in rows:
            if len(blob) != 4 * dim:
                raise RegistryError(f"registry {self.path}: an embedding of {name!r} has {len(blob)} bytes, "
                                    f"expected {4 * dim}")
            emb = np.frombuffer(blob, dtype="<f4").astype(np.float64)
            sums[name] = sums.get(name, 0.0) + emb
            counts[name] = counts.get(name, 0) + 1
        names = sorted(sums)
        means = np.stack([sums[n] / counts[n] for n in names])
        means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
        return names, means.astype(np.float32), [counts[n] for n in names]

    def score(self, embedding: np.ndarray, *, model_sha256: str) -> list[SpeakerScore]:
        """Every speaker's cosine score against ``embedding``, best first (ties by name)."""
        embedding = np.asarray(embedding).ravel()
        return rank_speakers(embedding, *self.speaker_means(model_sha256, embedding.shape[0]))


def rank_speakers(embedding: np.ndarray, names: list[str], means: np.ndarray, counts: list[int]) -> list[SpeakerScore]:
    """Cosine of ``embedding`` with each speaker's unit mean (from :meth:`Registry.speaker_means`), best first."""
    probe = np.asarray(embedding, dtype=np.float64).ravel()
    probe /= max(np.linalg.norm(probe), 1e-12)
    return rank_scores(names, means.astype(np.float64) @ probe, counts)


def rank_scores(names: list[str], scores: np.ndarray, counts: list[int]) -> list[SpeakerScore]:
    """Speakers by score (any scoring, e.g. AS-norm), best first; ties by name."""
    order = sorted(range(len(names)), key=lambda i: (-scores[i], names[i]))
    return [SpeakerScore(names[i], float(scores[i]), counts[i]) for i in order]

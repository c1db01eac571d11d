"""The project's own error classes.

A :class:`VoiceprintError` is a failure whose message already says what is wrong and where (a params key, a file,
an input): stage scripts report it in one line (``voiceprint.core.stage``). Any other exception is a bug, in this
project or below it, and keeps its traceback. The subclasses are also the built-in error they refine
(``ValueError``, ``FileNotFoundError``), so callers that catch those keep working.
"""
from __future__ import annotations


class VoiceprintError(Exception):
    """A failure the message fully explains; the base of every project-owned error class."""


class DataError(VoiceprintError, ValueError):
    """Data, a file's content or a setting that cannot be used; the message names it."""


class MissingFileError(VoiceprintError, FileNotFoundError):
    """A file or folder the run needs is not there; the message names it."""


class WorkerDiedError(VoiceprintError, ChildProcessError):
    """A worker process died (kill -9, the out-of-memory killer, a crash); the message names its file."""

"""Logging setup for the package's entry points (the CLI and the stages).

Every module logs through its own ``logging.getLogger(__name__)``, under the ``voiceprint`` logger; the library
never configures logging itself, so an application embedding it decides what is shown. The CLI and the stage runner
call :func:`configure`: concise lines on stderr, ``info`` as the bare message, warnings and errors prefixed
(``warning: ...``, ``error: ...``), debug lines with the module they come from.
"""
from __future__ import annotations

import logging
import sys

PACKAGE_LOGGER = "voiceprint"
_HANDLER_NAME = "voiceprint-stderr"


class ConciseFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message = f"{message}\n{self.formatException(record.exc_info)}"
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        if record.levelno < logging.INFO:
            return f"debug {record.name}: {message}"
        return message


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (a redirected or captured stderr too)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):     # StreamHandler.__init__ sets it; the property always answers sys.stderr
        pass


def level_for(verbose: int = 0, quiet: int = 0) -> int:
    """``-v`` shows debug lines, ``-q`` hides info (warnings and errors stay), ``-qq`` hides warnings too."""
    if verbose and quiet:
        raise ValueError("--verbose and --quiet exclude each other")
    if verbose:
        return logging.DEBUG
    return (logging.INFO, logging.WARNING, logging.ERROR)[min(quiet, 2)]


def configure(level: int = logging.INFO, stream=None) -> logging.Logger:
    """Send the package's log records at ``level`` and above to ``stream`` (default: ``sys.stderr`` as it is at
    each record). Calling it again replaces the handler (no duplicate lines)."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    for handler in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(ConciseFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    return logger

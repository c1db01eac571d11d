"""Running a stage script: expected failures end in one clear line on stderr and a non-zero exit."""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

from voiceprint.core import log
from voiceprint.core.errors import VoiceprintError

logger = logging.getLogger(__name__)

# Set to 1 to see the traceback of an expected failure too.
TRACEBACK_ENV_VAR = "VOICEPRINT_TRACEBACK"


def run_stage(main: Callable[[], None]) -> None:
    """Run ``main`` with the package's logging on stderr (voiceprint/core/log.py). A
    :class:`~voiceprint.core.errors.VoiceprintError` (bad params, file or data: its message says what and where) ends in
    one line and exit code 1; anything else is a bug and propagates with its traceback."""
    log.configure()
    spec = getattr(sys.modules.get(main.__module__), "__spec__", None)   # "stages.mfcc" under python -m
    name = (spec.name if spec else main.__module__).rsplit(".", 1)[-1]
    try:
        main()
    except VoiceprintError as exc:
        if os.environ.get(TRACEBACK_ENV_VAR, "") not in ("", "0"):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        logger.error("stage %s: %s", name, message)
        sys.exit(1)

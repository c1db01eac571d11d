"""Running a stage script: expected failures end in one clear line on stderr and a non-zero exit."""
from __future__ import annotations

import os
import sys
from typing import Callable

from voiceprint.errors import VoiceprintError

# Set to 1 to see the traceback of an expected failure too.
TRACEBACK_ENV_VAR = "VOICEPRINT_TRACEBACK"


def run_stage(main: Callable[[], None]) -> None:
    """Run ``main``. A :class:`~voiceprint.errors.VoiceprintError` (bad params, file or data: its message says what
    and where) ends in one line and exit code 1; anything else is a bug and propagates with its traceback."""
    spec = getattr(sys.modules.get(main.__module__), "__spec__", None)   # "stages.mfcc" under python -m
    name = (spec.name if spec else main.__module__).rsplit(".", 1)[-1]
    try:
        main()
    except VoiceprintError as exc:
        if os.environ.get(TRACEBACK_ENV_VAR, "") not in ("", "0"):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: stage {name}: {message}", file=sys.stderr)
        sys.exit(1)

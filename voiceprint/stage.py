"""Running a stage script: expected failures end in one clear line on stderr and a non-zero exit."""
from __future__ import annotations

import sys
from typing import Callable

# Errors whose message already says what is wrong and where (file or params key): no traceback needed.
# ChildProcessError: a worker process died, and the message names the file it was on.
EXPECTED_ERRORS = (ValueError, FileNotFoundError, NotImplementedError, KeyError, ChildProcessError)


def run_stage(main: Callable[[], None]) -> None:
    spec = getattr(sys.modules.get(main.__module__), "__spec__", None)   # "stages.mfcc" under python -m
    name = (spec.name if spec else main.__module__).rsplit(".", 1)[-1]
    try:
        main()
    except EXPECTED_ERRORS as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: stage {name}: {message}", file=sys.stderr)
        sys.exit(1)

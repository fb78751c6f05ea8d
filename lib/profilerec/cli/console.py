"""What every job entrypoint shares: logging setup and turning user errors into one line."""

from __future__ import annotations

import logging
import sys
from typing import Callable, TypeVar

from profilerec.errors import ProfilerecError

T = TypeVar("T")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
EXIT_USER_ERROR = 2


def setup_logging(level: int = logging.INFO) -> None:
    """INFO logging in a readable one-line format (a no-op if the root logger is set up already)."""
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt="%H:%M:%S")


def run_job(main_fn: Callable[[], T]) -> T:
    """Run a job's main function: a ProfilerecError (bad config, missing data, ...) is printed as
    one line on stderr and exits with code 2, without a stack trace; other errors propagate (a
    stack trace is what a bug report needs)."""
    setup_logging()
    try:
        return main_fn()
    except ProfilerecError as e:
        message = " ".join(str(e).split())  # one line, even for multi-line messages
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None

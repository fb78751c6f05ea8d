"""Environment variables set for a block of code: what the processes it starts inherit."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set `values` in os.environ for the block, then restore what was there (or unset it)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

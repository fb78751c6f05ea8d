"""Local process pools (runtime/parallel.py)."""

import pytest
from profilerec.errors import DataError
from profilerec.runtime.parallel import map_chunks, worker_state


def _failing_setup(message: str) -> None:
    raise DataError(message)


def _setup(offset: int) -> None:
    worker_state()["offset"] = offset


def _add_offset(chunk: int) -> int:
    return chunk + worker_state()["offset"]


def test_chunks_come_back_in_order_from_worker_processes():
    assert list(map_chunks(_add_offset, range(7), 2, _setup, (100,))) == list(range(100, 107))


def test_a_failing_worker_setup_raises_its_own_error_not_a_broken_pool():
    with pytest.raises(DataError, match="no index at s3://x"):
        list(map_chunks(_add_offset, range(5), 2, _failing_setup, ("no index at s3://x",)))

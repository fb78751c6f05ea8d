"""Chunks of a streamed log mapped over local worker processes, results in order.

The batch jobs replay the log event by event in Python (profile.py), which runs on one core per
process; a pool of processes uses every core of the node while the log still streams through in
bounded memory (at most `2 x workers` chunks are in flight).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import itertools
import multiprocessing
import os
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

from profilerec.runtime.environment import environment
from profilerec.threads import use_one_thread

T = TypeVar("T")
R = TypeVar("R")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cores_per_worker(workers: int) -> int:
    """Torch threads for each of `workers` processes sharing this machine's cores (at least 1):
    Ray starts its workers with OMP_NUM_THREADS=1, which would leave the other cores idle."""
    return max(1, usable_cores() // max(1, workers))


def default_workers(workers: Optional[int]) -> int:
    """`workers`, or else the cores this process may run on."""
    return max(1, workers) if workers else usable_cores()


def map_chunks(fn: Callable[[T], R], chunks: Iterable[T], workers: int,
               initializer: Optional[Callable[..., None]] = None, initargs: tuple = ()) -> Iterator[R]:
    """fn(chunk) for each chunk, in order. `workers` <= 1 (or a single chunk) runs in this process;
    otherwise each of `workers` fresh processes (spawned: no state forked from the caller, one
    torch/BLAS thread each) runs `initializer(*initargs)` once and then `fn` on the chunks it is sent. `fn` and `initializer` must be module-level
    functions; chunks and results travel pickled."""
    chunks = iter(chunks)
    head = list(itertools.islice(chunks, 2))
    if workers <= 1 or len(head) < 2:
        # one chunk (a small log) is not worth starting processes for
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, itertools.chain(head, chunks))
        return
    context = multiprocessing.get_context("spawn")
    with _one_thread_each(), concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init,
                                                                    initargs=(initializer, initargs)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in itertools.chain(head, chunks):
            pending.append(pool.submit(_run, fn, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _one_thread_each() -> contextlib.AbstractContextManager:
    # the processes share the cores: BLAS thread pools of their own (read from the environment
    # when a spawned worker imports numpy) would only fight over them
    return environment(**dict.fromkeys(("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"), "1"))


def _init(initializer: Optional[Callable[..., None]], initargs: tuple) -> None:
    use_one_thread()  # the processes share the cores
    try:
        if initializer is not None:
            initializer(*initargs)
    except Exception as error:  # raised from the first task instead: a failed initializer only breaks the pool
        _STATE["initializer_error"] = error


def _run(fn: Callable[[T], R], chunk: T) -> R:
    error = _STATE.get("initializer_error")
    if error is not None:
        raise error
    return fn(chunk)


def worker_state() -> dict[str, Any]:
    """A per-process dict where an initializer leaves what its `fn` needs (loaded once)."""
    return _STATE


_STATE: dict[str, Any] = {}

"""The service's Ray processes on this machine and their memory, read from /proc (Linux), for the
benchmarks that watch them (chaos.py, serve_bench.py)."""

from __future__ import annotations

import os
from typing import Optional

SERVICE_PROCESSES = ("ShardActor", "LayoutKeeper", "ServeReplica", "ProxyActor", "ServeController")


def ray_processes() -> dict[int, str]:
    """pid -> process title of this machine's Ray processes that serve."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::") and any(kind in title for kind in SERVICE_PROCESSES):
            found[int(pid)] = title
    return found


def rss_kib(pid: int) -> Optional[int]:
    """Resident memory of `pid` in KiB, None once it is gone."""
    return _field(f"/proc/{pid}/status", ("VmRSS:",))


def private_kib(pid: int) -> Optional[int]:
    """Memory of `pid` no other process shares, in KiB (Private_Clean + Private_Dirty): what one
    more such process costs the node; pages of a file another process maps too are not in it."""
    return _field(f"/proc/{pid}/smaps_rollup", ("Private_Clean:", "Private_Dirty:"))


def anonymous_kib(pid: int) -> Optional[int]:
    """Memory of `pid` that no file backs, in KiB (its heap and arrays). private_kib also counts
    the pages of a node-shared file that only this process has touched so far (the process that
    made the scorer's item rows read every item vector once), which the page cache holds once for
    the node and can drop."""
    return _field(f"/proc/{pid}/smaps_rollup", ("Anonymous:",))


def process_kind(title: str) -> str:
    """The kind of a service process by its title: ShardActor, Ingress, Encoder, ProxyActor, ..."""
    name = title[len("ray::"):].split(".")[0]
    return name.split(":")[-1] if name.startswith("ServeReplica") else name


def _field(path: str, names: tuple[str, ...]) -> Optional[int]:
    try:
        with open(path) as f:
            values = [int(line.split()[1]) for line in f if line.startswith(names)]
    except OSError:
        return None
    return sum(values) if values else None

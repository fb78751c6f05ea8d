"""Durable profile state of one shard: a write-ahead log of accepted events plus snapshots.

Layout under the service's state location (a local folder or any pyarrow.fs URI):

    shard-0003/wal/0000000007.jsonl        events accepted since snapshot 7, one JSON per line
    shard-0003/snapshot/0000000007.parquet profile states of every user after segment 6

An event is in the log (fsync'd on local disks, a completed put on object stores) before the
caller acknowledges it. Recovery loads the newest snapshot and replays the segments after it;
the log, not the actor's memory, is the source of truth.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from typing import Iterable, Optional

import pyarrow as pa
import pyarrow.fs as pafs

from profilerec import storage
from profilerec.schema import Event

log = logging.getLogger(__name__)


class ShardStore:
    """Write-ahead log and snapshots of one shard under `root`."""

    def __init__(self, root: str, shard: int):
        self.root = storage.join(root, f"shard-{shard:04d}")
        self.wal_dir = storage.join(self.root, "wal")
        self.snapshot_dir = storage.join(self.root, "snapshot")
        self.fs, _ = storage.resolve(self.root)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        storage.makedirs(self.wal_dir)
        storage.makedirs(self.snapshot_dir)
        segments = self._segments()
        snapshots = self._snapshots()
        self.segment = max(segments[-1] if segments else 0, snapshots[-1] if snapshots else 0)
        self.part = 0  # object stores: one object per append inside the current segment

    # -- writing ------------------------------------------------------------------------------

    def append(self, events: Iterable[Event]) -> None:
        """Make `events` durable in the log (returns only once they are on stable storage)."""
        payload = "".join(json.dumps(asdict(e), separators=(",", ":")) + "\n" for e in events).encode()
        if not payload:
            return
        if self.local:
            _, path = storage.resolve(self._segment_location(self.segment))
            with open(path, "ab") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
        else:
            self.part += 1
            storage.write_bytes(payload, storage.join(self.wal_dir, f"{self.segment:010d}.{self.part:06d}.jsonl"))

    def write_snapshot(self, table: pa.Table) -> None:
        """Persist the shard's whole state and drop the log segments it covers."""
        next_segment = self.segment + 1
        storage.write_table(table, storage.join(self.snapshot_dir, f"{next_segment:010d}.parquet"), durable=True)
        # The snapshot is complete before anything it covers is removed, so a crash in between
        # only leaves segments that replay as duplicates (ignored by event id).
        for name in storage.list_files(self.wal_dir):
            if int(name.split(".")[0]) < next_segment:
                storage.delete(storage.join(self.wal_dir, name))
        for name in storage.list_files(self.snapshot_dir, ".parquet"):
            if int(name.split(".")[0]) < next_segment:
                storage.delete(storage.join(self.snapshot_dir, name))
        self.segment, self.part = next_segment, 0

    # -- reading ------------------------------------------------------------------------------

    def load(self) -> tuple[Optional[pa.Table], list[Event]]:
        """The newest snapshot (or None) and the logged events after it, in log order."""
        snapshots = self._snapshots()
        snapshot = None
        start = 0
        if snapshots:
            start = snapshots[-1]
            snapshot = storage.read_table(storage.join(self.snapshot_dir, f"{start:010d}.parquet"))
        events = []
        for name in storage.list_files(self.wal_dir):
            if int(name.split(".")[0]) >= start:
                events.extend(_parse_lines(storage.read_bytes(storage.join(self.wal_dir, name)), name))
        return snapshot, events

    def _segments(self) -> list[int]:
        return sorted({int(n.split(".")[0]) for n in storage.list_files(self.wal_dir)})

    def _snapshots(self) -> list[int]:
        return sorted(int(n.split(".")[0]) for n in storage.list_files(self.snapshot_dir, ".parquet"))

    def _segment_location(self, segment: int) -> str:
        return storage.join(self.wal_dir, f"{segment:010d}.jsonl")


def _parse_lines(data: bytes, name: str) -> list[Event]:
    events = []
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            events.append(Event(**json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            # Only the very last line can be torn (a crash mid-write before the ack was sent).
            if i >= len(lines) - 2:
                log.warning("ignoring a torn last record in log segment %s (never acknowledged)", name)
            else:
                raise
    return events

"""Durable profile state of one shard: a write-ahead log of accepted events plus snapshots.

Layout under the service's state location (a local folder or any pyarrow.fs URI):

    shard-0003/wal/0000000007.jsonl        events accepted since snapshot 7, one JSON per line
    shard-0003/wal/0000000007.000002.jsonl on object stores: the 2nd append of segment 7
    shard-0003/snapshot/0000000007.parquet profile states of every user after segment 6
    shard-0003/snapshot/0000000007.tombstones.parquet  what the shard keeps of forgotten users
    shard-0003/RETIRED                     present while the shard's users move to another layout

An event is in the log (fsync'd on local disks, a completed put on object stores) before the
caller acknowledges it. Recovery loads the newest snapshot and replays the segments after it;
the log, not the actor's memory, is the source of truth.

Local disks append to one file per segment; new files and folders are fsync'd into their folder
too. Objects cannot be appended to, so each append is a new object, numbered from 1 within its
segment; a reopened store continues after the highest part it finds, so an object holding
acknowledged events is never written again.

A crash or a failed write can leave part of a record (no newline yet) at the end of the local
segment; it was never acknowledged. An append that fails cuts the file back to its length before
the append, and a store that opens a segment to append to cuts a torn tail off first, so the
next records never follow a partial one. Reading tolerates a torn last line of a file (logged),
and nowhere else: a bad record before the last line is corruption and fails the recovery.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from typing import Iterable, Optional

import pyarrow as pa
import pyarrow.fs as pafs
from profilerec.data import storage
from profilerec.data.schema import Event

log = logging.getLogger(__name__)


class ShardStore:
    """Write-ahead log and snapshots of one shard under `root`."""

    def __init__(self, root: str, shard: int):
        self.root = storage.join(root, f"shard-{shard:04d}")
        self.wal_dir = storage.join(self.root, "wal")
        self.snapshot_dir = storage.join(self.root, "snapshot")
        self.fs, _ = storage.resolve(self.root)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        storage.makedirs(self.wal_dir, durable=True)
        storage.makedirs(self.snapshot_dir, durable=True)
        segments = self._segments()
        snapshots = self._snapshots()
        self.segment = max(segments[-1] if segments else 0, snapshots[-1] if snapshots else 0)
        self.retired = storage.exists(self._retired_marker())  # read once: checked on every write
        # object stores: one object per append inside the current segment, the last one written
        self.part = 0 if self.local else self._last_part(self.segment)
        # local disks: the segment whose file this store has fsync'd into the wal folder
        self._synced_segment: Optional[int] = None
        self._torn = False  # local disks: the segment file may end in part of a record
        if self.local:
            self._cut_torn_tail()

    # -- writing ------------------------------------------------------------------------------

    def append(self, events: Iterable[Event]) -> None:
        """Make `events` durable in the log (returns only once they are on stable storage)."""
        payload = "".join(json.dumps(asdict(e), separators=(",", ":")) + "\n" for e in events).encode()
        if not payload:
            return
        if self.local:
            self._append_local(payload)
        else:
            # counted before the put: a put that failed may still have landed, and must not be
            # overwritten by the next one
            self.part += 1
            storage.write_bytes(payload, storage.join(self.wal_dir, f"{self.segment:010d}.{self.part:06d}.jsonl"))

    def _append_local(self, payload: bytes) -> None:
        if self._torn:
            self._cut_torn_tail()
        _, path = storage.resolve(self._segment_location(self.segment))
        # unbuffered: nothing of a failed write is left in a buffer to be flushed after the cut
        with open(path, "ab", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            try:
                _write_all(f, payload)
                os.fsync(f.fileno())
                if self._synced_segment != self.segment:
                    # the file's own fsync does not make its name in the folder durable; done once
                    # per segment file and store, which covers a file an earlier process created
                    storage.fsync_dir(os.path.dirname(path))
                    self._synced_segment = self.segment
            except BaseException:
                self._cut_back(f, size)
                raise

    def _cut_back(self, f, size: int) -> None:
        """Remove what a refused append wrote, so the next records do not follow a partial one."""
        try:
            os.ftruncate(f.fileno(), size)
        except OSError as e:
            log.error("cannot cut log segment %s back after a failed append (%s); retrying before the "
                      "next append", self._segment_location(self.segment), e)
            self._torn = True

    def _cut_torn_tail(self) -> None:
        """Cut the local segment file back to its last complete record (see the module docstring)."""
        _, path = storage.resolve(self._segment_location(self.segment))
        try:
            f = open(path, "r+b", buffering=0)
        except FileNotFoundError:
            self._torn = False
            return
        with f:
            size = os.fstat(f.fileno()).st_size
            end = _complete_length(f.fileno(), size)
            if end < size:
                os.ftruncate(f.fileno(), end)
                os.fsync(f.fileno())
                log.warning("dropped the last %d bytes of log segment %s: part of a record that was never "
                            "acknowledged (a crash or a failed write)", size - end, path)
        self._torn = False

    def write_snapshot(self, table: pa.Table, tombstones: Optional[pa.Table] = None) -> None:
        """Persist the shard's whole state (and its tombstones) and drop the log segments it covers."""
        next_segment = self.segment + 1
        if tombstones is not None and tombstones.num_rows:
            # first: the snapshot file's presence is what makes the pair the newest one
            storage.write_table(tombstones, self._tombstones_location(next_segment), durable=True)
        storage.write_table(table, self._snapshot_location(next_segment), durable=True)
        # The snapshot is complete before anything it covers is removed, so a crash in between
        # only leaves segments that replay as duplicates (ignored by event id).
        for name in storage.list_files(self.wal_dir):
            if int(name.split(".")[0]) < next_segment:
                storage.delete(storage.join(self.wal_dir, name))
        for name in storage.list_files(self.snapshot_dir, ".parquet"):
            if int(name.split(".")[0]) < next_segment:
                storage.delete(storage.join(self.snapshot_dir, name))
        self.segment, self.part = next_segment, 0

    def mark_retired(self) -> None:
        """Record durably that the shard takes no more writes (see shard.py)."""
        storage.write_bytes(b"", self._retired_marker(), durable=True)
        self.retired = True

    def clear_retired(self) -> None:
        """Undo mark_retired."""
        storage.delete(self._retired_marker())
        if self.local:
            storage.fsync_dir(storage.resolve(self.root)[1])
        self.retired = False

    # -- reading ------------------------------------------------------------------------------

    def load(self) -> tuple[Optional[pa.Table], Optional[pa.Table], list[Event]]:
        """The newest snapshot and its tombstones (each None when there is none), and the logged
        events after it, in log order."""
        snapshots = self._snapshots()
        snapshot = tombstones = None
        start = 0
        if snapshots:
            start = snapshots[-1]
            snapshot = storage.read_table(self._snapshot_location(start))
            if storage.exists(self._tombstones_location(start)):
                tombstones = storage.read_table(self._tombstones_location(start))
        events = []
        for name in storage.list_files(self.wal_dir):
            if int(name.split(".")[0]) >= start:
                events.extend(_parse_lines(storage.read_bytes(storage.join(self.wal_dir, name)), name))
        return snapshot, tombstones, events

    def _segments(self) -> list[int]:
        return sorted({int(n.split(".")[0]) for n in storage.list_files(self.wal_dir)})

    def _snapshots(self) -> list[int]:
        names = storage.list_files(self.snapshot_dir, ".parquet")
        return sorted(int(n.split(".")[0]) for n in names if n.count(".") == 1)

    def _snapshot_location(self, segment: int) -> str:
        return storage.join(self.snapshot_dir, f"{segment:010d}.parquet")

    def _tombstones_location(self, segment: int) -> str:
        return storage.join(self.snapshot_dir, f"{segment:010d}.tombstones.parquet")

    def _retired_marker(self) -> str:
        return storage.join(self.root, "RETIRED")

    def _last_part(self, segment: int) -> int:
        """The highest part of `segment` in the log (`<segment>.<part>.jsonl`), 0 when none."""
        names = (n.split(".") for n in storage.list_files(self.wal_dir, ".jsonl"))
        return max((int(p[1]) for p in names if len(p) == 3 and int(p[0]) == segment), default=0)

    def _segment_location(self, segment: int) -> str:
        return storage.join(self.wal_dir, f"{segment:010d}.jsonl")


def _write_all(f, data: bytes) -> None:
    view = memoryview(data)
    while view:  # a raw file may take only part of the data per call
        view = view[f.write(view):]


def _complete_length(fd: int, size: int) -> int:
    """The length of a log file's complete records: up to and including its last newline."""
    end = size
    while end > 0:
        start = max(0, end - (1 << 16))
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        end = start
    return 0


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

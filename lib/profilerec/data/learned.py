"""What the service learns while it runs, kept durably: new items and new event texts, each with
the vector the Encoder deployment gave it.

    <state_dir>/items/<time ns>-<random>.parquet    one file per PUT /v1/items (ITEMS_SCHEMA + vector)
    <state_dir>/texts/<time ns>-<random>.parquet    event texts the encode job had not encoded
                                                    (text_hash + vector)

A file is written durably before the request that made it is answered. Every process that scores
or checks items and texts (ingress replicas, shard actors, a restarted shard) starts from the
prepared catalog and the encode job's output and applies the files it has not seen yet, in name
order, so what was learned survives restarts and redeploys without re-encoding. Names start with
the write time, so concurrent writers never collide and files sort in the order they were written.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import Iterator

import numpy as np
import pyarrow as pa
from profilerec.data import storage
from profilerec.data.vectors import vectors_from_arrow

ITEMS_LOG = "items"
TEXTS_LOG = "texts"


class VectorLog:
    """One append-only log of (rows, vectors) under a service state folder, and which of its
    files this process has applied."""

    def __init__(self, state_dir: str, name: str):
        self.root = storage.join(state_dir, name)
        self.applied: set[str] = set()
        # a hash of the file names in the order applied: two processes with the same fingerprint
        # applied the same files in the same order, so their item indexes have the same rows
        self.fingerprint = 0

    def _applied(self, name: str) -> None:
        self.applied.add(name)
        digest = hashlib.blake2b(self.fingerprint.to_bytes(8, "little") + name.encode(), digest_size=8).digest()
        self.fingerprint = int.from_bytes(digest, "little")

    def append(self, rows: pa.Table, vectors: np.ndarray) -> str:
        """Write `rows` with their `vectors` durably; returns the file name. The writer applies the
        file like any other, through unapplied(): so every process applies the files in name order,
        and processes that applied the same files have the same fingerprint."""
        flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
        table = rows.append_column("vector", pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1]))
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        storage.write_table(table, storage.join(self.root, name), durable=True)
        return name

    def unapplied(self) -> Iterator[tuple[pa.Table, np.ndarray]]:
        """(rows, vectors) of each file not applied yet, oldest first; marks them applied."""
        for name in storage.list_files(self.root, ".parquet"):
            if name in self.applied:
                continue
            table = storage.read_table(storage.join(self.root, name))
            self._applied(name)
            yield table.drop_columns(["vector"]), vectors_from_arrow(table.column("vector"))

"""Items added or changed while the service runs: a durable log of item batches.

    <state_dir>/items/<time ns>-<random>.parquet    one file per PUT /v1/items

Each file holds ITEMS_SCHEMA columns plus the encoded `vector`, written durably before the PUT is
answered. Every process that scores or checks items (ingress replicas, shard actors, a restarted
shard) starts from the prepared catalog and applies the files it has not seen yet, in name order,
so added items survive restarts and redeploys without re-encoding. Names start with the write
time, so concurrent writers never collide and files sort in the order they were written.
"""

from __future__ import annotations

import time
import uuid
from typing import Iterator

import numpy as np
import pyarrow as pa

from profilerec import storage
from profilerec.embeddings import vectors_from_arrow
from profilerec.schema import ITEMS_SCHEMA

CATALOG_DIR = "items"


def catalog_table(items: pa.Table, vectors: np.ndarray) -> pa.Table:
    """ITEMS_SCHEMA rows with their vectors, as one catalog file holds them."""
    dim = vectors.shape[1]
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    return items.append_column("vector", pa.FixedSizeListArray.from_arrays(flat, dim))


class ItemCatalog:
    """The item log under one service state folder, and which of its files this process applied."""

    def __init__(self, state_dir: str):
        self.root = storage.join(state_dir, CATALOG_DIR)
        self.applied: set[str] = set()

    def append(self, items: pa.Table, vectors: np.ndarray) -> str:
        """Write a batch of items (ITEMS_SCHEMA) with their vectors durably; returns the file name.
        The writer counts it as applied: it updates its own index itself."""
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        storage.write_table(catalog_table(items.select(ITEMS_SCHEMA.names), vectors), storage.join(self.root, name),
                            durable=True)
        self.applied.add(name)
        return name

    def unapplied(self) -> Iterator[tuple[pa.Table, np.ndarray]]:
        """(items, vectors) of each file not applied yet, oldest first; marks them applied."""
        for name in storage.list_files(self.root, ".parquet"):
            if name in self.applied:
                continue
            table = storage.read_table(storage.join(self.root, name))
            self.applied.add(name)
            yield table.select(ITEMS_SCHEMA.names), vectors_from_arrow(table.column("vector"))

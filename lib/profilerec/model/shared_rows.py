"""Matrices of float32 rows (and Arrow tables) that the processes of a node share, and room to
add rows to the matrices.

A large catalog's item vectors (a million items of 384 floats: 1.5 GB) would be copied into every
shard and replica. Here the first process of a node that needs a matrix writes it to a `.npy` file
in the node's private temp folder (data/node_files.py: made once, kept while a process uses it);
every process maps that file copy-on-write, so the pages live once in the page cache.
Items added or changed while serving write into the map: only those pages become private to the
process. The file holds spare rows past the matrix for the items
added later; when they run out, the process grows a private copy.

An Arrow table (a large catalog's titles, brands and categories) is shared the same way, as an
Arrow IPC file that every process maps: its columns are read from the page cache, never copied.

A file is named after what it was made from (the caller's key), so a new encode or a retrained
scorer gets a new file; the old one is removed once no process uses it (node_files.py).
"""

from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np
import pyarrow as pa
from profilerec.data import node_files


def spare_rows(rows: int) -> int:
    """Rows kept free past a matrix of `rows` for items added later."""
    return max(1024, rows // 16)


def shared_rows(key: str, rows: int, dim: int, fill: Callable[[np.ndarray], None]) -> np.ndarray:
    """This node's copy-on-write map of the [rows, dim] float32 matrix named `key`, which `fill`
    writes into the array it is given when no process of the node made it yet (straight into the
    file: the matrix is never held in memory besides). Its first rows are the matrix, the rest
    room for rows added later (set_rows); the caller knows how many rows the matrix has."""

    def write(partial: str) -> None:
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=(rows + spare_rows(rows), dim))
        fill(out[:rows])
        out.flush()

    path = node_files.node_file(f"rows-{key}.npy", write)
    # a plain view of the map: slicing a np.memmap makes a memmap object per slice
    return np.asarray(np.load(path, mmap_mode="c"))


def shared_table(key: str, make: Callable[[], pa.Table]) -> pa.Table:
    """This node's map of the Arrow table named `key`, made with `make` when no process of the
    node made it yet."""

    def write(partial: str) -> None:
        table = make()
        with pa.OSFile(partial, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)

    path = node_files.node_file(f"table-{key}.arrow", write)
    # the table's buffers keep the map open after the function returns
    return pa.ipc.open_file(pa.memory_map(path, "r")).read_all()


def table_digest(table: pa.Table) -> str:
    """A hex digest of a table's schema and values (its Arrow IPC stream), to name its shared file."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.blake2b(sink.getvalue(), digest_size=12).hexdigest()


def set_rows(store: np.ndarray, used: int, rows: list[int], vectors: np.ndarray) -> tuple[np.ndarray, int]:
    """Write `vectors` at `rows` of the matrix `store[:used]`: a row below `used` is replaced, the
    others are appended (they must be used, used + 1, ...). Returns (store, used) after: the same
    store while it has room, else a private copy with room again."""
    grown = max([used] + [r + 1 for r in rows])
    if grown > len(store):
        bigger = np.empty((grown + spare_rows(grown), store.shape[1]), dtype=np.float32)
        bigger[:used] = store[:used]
        store = bigger
    store[np.asarray(rows, dtype=np.int64)] = vectors
    return store, grown

"""Event-text vectors by text hash, held at a few bytes per text in each process that uses them.

Event texts (search queries, review texts) grow without bound: the encode job may leave millions
of vectors, and every profile shard needs all of them, because any user may send any text. Held as
a dict of arrays, every shard paid for each vector again, and for Python objects around it
(bench/text_memory.py measures both ways; its figures are in docs/benchmarks.md). Here the vectors
of an embeddings folder are copied once per node into a local `.f32` file (hashes beside it in a
`.npy`; data/node_files.py) and memory-mapped read-only: the pages live in the page cache, shared by every
shard on the node and dropped under memory pressure, and a process keeps only the sorted 12-byte
hashes and their row numbers (20 bytes per text). Texts learned while serving are few and stay in
a dict on top.

The local copy is named after the embeddings folder's files (paths, sizes, modification times), so
a re-run of the encode job gets a new copy (and the old one goes once no process uses it); copies
are written under a temporary name and renamed, so shards starting together never read a
half-written file.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

import numpy as np
from profilerec.data import node_files, storage
from profilerec.data.vectors import vectors_from_arrow

KEY_BYTES = 12  # text_hash is a blake2b-96 hex digest
SCAN_ROWS = 65_536
KEYS_FILE, VECTORS_FILE = "keys.npy", "vectors.f32"  # in the node's copy of an embeddings folder


class TextVectors:
    """Unit vectors of event texts by `text_hash` (read-only file rows plus learned ones)."""

    def __init__(self, keys: np.ndarray, vectors: np.ndarray):
        """`keys`: [n] S12 raw hashes, the hash of row i of `vectors` ([n, D], usually a memory map)."""
        raw = np.frombuffer(keys.tobytes(), dtype=np.uint8).reshape(len(keys), KEY_BYTES)
        high = raw[:, :8].copy().view(">u8").ravel().astype(np.uint64)
        low = raw[:, 8:].copy().view(">u4").ravel().astype(np.uint32)
        # sorted by (high, low) for a binary search on one uint64 array (lookup time: bench/text_memory.py)
        self._rows = np.lexsort((low, high))
        self._high, self._low = high[self._rows], low[self._rows]
        self._vectors = np.asarray(vectors)  # a plain view: slicing a np.memmap makes a memmap object per row
        self._learned: dict[str, np.ndarray] = {}

    def get(self, text_hash: str) -> Optional[np.ndarray]:
        """The vector of the text with this hash, or None when it was never encoded."""
        learned = self._learned.get(text_hash)
        if learned is not None:
            return learned
        high, low = int(text_hash[:16], 16), int(text_hash[16:], 16)  # the big-endian halves of the digest
        at = int(self._high.searchsorted(np.uint64(high)))
        while at < len(self._high) and int(self._high[at]) == high:
            if int(self._low[at]) == low:
                return self._vectors[self._rows[at]]
            at += 1
        return None

    def __contains__(self, text_hash: str) -> bool:
        return self.get(text_hash) is not None

    def __len__(self) -> int:
        return len(self._high) + len(self._learned)

    def update(self, pairs: Iterable[tuple[str, np.ndarray]]) -> None:
        """Add texts learned while serving (hash, vector); a known hash keeps its vector."""
        for text_hash, vector in pairs:
            if text_hash not in self:
                self._learned[text_hash] = np.asarray(vector, dtype=np.float32)


def _raw_keys(hashes: Iterable[str]) -> np.ndarray:
    return np.array([bytes.fromhex(h) for h in hashes], dtype=f"S{KEY_BYTES}")


def empty_text_vectors() -> TextVectors:
    """A store with no texts (learned ones may be added)."""
    return TextVectors(_raw_keys([]), np.zeros((0, 0), np.float32))


def load_text_vectors(location: str, cache_dir: Optional[str] = None) -> TextVectors:
    """The texts of the embeddings table folder at `location` ((text_hash, vector) Parquet, local
    or remote), memory-mapped from this node's copy in `cache_dir` (default: a private folder of
    the temp dir), made on first use."""
    if not storage.exists(location):
        return empty_text_vectors()
    copy = node_files.node_file(f"texts-{storage.fingerprint(location)}",
                                lambda partial: _copy_to_node(location, partial), cache_dir)
    keys = np.load(os.path.join(copy, KEYS_FILE))
    path = os.path.join(copy, VECTORS_FILE)
    size = os.path.getsize(path)
    if not len(keys) or not size:
        return empty_text_vectors()
    vectors = np.memmap(path, dtype=np.float32, mode="r", shape=(len(keys), size // 4 // len(keys)))
    return TextVectors(keys, vectors)


def _copy_to_node(location: str, folder: str) -> None:
    """Stream the folder's rows into `folder`: KEYS_FILE (hashes) and VECTORS_FILE (float32 rows in
    the same order), one chunk at a time."""
    os.makedirs(folder)
    keys = []
    with open(os.path.join(folder, VECTORS_FILE), "wb") as out:
        for table in storage.iter_tables(location, SCAN_ROWS, columns=["text_hash", "vector"]):
            keys.append(_raw_keys(table.column("text_hash").to_pylist()))
            out.write(vectors_from_arrow(table.column("vector")).tobytes())
    np.save(os.path.join(folder, KEYS_FILE), np.concatenate(keys) if keys else _raw_keys([]))

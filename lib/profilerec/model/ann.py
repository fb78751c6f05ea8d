"""The nearest-neighbour index over item vectors: an HNSW graph of faiss (faiss-cpu), by inner product.

`profilerec index` builds it over the vectors the scorer compares user vectors with and writes it
to a folder with the item ids of its rows, a sample of the vectors it was built from (so a server
can tell that the model changed since) and a manifest. A server opens the file memory-mapped,
vectors and graph: they stay in the page cache, shared by every process of the node that opens
the same file.

faiss is the field's standard; the choice against usearch (and why not hnswlib) is measured by
bench/ann_choice.py, see docs/benchmarks.md. What decided it: a search can be restricted to a set
of rows (brand and category filters search among the allowed items instead of filtering a longer
list), and the file opens memory-mapped.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any, Optional

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from profilerec.data import storage
from profilerec.errors import DataError

INDEX_FILE = "items.faiss"
IDS_FILE = "item_ids.parquet"
SAMPLE_FILE = "sample.npy"  # rows of the vectors the index was built from, at SAMPLE_ROWS
MANIFEST_FILE = "manifest.json"
SAMPLE_SIZE = 1000
MAX_FILTERED_BREADTH = 4096  # the most candidates a filtered search looks at (retrieval.py searches
# a small allowed set exactly instead)


@dataclass
class HnswIndex:
    """An HNSW index over item rows [0, size), searched by inner product (retrieval.NearestItems)."""

    index: Any  # faiss.IndexHNSWFlat
    expansion_search: int

    @property
    def size(self) -> int:
        """Rows indexed."""
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, n: int, allowed: Optional[np.ndarray] = None) -> np.ndarray:
        """[B, n] rows by decreasing inner product, among the `allowed` rows when given; -1 where
        the search found fewer."""
        # the graph search keeps at least n candidates whatever efSearch says
        breadth = max(self.expansion_search, n)
        params = faiss.SearchParametersHNSW(efSearch=breadth)
        if allowed is not None:
            # the graph is walked through disallowed items too: look at as many more as they dilute
            # the allowed ones, or a selective filter finds fewer of its nearest items
            share = max(len(allowed) / max(self.size, 1), 1e-6)
            breadth = int(min(breadth / share, MAX_FILTERED_BREADTH))
            selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
            params = faiss.SearchParametersHNSW(efSearch=breadth, sel=selector)
        _, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), n, params=params)
        return rows.astype(np.int64, copy=False)


def build_hnsw(vectors: np.ndarray, connectivity: int, expansion_add: int, expansion_search: int,
               threads: Optional[int] = None) -> HnswIndex:
    """An HNSW index over `vectors` ([items, D] float32; row i = item row i)."""
    if threads:
        faiss.omp_set_num_threads(threads)
    index = faiss.IndexHNSWFlat(vectors.shape[1], connectivity, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = expansion_add
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return HnswIndex(index, expansion_search)


def sample_rows(n: int) -> np.ndarray:
    """The rows whose vectors are kept with an index, evenly spread over the `n` rows."""
    return np.unique(np.linspace(0, max(n - 1, 0), min(n, SAMPLE_SIZE)).astype(np.int64))


def write_index(index: HnswIndex, folder: str, item_ids: list[str], vectors: np.ndarray,
                manifest: dict[str, Any]) -> dict[str, Any]:
    """The index, its rows' item ids, a sample of `vectors` and the manifest in `folder` (a path or
    a bucket URI); returns the manifest written. The manifest goes in last, so a server never
    opens half an index, and names the build, so a server's local copy of a bucket's index is
    never a stale one."""
    manifest = {**manifest, "expansion_search": index.expansion_search, "build_id": uuid.uuid4().hex}
    local = storage.local_dir(folder) if not storage.is_uri(folder) else tempfile.mkdtemp(prefix="profilerec-index-")
    os.makedirs(local, exist_ok=True)
    files = {INDEX_FILE: lambda path: faiss.write_index(index.index, path),
             IDS_FILE: lambda path: pq.write_table(pa.table({"item_id": pa.array(item_ids, pa.string())}), path),
             SAMPLE_FILE: lambda path: _save_array(vectors[sample_rows(len(vectors))], path)}
    for name, write in files.items():
        temporary = os.path.join(local, f".{name}.tmp")
        write(temporary)
        os.replace(temporary, os.path.join(local, name))  # a server reading the old file keeps its copy
    if storage.is_uri(folder):
        storage.upload_dir(local, folder)
        shutil.rmtree(local)
    storage.write_json(manifest, storage.join(folder, MANIFEST_FILE))
    return manifest


def _save_array(array: np.ndarray, path: str) -> None:
    with open(path, "wb") as f:  # np.save given a name would add .npy to it
        np.save(f, array)


def index_exists(folder: Optional[str]) -> bool:
    """Whether `folder` holds a complete index."""
    return bool(folder) and storage.exists(storage.join(folder, MANIFEST_FILE))


def read_index(folder: str, item_ids: list[str], vectors: np.ndarray) -> HnswIndex:
    """The index in `folder`, memory-mapped (from a node-local copy when `folder` is in a bucket),
    after checking that it indexes these items' vectors: its rows must be the first rows of
    `item_ids` (items added since are searched apart), and its sample rows must match `vectors`
    (else the model or the embeddings changed since the build)."""
    manifest = storage.read_json(storage.join(folder, MANIFEST_FILE))
    local = _node_copy(folder, manifest["build_id"])
    built_ids = pq.read_table(os.path.join(local, IDS_FILE)).column("item_id").to_pylist()
    rebuild = f"run `profilerec index` again (output {folder})"
    if built_ids != item_ids[: len(built_ids)]:
        raise DataError(f"the index in {folder} was built for another catalog: {rebuild}")
    sample = np.load(os.path.join(local, SAMPLE_FILE))
    rows = sample_rows(len(built_ids))
    if sample.shape != (len(rows), vectors.shape[1]) or not np.allclose(sample, vectors[rows], atol=1e-4):
        raise DataError(f"the index in {folder} was built from other item vectors (the model or the "
                        f"embeddings changed since): {rebuild}")
    index = faiss.read_index(os.path.join(local, INDEX_FILE), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_MMAP_IFC)
    return HnswIndex(index, int(manifest["expansion_search"]))


def _node_copy(folder: str, build_id: str) -> str:
    """A local folder with the index files: `folder` itself when local, else a copy made once per
    node and build (written under a temporary name and renamed: replicas starting together)."""
    if not storage.is_uri(folder):
        return storage.local_dir(folder)
    copy = os.path.join(storage.node_private_dir(), f"index-{build_id}")
    if not os.path.isdir(copy):
        fs, path = storage.resolve(folder)
        temporary = f"{copy}.tmp-{uuid.uuid4().hex[:8]}"
        pafs.copy_files(path, temporary, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        os.replace(temporary, copy)
    return copy

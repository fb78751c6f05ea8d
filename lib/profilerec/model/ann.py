"""The nearest-neighbour index over item vectors: an inverted-file index of faiss (faiss-cpu) with
4-bit product-quantised codes scanned by SIMD lookups (IVF-PQ fast-scan), and an exact rerank.

The vectors are split into `lists` clusters (spherical k-means on a sample); a search compares the
query with the cluster centres, scans the codes of the `probes` nearest clusters for the
rerank_fetch(n) best by approximate inner product, and reranks those by the exact inner product
with the vectors themselves (the caller's node-shared item matrix), keeping the n best. The codes
(half a byte per two dimensions) are a sixteenth of the vectors' size and scan several times
faster than the vectors themselves at the same recall (docs/benchmarks.md). `profilerec index`
builds it over the vectors the scorer compares user vectors with, chooses `probes` by measuring
recall on a sample of user-like queries, and writes it to a folder with the item ids of its rows,
a sample of the vectors it was built from (so a server can tell that the model changed since) and
a manifest. A server opens the file memory-mapped.

Why this index, of faiss, against faiss's HNSW graph and usearch's (hnswlib has no wheel here):
bench/ann_choice.py, figures in docs/benchmarks.md. On catalogs grown from real item embeddings,
dense clusters of near-duplicates, a graph's recall fell as the catalog grew to a million items
where the clusters' scan kept it; a filtered search only skips rows while scanning, where a graph
walk through disallowed items loses its way; and the file opens memory-mapped.
"""

from __future__ import annotations

import math
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
from profilerec.data import node_files, storage
from profilerec.errors import DataError

INDEX_FILE = "items.faiss"
IDS_FILE = "item_ids.parquet"
SAMPLE_FILE = "sample.npy"  # rows of the vectors the index was built from, at sample_rows()
MANIFEST_FILE = "manifest.json"
BUILDS_DIR = "builds"  # one folder per build, named by its build_id (write_index)
SAMPLE_SIZE = 1000
TRAINING_POINTS_PER_LIST = 64  # k-means sample: enough per cluster for stable centres
KMEANS_ROUNDS = 10
# candidates read from the codes and reranked exactly: RERANK_FETCH per item returned, at least
# RERANK_MIN (the codes' order is rough enough that even a top 10 needs a few hundred reranked).
# Reading more of the scanned clusters' codes buys less recall than scanning more clusters, for
# the same time per search (docs/benchmarks.md)
RERANK_FETCH = 3
RERANK_MIN = 300


@dataclass
class IvfIndex:
    """An IVF index over item rows [0, size), searched by inner product (retrieval.NearestItems).
    `rerank`: the vectors of the rows (at least `size` of them) that the codes' candidates are
    reranked by; None ranks by the codes alone (while choosing nothing but clusters)."""

    index: Any  # faiss.IndexIVFPQFastScan
    probes: int
    rerank: Optional[np.ndarray] = None

    @property
    def size(self) -> int:
        """Rows indexed."""
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, n: int, allowed: Optional[np.ndarray] = None,
               probes: Optional[int] = None) -> np.ndarray:
        """[B, n] rows by decreasing inner product, among the `allowed` rows when given; -1 where
        the scanned clusters held fewer. `probes` overrides the index's own."""
        probes = probes or self.probes
        params = faiss.SearchParametersIVF(nprobe=probes)
        if allowed is not None:
            # a cluster holds allowed items in proportion to the filter's share: scan as many more
            # clusters, or a selective filter finds fewer of its nearest items
            share = max(len(allowed) / max(self.size, 1), 1e-9)
            wider = min(self.index.nlist, math.ceil(probes / share))
            selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, dtype=np.int64))
            params = faiss.SearchParametersIVF(nprobe=wider, sel=selector)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        fetch = n if self.rerank is None else rerank_fetch(n)
        _, rows = self.index.search(queries, fetch, params=params)
        rows = rows.astype(np.int64, copy=False)
        return rows if self.rerank is None else exact_rerank(rows, queries, self.rerank, n)


def rerank_fetch(n: int) -> int:
    """How many candidates to read from the codes for `n` reranked rows."""
    return max(n * RERANK_FETCH, RERANK_MIN)


def exact_rerank(rows: np.ndarray, queries: np.ndarray, vectors: np.ndarray, n: int) -> np.ndarray:
    """[B, n] of each query's `rows` (-1: none) ordered by the exact inner product with `vectors`,
    the n best, -1 past the rows found."""
    out = np.full((len(rows), n), -1, dtype=np.int64)
    for b, found in enumerate(rows):
        found = found[found >= 0]
        scores = vectors[found] @ queries[b]
        best = found[np.argsort(-scores, kind="stable")[:n]]
        out[b, :len(best)] = best
    return out


def default_lists(n: int) -> int:
    """Clusters for `n` vectors: about 4 sqrt(n) (faiss's guideline), and no more than leave each
    its k-means sample."""
    return max(1, min(int(round(4 * math.sqrt(n))), n // TRAINING_POINTS_PER_LIST))


def build_ivf(vectors: np.ndarray, lists: Optional[int] = None, probes: int = 32,
              threads: Optional[int] = None, seed: int = 0) -> IvfIndex:
    """An IVF-PQ fast-scan index over `vectors` ([items, D] float32; row i = item row i) with
    `lists` clusters (default_lists when None), searching `probes` of them, reranking by `vectors`."""
    if threads:
        faiss.omp_set_num_threads(threads)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    lists = lists or default_lists(len(vectors))
    dim = vectors.shape[1]
    # 4-bit codes of 2-dimension sub-vectors (of 1 for an odd dimension): fine enough that an exact
    # rerank of rerank_fetch(n) candidates keeps the clusters' recall
    index = faiss.IndexIVFPQFastScan(faiss.IndexFlatIP(dim), dim, lists, dim // 2 if dim % 2 == 0 else dim, 4,
                                     faiss.METRIC_INNER_PRODUCT)
    index.cp.spherical = True  # unit vectors compared by inner product: unit centres
    # fewer k-means rounds than faiss's default: the index job chooses the probes by measured recall,
    # so rougher clusters cost a few more probes, not recall, and the build takes a fraction
    index.cp.niter = KMEANS_ROUNDS
    index.cp.seed = seed
    sample = np.random.default_rng(seed).choice(len(vectors), min(len(vectors), TRAINING_POINTS_PER_LIST * lists),
                                                replace=False)
    index.train(vectors[np.sort(sample)])  # the codebooks take a subsample of it themselves
    index.add(vectors)
    return IvfIndex(index, min(probes, lists), vectors)


def sample_rows(n: int) -> np.ndarray:
    """The rows whose vectors are kept with an index, evenly spread over the `n` rows."""
    return np.unique(np.linspace(0, max(n - 1, 0), min(n, SAMPLE_SIZE)).astype(np.int64))


def write_index(index: IvfIndex, folder: str, item_ids: list[str], vectors: np.ndarray,
                manifest: dict[str, Any]) -> dict[str, Any]:
    """The index, its rows' item ids, a sample of `vectors` and the manifest in `folder` (a path or
    a bucket URI); returns the manifest written.

    Each build's files go in a folder of their own (`builds/<build_id>`, the manifest's `files`),
    and the manifest, written last, names the build: a server reads the files of the build whose
    manifest it read, never a mix of two builds, and never half a build. The previous build stays
    (a server may have read its manifest just before) and older ones are removed."""
    build_id = uuid.uuid4().hex
    files = f"{BUILDS_DIR}/{build_id}"
    manifest = {**manifest, "lists": int(index.index.nlist), "probes": index.probes, "build_id": build_id,
                "files": files}
    local = storage.local_dir(storage.join(folder, files)) if not storage.is_uri(folder) \
        else tempfile.mkdtemp(prefix="profilerec-index-")
    os.makedirs(local, exist_ok=True)
    faiss.write_index(index.index, os.path.join(local, INDEX_FILE))
    pq.write_table(pa.table({"item_id": pa.array(item_ids, pa.string())}), os.path.join(local, IDS_FILE))
    _save_array(vectors[sample_rows(len(vectors))], os.path.join(local, SAMPLE_FILE))
    if storage.is_uri(folder):
        storage.upload_dir(local, storage.join(folder, files))
        shutil.rmtree(local)
    previous = read_manifest(folder).get("build_id") if index_exists(folder) else None
    storage.write_json(manifest, storage.join(folder, MANIFEST_FILE))
    for old in set(storage.list_folders(storage.join(folder, BUILDS_DIR))) - {build_id, previous}:
        storage.delete(storage.join(folder, BUILDS_DIR, old))
    return manifest


def _save_array(array: np.ndarray, path: str) -> None:
    with open(path, "wb") as f:  # np.save given a name would add .npy to it
        np.save(f, array)


def index_exists(folder: Optional[str]) -> bool:
    """Whether `folder` holds a complete index."""
    return bool(folder) and storage.exists(storage.join(folder, MANIFEST_FILE))


def read_manifest(folder: str) -> dict[str, Any]:
    """The manifest of the index in `folder` (its build_id names the build)."""
    return storage.read_json(storage.join(folder, MANIFEST_FILE))


def read_index(folder: str, item_ids: list[str], vectors: np.ndarray, manifest: Optional[dict[str, Any]] = None,
               changed: Optional[np.ndarray] = None) -> IvfIndex:
    """The index in `folder` (of `manifest`, else the one there now), memory-mapped (from a
    node-local copy when `folder` is in a bucket), after checking that it indexes these items'
    vectors: its rows must be the first rows of `item_ids` (items added since are searched apart),
    and its sample rows must match `vectors` but for the `changed` rows (changed since the build),
    else the model or the embeddings changed since the build."""
    manifest = manifest or read_manifest(folder)
    local = _node_copy(folder, manifest)
    built_ids = pq.read_table(os.path.join(local, IDS_FILE)).column("item_id").to_pylist()
    rebuild = f"run `profilerec index` again (output {folder})"
    if built_ids != item_ids[: len(built_ids)]:
        raise DataError(f"the index in {folder} was built for another catalog: {rebuild}")
    sample = np.load(os.path.join(local, SAMPLE_FILE))
    rows = sample_rows(len(built_ids))
    same = ~np.isin(rows, changed) if changed is not None else np.ones(len(rows), dtype=bool)
    if sample.shape != (len(rows), vectors.shape[1]) or not np.allclose(sample[same], vectors[rows[same]], atol=1e-4):
        raise DataError(f"the index in {folder} was built from other item vectors (the model or the "
                        f"embeddings changed since): {rebuild}")
    index = faiss.read_index(os.path.join(local, INDEX_FILE), faiss.IO_FLAG_MMAP_IFC)
    return IvfIndex(index, int(manifest["probes"]), vectors)


def _node_copy(folder: str, manifest: dict[str, Any]) -> str:
    """A local folder with the files of the build of `manifest`: in `folder` itself when local,
    else a copy made once per node and build (data/node_files.py). A manifest without `files`
    (an index written before builds had folders) has them at the top of `folder`."""
    files = storage.join(folder, manifest["files"]) if manifest.get("files") else folder
    if not storage.is_uri(folder):
        return storage.local_dir(files)

    def copy(partial: str) -> None:
        fs, path = storage.resolve(files)
        os.makedirs(partial)
        pafs.copy_files(path, partial, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())

    return node_files.node_file(f"index-{manifest['build_id']}", copy)

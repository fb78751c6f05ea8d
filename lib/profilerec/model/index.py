"""The item index: item ids, their text embeddings and metadata, filters, and top-K with exclusions.

The index turns scores (of every item, or of candidates: retrieval.py) into the K best allowed
items. Items can be
added or changed while serving (`upsert`), rows are never reordered, so a row number stays valid.
"""

from __future__ import annotations

import hashlib
from dataclasses import InitVar, dataclass, field
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
from profilerec.data import storage
from profilerec.data.vectors import item_embedding_chunks, vectors_from_arrow
from profilerec.errors import DataError
from profilerec.model.item_meta import ItemMeta, meta_table
from profilerec.model.shared_rows import set_rows, shared_rows, shared_table, table_digest


@dataclass
class ItemIndex:
    """Items in row order: `vectors[i]` is the unit text embedding of `item_ids[i]`.

    `vectors` may be given with more rows than items: the rows past them are room for items added
    later (a node-shared map, shared_rows.py); afterwards the attribute holds the items' rows only.
    Brands, categories and titles (Python values or Arrow arrays, optional) are held in `details`
    (item_meta.py).
    """

    item_ids: list[str]
    vectors: np.ndarray
    brands: InitVar[Optional[Sequence[Optional[str]]]] = None
    categories: InitVar[Optional[Sequence[Sequence[str]]]] = None
    titles: InitVar[Optional[Sequence[Optional[str]]]] = None
    details: ItemMeta = field(init=False)

    def __post_init__(self, brands, categories, titles) -> None:
        n = len(self.item_ids)
        self._store = np.ascontiguousarray(self.vectors, dtype=np.float32)  # the rows and the room after them
        self.vectors = self._store[:n]
        none = [None] * n
        self.details = ItemMeta(meta_table(none if brands is None else brands,
                                           none if categories is None else categories,
                                           none if titles is None else titles))
        if not (len(self.vectors) == len(self.details) == n):
            raise ValueError("item index columns have different lengths")
        self.rows = {item_id: i for i, item_id in enumerate(self.item_ids)}
        self.shared_key: Optional[str] = None  # the name of the node-shared map of its vectors (shared_index)

    def __len__(self) -> int:
        return len(self.item_ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.rows

    @property
    def dim(self) -> int:
        """Length of the item vectors."""
        return int(self.vectors.shape[1])

    def row(self, item_id: str) -> int:
        """Row of `item_id`, or -1 when the index does not have it."""
        return self.rows.get(item_id, -1)

    def vector(self, item_id: Optional[str]) -> Optional[np.ndarray]:
        """The text embedding of `item_id`, or None for an unknown or missing item."""
        row = self.rows.get(item_id, -1) if item_id is not None else -1
        return self.vectors[row] if row >= 0 else None

    def meta(self, item_id: str) -> Optional[dict[str, Any]]:
        """Brand, categories and title of an item (for profile counters and explanations)."""
        row = self.rows.get(item_id, -1)
        return self.details.get(row) if row >= 0 else None

    def title(self, row: int) -> Optional[str]:
        """The title of the item at `row`."""
        return self.details.title(row)

    def upsert(self, item_ids: Sequence[str], vectors: np.ndarray, brands: Sequence[Optional[str]],
               categories: Sequence[Sequence[str]], titles: Sequence[Optional[str]]) -> list[int]:
        """Add new items and replace changed ones in place; returns their rows."""
        rows = []
        for i, item_id in enumerate(item_ids):
            row = self.rows.get(item_id)
            if row is None:
                row = len(self.item_ids)
                self.rows[item_id] = row
                self.item_ids.append(item_id)
            self.details.set(row, brands[i], categories[i], titles[i])
            rows.append(row)
        self._store, used = set_rows(self._store, len(self.vectors), rows, np.asarray(vectors, dtype=np.float32))
        self.vectors = self._store[:used]
        return rows

    def allowed_rows(self, brand: Optional[str] = None, category: Optional[str] = None) -> Optional[np.ndarray]:
        """Sorted rows of the items matching the filters (case-insensitive), or None for no filter."""
        return self.details.rows_with(brand, category)

    def allowed(self, brand: Optional[str] = None, category: Optional[str] = None) -> Optional[np.ndarray]:
        """Boolean mask of items matching the filters (case-insensitive), or None for no filter."""
        rows = self.allowed_rows(brand, category)
        if rows is None:
            return None
        mask = np.zeros(len(self), dtype=bool)
        mask[rows] = True
        return mask

    def top_k(self, scores: np.ndarray, k: int, exclude_rows: Iterable[int] = (),
              allowed: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        """Rows and scores of the `k` best items, best first, skipping excluded and disallowed rows."""
        scores = np.array(scores, dtype=np.float32, copy=True)
        if allowed is not None:
            scores[~allowed] = -np.inf
        excluded = [r for r in exclude_rows if 0 <= r < len(scores)]
        scores[excluded] = -np.inf
        return best_rows(np.arange(len(scores)), scores, k)


def best_rows(rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` best of `rows` by their `scores` (-inf: never), best first, ties by row: the order
    every ranking of the project uses, full or two-stage."""
    k = min(k, int(np.isfinite(scores).sum()))
    if k <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    kth = -np.partition(-scores, k - 1)[k - 1]
    better = np.flatnonzero(scores > kth)
    tied = np.flatnonzero(scores == kth)  # the lowest rows of them make up the k, whatever the partition
    top = np.concatenate([better, tied[np.argsort(rows[tied], kind="stable")][: k - len(better)]])
    top = top[np.lexsort((rows[top], -scores[top]))]
    return rows[top], scores[top]


def index_from_tables(items: pa.Table, embeddings: pa.Table) -> ItemIndex:
    """An index over every item of `items`, with its vector from `embeddings` (item_id, vector).
    Vectorised with Arrow: a million items take no Python object per vector."""
    vectors = np.empty((items.num_rows, embeddings.column("vector").type.list_size), dtype=np.float32)
    fill_catalog_vectors(items.column("item_id"), [embeddings], vectors)
    return ItemIndex(items.column("item_id").to_pylist(), vectors, items.column("brand").to_pylist(),
                     items.column("categories").to_pylist(), items.column("title").to_pylist())


def fill_catalog_vectors(item_ids: pa.ChunkedArray, embeddings: Iterable[pa.Table], out: np.ndarray) -> None:
    """Write into `out` [items, D] the vector of each of `item_ids`, in their order, from the
    (item_id, vector) tables `embeddings` (one table, or a file's chunks read as they come: at a
    million items only `out` and one chunk are in memory). DataError naming items without one."""
    catalog = item_ids.combine_chunks() if isinstance(item_ids, pa.ChunkedArray) else item_ids
    # the catalog's ids hashed once for every chunk (pc.index_in hashes its value set on each call)
    rows_of = pd.Index(catalog.to_numpy(zero_copy_only=False))
    if not rows_of.is_unique:
        twice = rows_of[rows_of.duplicated()].unique()[:3].tolist()
        raise DataError(f"item ids appear twice in the catalog (e.g. {twice}): each item needs one row")
    found = np.zeros(len(out), dtype=bool)
    for table in embeddings:
        at = rows_of.get_indexer(table.column("item_id").to_numpy(zero_copy_only=False))
        known = at >= 0
        out[at[known]] = vectors_from_arrow(table.column("vector"))[known]
        found[at[known]] = True
    if not found.all():
        missing = np.flatnonzero(~found)
        examples = catalog.take(pa.array(missing[:3])).to_pylist()
        raise DataError(f"{len(missing)} items have no embedding (e.g. {examples}): run jobs/encode.py "
                        f"on these items")


EMBEDDING_CHUNK_ROWS = 1 << 16  # item vectors read at a time when a node's shared copy is made


def shared_index(items: pa.Table, embeddings: str) -> ItemIndex:
    """index_from_tables over the embeddings folder's item vectors, with the vectors and the item
    metadata held in this node's shared maps (shared_rows.py): the processes of a node that load
    the same catalog and embeddings hold them once, and the first of them reads the embeddings
    into the map a chunk at a time."""
    ids = items.column("item_id").to_pylist()
    digest = hashlib.blake2b("\n".join(ids).encode("utf-8"), digest_size=12)
    digest.update(storage.fingerprint(storage.join(embeddings, "items")).encode())
    key = f"items-{digest.hexdigest()}"
    dim, chunks = item_embedding_chunks(embeddings, EMBEDDING_CHUNK_ROWS)
    store = shared_rows(key, items.num_rows, dim, lambda out: fill_catalog_vectors(items.column("item_id"), chunks, out))
    meta = meta_table(items.column("brand"), items.column("categories"), items.column("title"))
    meta = shared_table(f"meta-{table_digest(meta)}", lambda: meta)
    index = ItemIndex(ids, store, meta.column("brand"), meta.column("categories"), meta.column("title"))
    index.shared_key = key
    return index

"""Item priors learned from the log: popularity (the cold-start ranking) and item-to-item
transitions (what users touch next), the extra signals the profile scorer adds to the profile."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa

from profilerec import storage
from profilerec.index import ItemIndex
from profilerec.schema import Event

log = logging.getLogger(__name__)

POPULARITY_FILE = "popularity.parquet"
TRANSITIONS_FILE = "transitions.parquet"


def write_priors(priors: "ItemPriors", index: ItemIndex, folder: str) -> None:
    """popularity.parquet (item_id, count) and transitions.parquet (item_id, next_item_id, count),
    keyed by item id so that they apply to any index over the same items."""
    rows = np.flatnonzero(priors.popularity)
    storage.write_table(pa.table({"item_id": pa.array([index.item_ids[r] for r in rows], pa.string()),
                                  "count": pa.array(priors.popularity[rows], pa.float64())}),
                        storage.join(folder, POPULARITY_FILE))
    src = np.repeat(np.arange(priors.num_items), np.diff(priors.indptr))
    storage.write_table(pa.table({"item_id": pa.array([index.item_ids[r] for r in src], pa.string()),
                                  "next_item_id": pa.array([index.item_ids[r] for r in priors.indices], pa.string()),
                                  "count": pa.array(priors.counts, pa.float32())}),
                        storage.join(folder, TRANSITIONS_FILE))


def read_priors(folder: str, index: ItemIndex) -> "ItemPriors":
    """The priors in `folder` aligned with `index` rows (empty, with a warning, when missing);
    statistics of items the index lacks are dropped."""
    location = storage.join(folder, POPULARITY_FILE)
    if not storage.exists(location):
        log.warning("no item priors at %s: cold-start users get items in catalog order "
                    "(run jobs/profiles.py to compute them)", location)
        return empty_priors(len(index))
    popularity = np.zeros(len(index), dtype=np.float64)
    table = storage.read_table(location)
    for item_id, count in zip(table.column("item_id").to_pylist(), table.column("count").to_pylist()):
        row = index.row(item_id)
        if row >= 0:
            popularity[row] = count
    pairs: dict[tuple[int, int], float] = {}
    location = storage.join(folder, TRANSITIONS_FILE)
    if storage.exists(location):
        table = storage.read_table(location).to_pydict()
        for a, b, count in zip(table["item_id"], table["next_item_id"], table["count"]):
            ra, rb = index.row(a), index.row(b)
            if ra >= 0 and rb >= 0:
                pairs[ra, rb] = count
    return _csr(popularity, pairs, len(index))


@dataclass
class ItemPriors:
    """Per-item statistics from the training log, aligned with the index rows.

    `indptr`, `indices`, `counts` are a CSR matrix of transitions: row a lists the items that
    directly followed item a in some user's sequence, and how often.
    """

    popularity: np.ndarray  # [items] counts
    indptr: np.ndarray  # [items + 1] int64
    indices: np.ndarray  # [nnz] int64
    counts: np.ndarray  # [nnz] float32
    span: int = 1  # pairs up to this distance were counted (item_priors)

    @property
    def num_items(self) -> int:
        """Rows covered."""
        return len(self.indptr) - 1


def item_priors(sequences: dict[str, list[Event]], index: ItemIndex, hidden: Iterable[str] = (),
                span: int = 1) -> ItemPriors:
    """Popularity and transitions counted over `sequences`, leaving out the event ids in `hidden`
    (targets of the split being evaluated). Item b following item a at distance d <= `span` in a
    user's sequence adds 1/d to transition (a, b). Events on items the index lacks are skipped."""
    hidden = set(hidden)
    popularity = np.zeros(len(index), dtype=np.float64)
    pairs: dict[tuple[int, int], float] = {}
    for events in sequences.values():
        rows = [index.row(e.item_id) for e in events if e.item_id is not None and e.event_id not in hidden]
        rows = [r for r in rows if r >= 0]
        for i, row in enumerate(rows):
            popularity[row] += 1
            for d in range(1, min(span, i) + 1):
                key = (rows[i - d], row)
                pairs[key] = pairs.get(key, 0.0) + 1.0 / d
    return _csr(popularity, pairs, len(index), span)


def _csr(popularity: np.ndarray, pairs: dict[tuple[int, int], float], n: int, span: int = 1) -> ItemPriors:
    keys = sorted(pairs)
    src = np.array([a for a, _ in keys], dtype=np.int64)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.add.at(indptr, src + 1, 1)
    return ItemPriors(popularity=popularity, indptr=np.cumsum(indptr),
                      indices=np.array([b for _, b in keys], dtype=np.int64),
                      counts=np.array([pairs[k] for k in keys], dtype=np.float32), span=span)


def grown_priors(priors: ItemPriors, n: int) -> ItemPriors:
    """`priors` over `n` >= its rows: the new rows (items added while serving) have no statistics."""
    extra = n - priors.num_items
    if extra < 0:
        raise ValueError(f"priors cover {priors.num_items} items; cannot shrink them to {n}")
    return ItemPriors(popularity=np.concatenate([priors.popularity, np.zeros(extra)]),
                      indptr=np.concatenate([priors.indptr, np.full(extra, priors.indptr[-1], dtype=np.int64)]),
                      indices=priors.indices, counts=priors.counts, span=priors.span)


def empty_priors(n: int) -> ItemPriors:
    """No statistics: zero popularity, no transitions."""
    return _csr(np.zeros(n, dtype=np.float64), {}, n)

"""Item priors learned from the log: popularity (the cold-start ranking) and item-to-item
transitions (what users touch next), the extra signals the profile scorer adds to the profile."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from profilerec.data import storage
from profilerec.data.datasets import iter_user_events
from profilerec.data.schema import Event
from profilerec.model.index import ItemIndex

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

    @functools.cached_property
    def pair_keys(self) -> np.ndarray:
        """[nnz] a * num_items + b of each transition (a, b), ascending (the CSR rows are sorted):
        where pair_counts looks pairs up. Made on first use."""
        sources = np.repeat(np.arange(self.num_items, dtype=np.int64), np.diff(self.indptr))
        return sources * self.num_items + self.indices

    def pair_counts(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """The transition counts of the pairs (a, b) of two arrays of rows of one shape (0 where
        either row is -1 or the pair was never counted)."""
        a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
        keys = np.maximum(a, 0) * self.num_items + np.maximum(b, 0)
        if not len(self.pair_keys):
            return np.zeros(keys.shape, dtype=np.float32)
        at = np.minimum(np.searchsorted(self.pair_keys, keys), len(self.pair_keys) - 1)
        found = (self.pair_keys[at] == keys) & (a >= 0) & (b >= 0)
        return np.where(found, self.counts[at], 0.0).astype(np.float32)


def item_priors(sequences: dict[str, list[Event]], index: ItemIndex, hidden: Iterable[str] = (),
                span: int = 1) -> ItemPriors:
    """Popularity and transitions counted over `sequences`, leaving out the event ids in `hidden`
    (targets of the split being evaluated). Item b following item a at distance d <= `span` in a
    user's sequence adds 1/d to transition (a, b). Events on items the index lacks are skipped."""
    hidden = set(hidden)
    counter = PriorCounter(len(index), span)
    rows, users = [], []
    for user, events in enumerate(sequences.values()):
        for e in events:
            if e.item_id is not None and e.event_id not in hidden:
                rows.append(index.row(e.item_id))
                users.append(user)
    counter.add(np.array(rows, dtype=np.int64), np.array(users, dtype=np.int64))
    return counter.priors()


def table_rows(events: pa.Table, index: ItemIndex, hidden: Optional[pa.Array] = None) -> tuple[np.ndarray, np.ndarray]:
    """The index row of each event of an EVENTS_SCHEMA table (sorted by user) and a user number
    that changes exactly where the user does, for PriorCounter.add; events on no item, on items
    the index lacks, or with an id in `hidden` are left out. Vectorised: no Python per event."""
    lookup = pc.index_in(events.column("item_id"), value_set=pa.array(index.item_ids, pa.string()))
    rows = lookup.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    user = events.column("user_id")
    changed = np.asarray(pc.not_equal(user.slice(1), user.slice(0, max(0, len(user) - 1)))
                         .to_numpy(zero_copy_only=False), dtype=bool)
    users = np.concatenate([[0], np.cumsum(changed)]) if len(user) else np.zeros(0, dtype=np.int64)
    if hidden is not None and len(hidden):
        keep = ~np.asarray(pc.is_in(events.column("event_id"), value_set=hidden).to_numpy(zero_copy_only=False),
                           dtype=bool)
        rows, users = rows[keep], users[keep]
    return rows, users


def log_priors(prepared: str, index: ItemIndex, hidden: Optional[pa.Array] = None, span: int = 1) -> ItemPriors:
    """item_priors of the events of a prepared folder, streamed through in chunks of whole users
    (bounded memory, no Event objects): the same counts as item_priors over its user_sequences."""

    counter = PriorCounter(len(index), span)
    for chunk in iter_user_events(prepared):
        counter.add(*table_rows(chunk, index, hidden))
    return counter.priors()


class PriorCounter:
    """Counts item priors chunk by chunk (a log too large to hold can stream through): add the
    events of whole users at a time, then take priors(). Vectorised with numpy; pairs are kept
    as sorted (key, count) arrays, so memory is ~12 bytes per distinct transition."""

    def __init__(self, num_items: int, span: int = 1):
        self.n = num_items
        self.span = span
        self.popularity = np.zeros(num_items, dtype=np.float64)
        self.keys = np.zeros(0, dtype=np.int64)  # a * n + b, sorted, distinct
        self.counts = np.zeros(0, dtype=np.float64)
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending_size = 0

    def add(self, rows: np.ndarray, users: np.ndarray) -> None:
        """Count the events of whole users: `rows` are their items' index rows (-1: not in the
        index, skipped) in log order, `users` the same length, equal within a user's run."""
        known = rows >= 0
        rows, users = rows[known], users[known]
        np.add.at(self.popularity, rows, 1.0)
        for d in range(1, self.span + 1):
            same = users[d:] == users[:-d]
            keys = rows[:-d][same] * self.n + rows[d:][same]
            if keys.size:
                self.pending.append((keys, np.full(keys.size, 1.0 / d)))
                self.pending_size += keys.size
        if self.pending_size > 4 * max(self.keys.size, 1_000_000):
            self._merge()

    def priors(self) -> ItemPriors:
        """The priors counted so far."""
        self._merge()
        src = self.keys // max(self.n, 1)
        indptr = np.zeros(self.n + 1, dtype=np.int64)
        np.add.at(indptr, src + 1, 1)
        return ItemPriors(popularity=self.popularity.copy(), indptr=np.cumsum(indptr),
                          indices=self.keys % max(self.n, 1), counts=self.counts.astype(np.float32), span=self.span)

    def _merge(self) -> None:
        if not self.pending:
            return
        keys = np.concatenate([self.keys] + [k for k, _ in self.pending])
        weights = np.concatenate([self.counts] + [w for _, w in self.pending])
        self.keys, inverse = np.unique(keys, return_inverse=True)
        self.counts = np.bincount(inverse.ravel(), weights=weights, minlength=self.keys.size)
        self.pending, self.pending_size = [], 0


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

"""Candidate retrieval: the few hundred items a profile's top-K is chosen from, so that a
recommendation costs about the same at ten thousand items as at ten million.

A profile's candidates are

- the `nearest` items to its user vector among the item vectors the scorer compares it with,
  from a nearest-neighbour index (ann.py) built by `profilerec index`;
- the items added or changed since that index was built, searched exactly (they are few until
  the next index build);
- the `popular` most popular items (the popularity term can lift an item the vector search
  leaves out);
- every item the profile's sparse terms touch: its window items (repeats) and the items that
  followed them in the log (transitions), and with `reverse_transitions` the items that preceded
  them.

The scorer then scores the candidates only (frozen_scorer.frozen_row_scores). An item outside them gets
the dense term alone (its similarity to the user plus its popularity), and its similarity is at
most the lowest among the nearest found (`Candidates.reach`). So only an item whose popularity
term alone makes up the gap to the K-th candidate's score can beat it: the recommender adds those,
the most popular first (recommend.py, `Recommender.two_stage_top`). The two-stage top-K then
differs from the full ranking only where the nearest-neighbour search misses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Protocol, Sequence

import numpy as np
from profilerec.config import RETRIEVAL_MODES, RetrievalConfig
from profilerec.errors import ConfigError
from profilerec.model.ann import index_exists, read_index, read_manifest
from profilerec.model.frozen_scorer import ScoreParts
from profilerec.model.row_sets import distinct, member

# the changes made to a catalog's items, in order: (the items log's fingerprint after the file that
# made the change, None for a change from elsewhere; the item rows it added or changed)
ItemChanges = Sequence[tuple[Optional[int], np.ndarray]]


class NearestItems(Protocol):
    """A nearest-neighbour search over the first `size` rows of the item matrix."""

    size: int

    def search(self, queries: np.ndarray, n: int, allowed: Optional[np.ndarray] = None) -> np.ndarray:
        """[B, n] item rows by decreasing inner product with each query, among the `allowed` rows
        (sorted) when given; -1 where there are fewer."""
        ...


@dataclass
class ExactNearest:
    """Nearest items by an exact product with every row: the reference, and the search for the
    rows changed since the index was built."""

    vectors: np.ndarray  # [rows, D]
    rows: Optional[np.ndarray] = None  # the item row of each vector; None: row i is item row i

    @property
    def size(self) -> int:
        """Rows searched."""
        return len(self.vectors)

    def search(self, queries: np.ndarray, n: int, allowed: Optional[np.ndarray] = None) -> np.ndarray:
        """[B, n] item rows, best first, among the `allowed` rows when given; -1 where there are
        fewer than n."""
        rows = np.arange(len(self.vectors)) if self.rows is None else self.rows
        vectors = self.vectors
        if allowed is not None:
            keep = np.isin(rows, allowed)
            rows, vectors = rows[keep], vectors[keep]
        out = np.full((len(queries), n), -1, dtype=np.int64)
        m = min(n, len(vectors))
        if m == 0:
            return out
        sims = queries @ vectors.T
        top = np.argpartition(-sims, m - 1, axis=1)[:, :m]
        order = np.take_along_axis(-sims, top, axis=1).argsort(axis=1, kind="stable")
        out[:, :m] = rows[np.take_along_axis(top, order, axis=1)]
        return out


@dataclass
class Retrieval:
    """The candidate sources of a Recommender (see the module docstring)."""

    index: NearestItems  # over item rows [0, index.size) as they were when it was built
    nearest: int = 200
    popular: int = 50
    fresh: set[int] = field(default_factory=set)  # rows added or changed since: searched exactly
    exact_filtered: int = 20_000  # a filter allowing at most this many items is searched exactly
    source: str = ""  # the folder `index` was read from ("": none, so no rebuild is swapped in)
    build: dict[str, Any] = field(default_factory=dict)  # the manifest of its build

    def __post_init__(self) -> None:
        self._fresh_rows: Optional[np.ndarray] = None  # fresh_rows, made on first use

    def candidates(self, parts: ScoreParts, items: np.ndarray, popular_rows: np.ndarray,
                   allowed: Optional[np.ndarray] = None) -> "Candidates":
        """The candidates of each profile of `parts`, all among the `allowed` rows (sorted) when
        given: the nearest of them, not the nearest items filtered. `items` is the item matrix the
        user vectors are compared with, `popular_rows` the most popular (allowed) rows, most
        popular first. A filter that leaves few items makes every one a candidate."""
        if allowed is not None and len(allowed) <= self.nearest + self.popular:
            return Candidates([allowed] * len(parts.user), np.full(len(parts.user), -np.inf))
        if allowed is not None and len(allowed) <= self.exact_filtered:
            # a product with a few thousand vectors costs less than scanning clusters that hold few of them
            found = [ExactNearest(items[allowed], allowed).search(parts.user, self.nearest)]
        else:
            found = [self.index.search(parts.user, self.nearest, allowed)]
        if self.fresh:
            rows = self.fresh_rows()
            found.append(ExactNearest(items[rows], rows).search(parts.user, self.nearest, allowed))
        reach = np.max([lowest_similarity(rows, parts.user, items) for rows in found], axis=0)
        found = np.concatenate(found, axis=1)
        sparse = parts.rows if allowed is None else np.where(member(parts.rows, allowed), parts.rows, -1)
        out = []
        for b in range(len(parts.user)):
            rows = np.concatenate([found[b], popular_rows[: self.popular], sparse[parts.b_idx == b]])
            out.append(distinct(rows[rows >= 0]))
        return Candidates(out, reach)

    def changed(self, rows: Iterable[int]) -> None:
        """Items at `rows` were added or got a new vector: search them exactly from now on."""
        self.fresh.update(rows)
        self._fresh_rows = None

    def fresh_rows(self) -> np.ndarray:
        """The rows searched exactly, sorted (kept until the next change)."""
        if self._fresh_rows is None:
            self._fresh_rows = np.array(sorted(self.fresh), dtype=np.int64)
        return self._fresh_rows


@dataclass
class Candidates:
    """What retrieval found for a batch of profiles."""

    rows: list[np.ndarray]  # each profile's candidate rows, sorted and distinct
    # [B] the most similarity to a profile's user vector an item outside its candidates may have:
    # the lowest among the nearest found (-inf when every allowed item is a candidate)
    reach: np.ndarray


def lowest_similarity(found: np.ndarray, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """[B] the lowest inner product of each user vector with the `items` rows found for it (-1: none),
    which a search returns best first: that of the last one found; -inf where none was found."""
    out = np.full(len(found), -np.inf)
    for b, rows in enumerate(found):
        rows = rows[rows >= 0]
        if len(rows):
            out[b] = float(items[rows[-1]] @ users[b])
    return out


def check_retrieval(cfg: RetrievalConfig, prefix: str = "retrieval.") -> None:
    """ConfigError naming the setting when `cfg` cannot work."""
    if cfg.mode not in RETRIEVAL_MODES:
        raise ConfigError(f"setting {prefix}mode: {cfg.mode!r} is not one of {', '.join(RETRIEVAL_MODES)}")
    for name in ("nearest", "two_stage_from"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"setting {prefix}{name} must be at least 1, got {getattr(cfg, name)}")
    if cfg.popular < 0:
        raise ConfigError(f"setting {prefix}popular must be 0 or more, got {cfg.popular}")


def configured_retrieval(cfg: RetrievalConfig, item_ids: list[str], matrix: np.ndarray,
                         changes: ItemChanges = ()) -> Optional[Retrieval]:
    """The Retrieval `cfg` asks for over a catalog (`item_ids`, and `matrix`: the vectors the user
    vectors are compared with, after the `changes` made to it), or None to score every item."""
    check_retrieval(cfg)
    if cfg.mode == "exact" or (cfg.mode == "auto" and len(item_ids) < cfg.two_stage_from):
        return None
    if not index_exists(cfg.index):
        raise ConfigError(f"setting retrieval.index: no index at {cfg.index}, and two-stage retrieval of "
                          f"{len(item_ids)} items needs one: run `profilerec index` (or set retrieval.mode exact)")
    retrieval = index_retrieval(cfg.index, cfg.nearest, cfg.popular, item_ids, matrix, changes)
    if retrieval is None:
        raise ConfigError(f"setting retrieval.index: the index at {cfg.index} holds items learned while serving "
                          f"that this process has not found in the service's items log: run `profilerec index` "
                          f"again (with serving_state set to the service's state_dir)")
    return retrieval


def index_retrieval(source: str, nearest: int, popular: int, item_ids: list[str], matrix: np.ndarray,
                    changes: ItemChanges, manifest: Optional[dict[str, Any]] = None) -> Optional[Retrieval]:
    """A Retrieval of `nearest` and `popular` candidates over the index at `source` (the build of
    `manifest`, else the one there now) for a catalog (`item_ids`, `matrix`) after `changes`: the
    rows the build does not hold are searched exactly. None when the build holds items learned
    while serving that `changes` have not reached yet."""
    manifest = manifest or read_manifest(source)
    unheld = unheld_changes(changes, manifest.get("learned", 0))
    if unheld is None or manifest["items"] > len(item_ids):
        return None
    changed = np.concatenate([rows for _, rows in unheld] + [np.zeros(0, dtype=np.int64)])
    index = read_index(source, item_ids, matrix, manifest, changed=changed)
    fresh = set(range(index.size, len(item_ids))).union(changed.tolist())
    return Retrieval(index, nearest, popular, fresh=fresh, source=source, build=manifest)


def unheld_changes(changes: ItemChanges, learned: int) -> Optional[ItemChanges]:
    """The `changes` that an index built with the items log at fingerprint `learned` (0: none of
    it) does not hold: those after the log reached it, and those from elsewhere. None when these
    changes never reached it."""
    marks = [i for i, (fingerprint, _) in enumerate(changes) if fingerprint == learned]
    if learned and not marks:
        return None
    start = marks[-1] + 1 if marks else 0
    return [(fingerprint, rows) for i, (fingerprint, rows) in enumerate(changes) if i >= start or fingerprint is None]

"""Leave-last-positive-out: the evaluation protocol for logs without a published split.

Per user, in log order (time, then original order), the positive events are the targets: the
last one is the test case, the one before it the valid case, every earlier one a train case.
MovieLens and the generic adapter share this one function so both split the same way.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from profilerec.data.datasets.common import cases_table

# What counts as a positive signal in a generic log (views are too weak to be a target).
POSITIVE_TYPES = ("purchase", "review", "cart", "click")


def positive_mask(events: pa.Table, min_rating: float, positive_types: Iterable[str] = POSITIVE_TYPES) -> np.ndarray:
    """Which events are positives: an item event of a positive type, or a rating >= `min_rating`."""
    types = events.column("type")
    has_item = pc.is_valid(events.column("item_id"))
    typed = pc.is_in(types, pa.array(list(positive_types), pa.string()))
    rated = pc.and_(pc.equal(types, "rating"), pc.greater_equal(events.column("value"), min_rating))
    mask = pc.and_(has_item, pc.or_(typed, pc.fill_null(rated, False)))
    return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)


def leave_last_positive_out(events: pa.Table, positive: np.ndarray) -> pa.Table:
    """Cases from a log sorted by (user, ts, original order) and its positive mask: per user the
    last positive is "test", the one before "valid", the earlier ones "train"."""
    idx = np.flatnonzero(positive)
    if idx.size == 0:
        return cases_table([], [], [])
    users = np.asarray(events.column("user_id").take(pa.array(idx)).to_pylist(), dtype=object)
    event_ids = events.column("event_id").take(pa.array(idx)).to_pylist()
    # rank from the end within each user's run of positives (the log is grouped by user)
    last_of_run = np.append(users[1:] != users[:-1], True)
    positions = np.arange(idx.size)
    ends = np.where(last_of_run, positions, idx.size)
    run_end = np.minimum.accumulate(ends[::-1])[::-1]  # next run end at or after each position
    from_end = run_end - positions
    splits = np.where(from_end == 0, "test", np.where(from_end == 1, "valid", "train"))
    return cases_table(users.tolist(), event_ids, splits.tolist())

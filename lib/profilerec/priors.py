"""Item priors learned from the log: popularity (the cold-start ranking)."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from profilerec import storage
from profilerec.index import ItemIndex

log = logging.getLogger(__name__)

POPULARITY_FILE = "popularity.parquet"


def write_popularity(counts: np.ndarray, index: ItemIndex, folder: str) -> None:
    """Write (item_id, count) for every item with a non-zero count."""
    rows = np.flatnonzero(counts)
    table = pa.table({"item_id": pa.array([index.item_ids[r] for r in rows], pa.string()),
                      "count": pa.array(counts[rows], pa.float64())})
    storage.write_table(table, storage.join(folder, POPULARITY_FILE))


def read_popularity(folder: str, index: ItemIndex) -> np.ndarray:
    """Counts aligned with `index` rows (zeros, with a warning, when the file is missing)."""
    location = storage.join(folder, POPULARITY_FILE)
    counts = np.zeros(len(index), dtype=np.float64)
    if not storage.exists(location):
        log.warning("no popularity prior at %s: cold-start users get items in catalog order "
                    "(run jobs/profiles.py to compute it)", location)
        return counts
    table = storage.read_table(location)
    for item_id, count in zip(table.column("item_id").to_pylist(), table.column("count").to_pylist()):
        row = index.row(item_id)
        if row >= 0:
            counts[row] = count
    return counts

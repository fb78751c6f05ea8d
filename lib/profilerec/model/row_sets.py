"""Sets of item rows as sorted, distinct int64 arrays: the set operations one recommendation runs
on a few hundred to a few thousand rows (candidates, exclusions, filters).

numpy's general-purpose `unique`, `isin` and `setdiff1d` pay a fixed cost per call that is several
times a request's whole scoring at these sizes; a sort and a binary search do not.
"""

from __future__ import annotations

import numpy as np


def distinct(rows: np.ndarray) -> np.ndarray:
    """The distinct values of `rows`, sorted."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    if len(rows) < 2:
        return rows
    return rows[np.concatenate(([True], rows[1:] != rows[:-1]))]


def member(rows: np.ndarray, of: np.ndarray) -> np.ndarray:
    """[len(rows)] bool: whether each of `rows` is in `of` (sorted)."""
    if not len(of):
        return np.zeros(len(rows), dtype=bool)
    at = np.minimum(np.searchsorted(of, rows), len(of) - 1)
    return of[at] == rows

"""Ranking metrics for one relevant item per case: HR@K, NDCG@K and MRR over a full ranking."""

from __future__ import annotations

from typing import Iterable

import numpy as np


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each target: how many items score strictly higher than it.

    `scores` is [cases, items], `targets` the item row of each case. Ties count in the target's
    favour, as in the published protocol's evaluation code; a target with a NaN score ranks last.
    """
    target_scores = scores[np.arange(len(targets)), targets]
    ranks = (scores > target_scores[:, None]).sum(axis=1)
    return np.where(np.isnan(target_scores), scores.shape[1], ranks)


def ranking_metrics(ranks: np.ndarray, ks: Iterable[int] = (3, 5, 10)) -> dict[str, float]:
    """HR@K, NDCG@K for each K and MRR, averaged over cases, from 0-based target ranks."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        raise ValueError("no cases to evaluate")
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"HR@{k}"] = float(hit.mean())
        out[f"NDCG@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
    out["MRR"] = float((1.0 / (ranks + 1.0)).mean())
    return out

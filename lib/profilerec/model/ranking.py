"""Ranking: where each case's target lands among all items (a recommender's full ranking, or the
popularity baseline's), and the metrics of those ranks: HR@K, NDCG@K and MRR. Shared by evaluation,
training's validation and the quality benchmark."""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np
from profilerec.model.index import best_rows
from profilerec.model.profile import ProfileState
from profilerec.model.recommend import Recommender
from profilerec.model.replay import Case, case_states, target_rows


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


SCORES_PER_CHUNK = 2**24  # cases x items scored at once: 64 MiB of float32 scores whatever the catalog
TWO_STAGE_DEPTH = 100  # how far down a two-stage list is ranked


def case_chunk(items: int) -> int:
    """Cases scored at once against `items` items: memory stays bounded as the catalog grows."""
    return max(1, min(1024, SCORES_PER_CHUNK // max(items, 1)))


def scored_chunks(recommender: Recommender, cases: Sequence[Case], targets: np.ndarray
                  ) -> Iterator[tuple[slice, list[ProfileState], np.ndarray, np.ndarray]]:
    """The cases a chunk at a time (case_chunk: memory stays bounded however many cases and items
    there are): their positions, profile states, scores over every item (the first stage) and the
    rank of each target under those scores (`targets`: item rows; unknown ones rank last)."""
    n = len(recommender.index)
    chunk = case_chunk(n)
    for start in range(0, len(cases), chunk):
        part = slice(start, start + chunk)
        states = case_states(cases[part], recommender.vector_of, recommender.params, recommender.index.meta)
        scores = recommender.scores(states)
        known = targets[part] >= 0
        ranks = np.full(len(states), n, dtype=np.int64)
        ranks[known] = target_ranks(scores[known], targets[part][known])
        yield part, states, scores, ranks


def case_ranks(recommender: Recommender, cases: Sequence[Case]) -> np.ndarray:
    """0-based rank of each case's target among all items (items unknown to the index rank last),
    in the order `Recommender.recommend` lists them: with a second stage, the first stage's top
    items in its order, then the rest."""
    targets = target_rows(cases, recommender.index.row)
    ranks = np.empty(len(cases), dtype=np.int64)
    for part, states, scores, first in scored_chunks(recommender, cases, targets):
        if recommender.reranks():
            depth = recommender.second_stage.depth
            lists = recommender.reranked_top(states, first_stage_lists(scores, depth), depth)
            first = listed_ranks(lists, targets[part], first)
        ranks[part] = first
    return ranks


def first_stage_lists(scores: np.ndarray, depth: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rows and scores of the `depth` best items of each row of `scores` [B, items], best first."""
    every = np.arange(scores.shape[1])
    return [best_rows(every, row, depth) for row in scores]


def listed_ranks(lists: Sequence[tuple[np.ndarray, np.ndarray]], targets: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """Each target's place in its case's list (`lists`: rows and scores, best first); a target
    the list leaves out keeps its rank in `ranks` if that is past the list, else ranks just past it."""
    out = ranks.copy()
    for i, (rows, _) in enumerate(lists):
        found = np.flatnonzero(rows == targets[i])
        out[i] = found[0] if targets[i] >= 0 and len(found) else max(ranks[i], len(rows))
    return out


def two_stage_ranks(recommender: Recommender, cases: Sequence[Case], depth: int = TWO_STAGE_DEPTH) -> np.ndarray:
    """0-based rank of each case's target in the recommender's two-stage top-`depth` list (its
    Retrieval's candidates, reranked), as the service would answer; a target not in the list
    ranks last (so HR/NDCG@K for K <= depth are exact, MRR counts it as missed)."""
    targets = target_rows(cases, recommender.index.row)
    ranks = np.full(len(cases), len(recommender.index), dtype=np.int64)
    for start in range(0, len(cases), 1024):
        part = slice(start, start + 1024)
        states = case_states(cases[part], recommender.vector_of, recommender.params, recommender.index.meta)
        tops = recommender.two_stage_top(states, depth, [[] for _ in states])
        ranks[part] = listed_ranks(tops, targets[part], ranks[part])
    return ranks


def popularity_ranks(recommender: Recommender, cases: Sequence[Case]) -> np.ndarray:
    """Ranks under the popularity baseline: every user gets the same, most popular first."""
    targets = target_rows(cases, recommender.index.row)
    pop = recommender.popularity_scores()
    # items strictly more popular than the target: a binary search in the sorted scores (not a
    # cases x items comparison, which would take gigabytes for a million cases)
    ranks = len(pop) - np.searchsorted(np.sort(pop), pop[np.maximum(targets, 0)], side="right")
    return np.where(targets >= 0, ranks, len(recommender.index))

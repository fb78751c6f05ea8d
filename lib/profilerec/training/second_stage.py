"""Fitting the second stage (model/second_stage.py) on the cases the scorer's epochs were chosen on.

The scorer lists each case's top `depth` items; the network learns to reorder them by a softmax
over the list (cases whose target is on it). Its validation figure is cross-fitted: fitted on all
folds of the cases but one and measured on that one, for each fold, so that it is a figure on
cases it was not fitted on, like the scorer's. No Ray in here: the training job's worker calls it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from profilerec.config import SecondStageConfig
from profilerec.model.ranking import first_stage_lists, ranking_metrics, scored_chunks
from profilerec.model.recommend import Recommender
from profilerec.model.replay import Case, target_rows
from profilerec.model.second_stage import FEATURES, SecondStage
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class ListedCases:
    """The scorer's top list of each case, as the second stage sees it."""

    features: np.ndarray  # [cases, depth, F]
    labels: np.ndarray  # [cases] the target's place on its list, -1 when it is not on it
    ranks: np.ndarray  # [cases] the target's rank under the scorer alone (full ranking)

    def take(self, cases: np.ndarray) -> "ListedCases":
        """The cases at the positions `cases`."""
        return ListedCases(self.features[cases], self.labels[cases], self.ranks[cases])


def listed_cases(recommender: Recommender, cases: Sequence[Case], depth: int) -> ListedCases:
    """The scorer's top `depth` items of every case and the second stage's features of them
    (Recommender.second_stage_features: what serving computes); a case whose target the index does
    not know ranks last."""
    targets = target_rows(cases, recommender.index.row)
    depth = min(depth, len(recommender.index))
    features = np.zeros((len(cases), depth, len(FEATURES)), dtype=np.float32)
    labels = np.full(len(cases), -1, dtype=np.int64)
    ranks = np.empty(len(cases), dtype=np.int64)
    for part, states, scores, first_ranks in scored_chunks(recommender, cases, targets):
        ranks[part] = first_ranks
        lists = first_stage_lists(scores, depth)
        rows, first = np.stack([r for r, _ in lists]), np.stack([s for _, s in lists])
        features[part] = recommender.second_stage_features(states, rows, first)
        on_list = (rows == targets[part][:, None]) & (targets[part] >= 0)[:, None]
        labels[part] = np.where(on_list.any(1), on_list.argmax(1), -1)
    return ListedCases(features, labels, ranks)


def fit_second_stage(data: ListedCases, cfg: SecondStageConfig, seed: int) -> SecondStage:
    """The network fitted on the cases of `data` whose target is on their list."""
    fit = data.labels >= 0
    features = torch.from_numpy(data.features[fit])
    labels = torch.from_numpy(data.labels[fit])
    flat = data.features[fit].reshape(-1, len(FEATURES)).astype(np.float64)
    mean, std = flat.mean(0), flat.std(0)
    std = np.where(std > 1e-6, std, 1.0)
    x = (features - torch.from_numpy(mean).float()) / torch.from_numpy(std).float()
    torch.manual_seed(seed)
    hidden = nn.Linear(len(FEATURES), cfg.hidden)
    out = nn.Linear(cfg.hidden, 1)
    params = list(hidden.parameters()) + list(out.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(cfg.epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), cfg.batch_size):
            batch = order[start:start + cfg.batch_size]
            logits = features[batch, :, 0] + out(torch.relu(hidden(x[batch]))).squeeze(-1)
            loss = F.cross_entropy(logits, labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    def arr(t: torch.Tensor) -> np.ndarray:
        return t.detach().numpy().astype(np.float32)

    return SecondStage(depth=data.features.shape[1], mean=mean.astype(np.float32), std=std.astype(np.float32),
                       w1=arr(hidden.weight.T), b1=arr(hidden.bias), w2=arr(out.weight[0]),
                       b2=float(arr(out.bias)[0]))


def reranked_ranks(stage: SecondStage, data: ListedCases) -> np.ndarray:
    """Each target's rank once `stage` reorders the lists (ties in its favour, as target_ranks);
    a target off its list keeps the scorer's rank, which is past the list."""
    ranks = data.ranks.copy()
    on = np.flatnonzero(data.labels >= 0)
    if len(on):
        scores = stage.scores(data.features[on])
        mine = scores[np.arange(len(on)), data.labels[on]]
        ranks[on] = (scores > mine[:, None]).sum(1)
    return ranks


def cross_fitted_ranks(data: ListedCases, cfg: SecondStageConfig, seed: int) -> np.ndarray:
    """Each case's rank under a network fitted on the other folds (cfg.folds, cases dealt at
    random): a validation figure of the second stage on cases it did not learn from."""
    folds = np.random.default_rng(seed).permutation(len(data.labels)) % cfg.folds
    ranks = data.ranks.copy()
    for fold in range(cfg.folds):
        held = folds == fold
        stage = fit_second_stage(data.take(np.flatnonzero(~held)), cfg, seed)
        ranks[held] = reranked_ranks(stage, data.take(np.flatnonzero(held)))
    return ranks


def second_stage_for(recommender: Recommender, cases: Sequence[Case], cfg: SecondStageConfig, seed: int,
                     ks: Sequence[int] = (3, 5, 10)) -> tuple[Optional[SecondStage], dict[str, Any]]:
    """The second stage over `recommender`'s scorer fitted on every one of `cases`, and a report
    (fitted_second_stage)."""
    started = time.perf_counter()
    stage, report = fitted_second_stage(listed_cases(recommender, cases, cfg.depth), cfg, seed, ks)
    report["seconds"] = round(time.perf_counter() - started, 1)
    if stage is None:
        log.info("no second stage: %s", report["skipped"])
    else:
        log.info("second stage fitted on %d cases in %.1f s: cross-fitted %s (scorer alone %s)", report["fit_cases"],
                 report["seconds"], report["cross_fitted"], report["first_stage"])
    return stage, report


def fitted_second_stage(data: ListedCases, cfg: SecondStageConfig, seed: int, ks: Sequence[int] = (3, 5, 10)
                        ) -> tuple[Optional[SecondStage], dict[str, Any]]:
    """The second stage fitted on every case of `data`, and a report: the scorer's figures on
    them, the cross-fitted figures with the second stage, the cases fitted on. None, and the
    reason in the report, when too few cases have their target on the list, or (with
    cfg.only_if_better) when the cross-fitted NDCG@10 is not above the scorer's."""
    fit_cases = int((data.labels >= 0).sum())
    report: dict[str, Any] = {"depth": data.features.shape[1], "cases": len(data.labels), "fit_cases": fit_cases,
                              "first_stage": ranking_metrics(data.ranks, ks)}
    if fit_cases < max(cfg.min_cases, 2 * cfg.folds):
        report["skipped"] = (f"{fit_cases} cases have their target among the first {report['depth']} "
                             f"(min_cases {cfg.min_cases})")
        return None, report
    report["cross_fitted"] = ranking_metrics(cross_fitted_ranks(data, cfg, seed), ks)
    alone, crossed = report["first_stage"]["NDCG@10"], report["cross_fitted"]["NDCG@10"]
    if cfg.only_if_better and crossed <= alone:
        report["skipped"] = f"its cross-fitted NDCG@10 {crossed:.4f} is not above the scorer's {alone:.4f}"
        return None, report
    return fit_second_stage(data, cfg, seed), report

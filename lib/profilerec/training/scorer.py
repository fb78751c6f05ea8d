"""Fitting the ProfileScorer: cases to tensors, one epoch of training, validation metrics, and
the Ray Train job around them (`jobs/train.py`).

The fitting functions have no Ray in them: the Ray Train worker loop calls them, and so can a
notebook. The user side of every case is the profile profile.py builds from the case's
history, the same state the service holds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import ray.train
import ray.train.torch
import torch
from profilerec.config import ScorerConfig, TrainConfig, from_dict, to_dict
from profilerec.data import storage
from profilerec.data.datasets import read_prepared
from profilerec.errors import ConfigError, DataError
from profilerec.model.priors import ItemPriors, item_priors
from profilerec.model.profile import ProfileParams
from profilerec.model.ranking import ranking_metrics
from profilerec.model.recommend import SCORER_DIR, Recommender, load_recommender
from profilerec.model.replay import (
    Case,
    case_states,
    hidden_event_ids,
    iter_cases,
    later_splits,
    target_rows,
    user_sequences,
)
from profilerec.model.scorer import ProfileScorer, save_scorer
from profilerec.model.scorer_inputs import ScorerBatch, scorer_batch
from profilerec.model.second_stage import SECOND_STAGE_FILE, save_second_stage
from profilerec.runtime.cluster import ProgressFn
from profilerec.training.harness import TRAIN_STATE, fit_on_ray_train, read_metrics, report_progress, worker_threads
from profilerec.training.losses import LOSSES, full_softmax_loss, sampled_softmax_loss
from profilerec.training.second_stage import second_stage_for

log = logging.getLogger(__name__)


@dataclass
class CaseTensors:
    """Model inputs and target rows for a list of cases."""

    batch: ScorerBatch
    targets: torch.Tensor  # [cases] item rows

    def __len__(self) -> int:
        return len(self.targets)

    def take(self, rows: torch.Tensor) -> tuple[ScorerBatch, torch.Tensor]:
        """The sub-batch of the given case positions."""
        return ScorerBatch(**{k: v[rows] for k, v in self.batch.__dict__.items()}), self.targets[rows]


def case_tensors(recommender: Recommender, cases: Sequence[Case], scorer_params: ScorerConfig) -> CaseTensors:
    """Profiles of `cases` (replayed with profile.py) as model inputs; cases whose target or
    history is unknown to the index are dropped (they cannot be learned from)."""
    targets = target_rows(cases, recommender.index.row)
    keep = [i for i, c in enumerate(cases) if targets[i] >= 0 and c.history]
    cases = [cases[i] for i in keep]
    states = case_states(cases, recommender.vector_of, recommender.params, recommender.index.meta)
    batch = scorer_batch(states, recommender.index.row, recommender.params, scorer_params, recommender.index.dim)
    return CaseTensors(batch, torch.as_tensor(targets[keep], dtype=torch.int64))


def training_loss(num_items: int, cfg: TrainConfig) -> str:
    """The loss `cfg` trains with over a catalog of `num_items`: "full" or "sampled"."""
    if cfg.loss not in LOSSES:
        raise ConfigError(f"setting loss: {cfg.loss!r} is not a loss; choose one of {', '.join(LOSSES)}")
    if cfg.loss == "auto":
        return "sampled" if num_items >= cfg.sampled_from else "full"
    return cfg.loss


# the proposal q of the sampled negatives: this share uniform over the catalog, the rest by
# popularity ** POPULARITY_POWER. The uniform part keeps every item, never-touched ones too, a
# possible negative; the popularity part spends draws where the logged mass is, flattened (as
# word2vec's negatives are) so the head does not take every draw: the batch's own targets are
# already negatives drawn by plain popularity.
UNIFORM_SHARE = 0.5
POPULARITY_POWER = 0.75


class NegativeSampler:
    """A step's candidates for sampled_softmax_loss: the batch's targets, then `negatives` rows
    drawn with replacement from the proposal q (UNIFORM_SHARE, POPULARITY_POWER), with log m_c,
    the expected number of times row c is among a case's negative draws:

        m_c = (B - 1) * n_c / (cases - 1) + negatives * q_c

    The first term is the in-batch part: a case's batch mates are B - 1 cases drawn without
    replacement from the other cases of the epoch's shuffled data, n_c of which have target c
    (c is never the case's own target there: those columns are masked as accidental hits). The
    second is the sampled part. Building the sampler is O(items), once per epoch; a step draws
    by binary search in q's cumulative sum, O(negatives * log(items)).
    """

    def __init__(self, popularity: torch.Tensor, targets: torch.Tensor, num_items: int):
        popularity = popularity.detach().cpu().double().clamp(min=0) ** POPULARITY_POWER
        total = float(popularity.sum())
        self.popular = popularity / total if total > 0 else torch.full((num_items,), 1.0 / num_items,
                                                                        dtype=torch.float64)
        self.cumulative = torch.cumsum(self.popular, 0)
        self.target_counts = torch.bincount(targets.cpu(), minlength=num_items).double()
        self.cases = len(targets)
        self.num_items = num_items

    def proposal(self, rows: torch.Tensor) -> torch.Tensor:
        """q of `rows`: the probability of one draw being each of them."""
        return UNIFORM_SHARE / self.num_items + (1.0 - UNIFORM_SHARE) * self.popular[rows]

    def draw(self, negatives: int, generator: torch.Generator) -> torch.Tensor:
        """`negatives` rows drawn independently from q."""
        uniform = torch.rand(negatives, generator=generator, dtype=torch.float64) < UNIFORM_SHARE
        anywhere = torch.randint(self.num_items, (negatives,), generator=generator)
        mass = torch.rand(negatives, generator=generator, dtype=torch.float64) * self.cumulative[-1]
        popular = torch.searchsorted(self.cumulative, mass, right=True).clamp(max=self.num_items - 1)
        return torch.where(uniform, anywhere, popular)

    def candidates(self, targets: torch.Tensor, negatives: int, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(candidate rows [B + negatives], label column of each case [B], log m_c per column)."""
        rows = torch.cat([targets.cpu(), self.draw(negatives, generator)])
        in_batch = (len(targets) - 1) * self.target_counts[rows] / max(self.cases - 1, 1)
        expected = in_batch + negatives * self.proposal(rows)
        return rows, torch.arange(len(targets)), torch.log(expected).float()


def train_epoch(model: ProfileScorer, optimizer: torch.optim.Optimizer, data: CaseTensors, batch_size: int,
                generator: torch.Generator, scheduler=None, device: Any = "cpu", loss: str = "full",
                negatives: int = 1024) -> float:
    """One pass over `data` in a random order with the `loss` training_loss names (sampled:
    `negatives` per step); returns the mean loss."""
    if loss not in ("full", "sampled"):
        raise ValueError(f"train_epoch trains with the full or the sampled loss, not {loss!r}")
    model.train()
    order = torch.randperm(len(data), generator=generator)
    sampler = None
    if loss == "sampled":
        scorer = getattr(model, "module", model)  # under DistributedDataParallel
        sampler = NegativeSampler(scorer.popularity, data.targets, len(scorer.item_vectors))
    losses = []
    for start in range(0, len(order), batch_size):
        batch, targets = data.take(order[start : start + batch_size])
        batch, targets = batch.to(device), targets.to(device)
        if sampler is None:
            value = full_softmax_loss(model(batch, targets), targets)
        else:
            candidates, labels, log_expected = (t.to(device) for t in sampler.candidates(targets, negatives, generator))
            # the forward scores each distinct row once; repeated draws are repeated columns
            rows, columns = torch.unique(candidates, return_inverse=True)
            logits = model(batch, targets, rows=rows)[:, columns]
            value = sampled_softmax_loss(logits, labels, candidates, targets, log_expected)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(float(value.detach()))
    return float(np.mean(losses)) if losses else float("nan")


def scorer_optimizer(model: ProfileScorer, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the scorer's weights, the item projection at `cfg.projection_lr` times the
    learning rate (its own parameter group; the rest share the plain rate)."""
    projection = [model.proj.weight]
    rest = [p for p in model.parameters() if p is not model.proj.weight]
    return torch.optim.AdamW([{"params": rest}, {"params": projection, "lr": cfg.learning_rate * cfg.projection_lr}],
                             lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


# items an evaluation scores at a time (all of a smaller catalog), and the scores one batch of
# cases holds at most: memory stays bounded however large the catalog and the split
EVAL_ITEMS = 1 << 16
EVAL_SCORES = 1 << 23


@torch.no_grad()
def model_ranks(model: ProfileScorer, data: CaseTensors, batch_size: int = 512, device: Any = "cpu") -> np.ndarray:
    """0-based rank of each case's target under `model` over the whole catalog (target_ranks'
    rule: the items scoring strictly higher; a NaN target score ranks last).

    The catalog is scored EVAL_ITEMS items at a time, each part projected once for every batch of
    `batch_size` cases (fewer when their scores would pass EVAL_SCORES); a part's scores are
    compared with the targets' scores from the same product, where the targets are extra columns."""
    model.eval()
    n = len(model.item_vectors)
    part_size = max(1, min(n, EVAL_ITEMS))
    batch_size = max(1, min(batch_size, EVAL_SCORES // max(part_size, 1)))
    above = torch.zeros(len(data), dtype=torch.int64)
    unscored = torch.zeros(len(data), dtype=torch.bool)
    # a part's columns, and room after them for a batch's targets from other parts
    columns = torch.empty((part_size + batch_size, model.item_vectors.shape[1]), device=device)
    for start in range(0, n, part_size):
        stop = min(n, start + part_size)
        rows = torch.arange(start, stop, device=device)
        columns[: len(rows)] = model.item_matrix(rows)
        for first in range(0, len(data), batch_size):
            cases = torch.arange(first, min(first + batch_size, len(data)))
            batch, targets = data.take(cases)
            batch, targets = batch.to(device), targets.to(device)
            inside = (targets >= start) & (targets < stop)
            outside = torch.unique(targets[~inside])
            columns[len(rows): len(rows) + len(outside)] = model.item_matrix(outside)
            scores = model(batch, rows=torch.cat([rows, outside]), columns=columns[: len(rows) + len(outside)])
            at = torch.where(inside, targets - start, len(rows) + torch.searchsorted(outside, targets))
            target_scores = scores.gather(1, at[:, None])
            above[cases] += (scores[:, : len(rows)] > target_scores).sum(1).cpu()
            unscored[cases] |= torch.isnan(target_scores[:, 0]).cpu()
    return torch.where(unscored, n, above).numpy()


def model_metrics(model: ProfileScorer, data: CaseTensors, ks: Sequence[int] = (3, 5, 10),
                  dropped: int = 0, num_items: Optional[int] = None, device: Any = "cpu") -> dict[str, float]:
    """Ranking metrics of `model` on `data`; `dropped` cases (unknown target) count as misses."""
    ranks = model_ranks(model, data, device=device)
    if dropped:
        ranks = np.concatenate([ranks, np.full(dropped, num_items or 10**9)])
    return ranking_metrics(ranks, ks)


# --------------------------------------------------------------------------------------------
# Ray Train: the worker loop and the driver


@dataclass
class TrainingSetup:
    """What a worker needs: the recommender over the embeddings, the log and the cases by split."""

    recommender: Recommender
    sequences: dict
    data: Any

    def cases(self, splits: Sequence[str]) -> list[Case]:
        """The cases of `splits`, with histories as the protocol gives them."""
        return list(iter_cases(self.sequences, self.data.cases, splits, self.data.max_history))

    def priors(self, hidden_from_split: Optional[str], span: int) -> ItemPriors:
        """Item priors of the log without the targets of `hidden_from_split` and later splits."""
        hidden = hidden_event_ids(self.data.cases, hidden_from_split) if hidden_from_split else set()
        return item_priors(self.sequences, self.recommender.index, hidden, span)


def training_setup(cfg: TrainConfig) -> TrainingSetup:
    """Read the prepared log and the embeddings the scorer is trained over."""

    data = read_prepared(cfg.input, descriptions=False)
    recommender = load_recommender(data.items, cfg.embeddings, ProfileParams())
    return TrainingSetup(recommender, user_sequences(data.events), data)


def check_train_config(cfg: TrainConfig) -> None:
    """ConfigError for settings that cannot train together."""
    if cfg.refit and cfg.second_stage.depth > 0:
        raise ConfigError("setting refit: the refit and the second stage would both learn from the targets of "
                          f"{cfg.eval_split!r}; set refit false, or second_stage.depth 0 for no second stage")


def phases(cfg: TrainConfig) -> list[tuple[str, list[str], Optional[str]]]:
    """(name, training splits, split whose targets and later ones the priors hide) per phase."""
    select = ("select", list(cfg.train_splits), cfg.eval_split)
    if not cfg.refit:
        return [select]
    following = later_splits(cfg.eval_split)[1:]
    return [select, ("refit", list(cfg.train_splits) + [cfg.eval_split], following[0] if following else None)]


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker function: select the epochs on validation, optionally refit, checkpoint
    every epoch; the last checkpoint holds the final scorer."""

    cfg = from_dict(TrainConfig, config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    worker_threads(cfg.threads_per_worker)
    device = ray.train.torch.get_device()
    setup = training_setup(cfg)
    index = setup.recommender.index
    eval_cases = setup.cases([cfg.eval_split])
    if not eval_cases:
        raise DataError(f"no {cfg.eval_split} cases in {cfg.input}: nothing to choose the epochs on")
    eval_data = case_tensors(setup.recommender, eval_cases, cfg.scorer)

    progress = {"phase": 0, "epoch": 0, "best": -1.0, "best_epoch": 0, "stale": 0, "history": [],
                "best_state": None, "model": None, "optimizer": None}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            progress = torch.load(os.path.join(folder, TRAIN_STATE), weights_only=False)
        log.info("resuming from the checkpoint after phase %d epoch %d", progress["phase"], progress["epoch"])

    loss = training_loss(len(index), cfg)
    log.info("training with the %s softmax over %d items", loss, len(index))
    for number, (phase, splits, hidden_from) in enumerate(phases(cfg)):
        if number < progress["phase"]:
            continue
        priors = setup.priors(hidden_from, cfg.scorer.transition_span)
        train_data = case_tensors(setup.recommender, setup.cases(splits), cfg.scorer)
        if not len(train_data):
            raise DataError(f"no training cases in splits {splits} of {cfg.input}")
        torch.manual_seed(cfg.seed)
        model = ProfileScorer(index.vectors, priors, setup.recommender.params.window, cfg.scorer).to(device)
        optimizer = scorer_optimizer(model, cfg)
        if number == progress["phase"] and progress["model"] is not None:
            model.load_state_dict(progress["model"])
            optimizer.load_state_dict(progress["optimizer"])
        first = progress["epoch"] if number == progress["phase"] else 0
        epochs = cfg.epochs if phase == "select" else progress["best_epoch"]
        wrapped = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False}) \
            if world > 1 else model
        mine = torch.arange(len(train_data))[rank::world]
        shard = CaseTensors(*train_data.take(mine))
        bar = f"epochs, chosen on {cfg.eval_split}" if phase == "select" else f"refit epochs on {'+'.join(splits)}"
        report_progress(config, bar, first, epochs)
        for epoch in range(first, epochs):
            if phase == "select" and progress["stale"] >= cfg.patience:
                log.info("early stop after epoch %d: NDCG@10 on %s has not improved for %d epochs",
                         epoch, cfg.eval_split, progress["stale"])
                report_progress(config, bar, epoch, epoch)
                break
            started = time.perf_counter()
            generator = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
            train_loss = train_epoch(wrapped, optimizer, shard, cfg.batch_size, generator, device=device, loss=loss,
                                     negatives=cfg.negatives)
            seconds = time.perf_counter() - started
            # the workers step in lockstep: every worker's cases count towards the rate
            report = {"phase": phase, "epoch": epoch + 1, "train_loss": train_loss, "cases": len(train_data),
                      "seconds": round(seconds, 1), "samples_per_s": round(world * len(shard) / seconds, 1)}
            if phase == "select":
                metrics = model_metrics(model, eval_data, dropped=len(eval_cases) - len(eval_data),
                                        num_items=len(index), device=device)
                report.update({f"val_{k}": v for k, v in metrics.items()})
                score = metrics["NDCG@10"]
                if score > progress["best"]:
                    progress.update(best=score, best_epoch=epoch + 1, stale=0,
                                    best_state={k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
                else:
                    progress["stale"] += 1
            progress["history"].append(report)
            progress.update(phase=number, epoch=epoch + 1, model=model.state_dict(), optimizer=optimizer.state_dict())
            log.info("%s", report)
            _report(progress, report, rank, None)
            report_progress(config, bar, epoch + 1, epochs)
        if phase == "select":
            progress.update(phase=number + 1, epoch=0, model=None, optimizer=None)
    final_priors = setup.priors(phases(cfg)[-1][2], cfg.scorer.transition_span)
    final = ProfileScorer(index.vectors, final_priors, setup.recommender.params.window, cfg.scorer)
    final_state = progress["model"] if cfg.refit else progress["best_state"]
    final.load_state_dict({k: v.cpu() for k, v in final_state.items()})
    final.eval()
    trained_on, stage, stage_report = phases(cfg)[-1][1], None, None
    if cfg.second_stage.depth > 0 and rank == 0:
        scored = dataclasses.replace(setup.recommender, scorer=final)
        scored.set_priors(final_priors)
        report_progress(config, f"second stage, fitted on {cfg.eval_split}", 0, 1)
        stage, stage_report = second_stage_for(scored, eval_cases, cfg.second_stage, cfg.seed)
        report_progress(config, f"second stage, fitted on {cfg.eval_split}", 1, 1)
        if stage is not None:
            trained_on = trained_on + [cfg.eval_split]
    _report(progress, {"phase": "final", "best_epoch": progress["best_epoch"], "val_NDCG@10": progress["best"],
                       "second_stage": stage_report},
            rank, (final, stage, index.item_ids, setup.recommender.params, trained_on))


def _report(progress: dict, report: dict, rank: int, final) -> None:
    """Report one epoch; rank 0 attaches the checkpoint (training state, and the final scorer)."""

    with tempfile.TemporaryDirectory() as folder:
        if rank != 0:
            ray.train.report(report)
            return
        torch.save(progress, os.path.join(folder, TRAIN_STATE))
        with open(os.path.join(folder, "metrics.json"), "w") as f:
            json.dump({**report, "history": progress["history"], "best_epoch": progress["best_epoch"]}, f)
        if final is not None:
            model, stage, item_ids, params, trained_on = final
            save_scorer(model, os.path.join(folder, SCORER_DIR), item_ids, params, trained_on)
            if stage is not None:
                save_second_stage(stage, os.path.join(folder, SCORER_DIR))
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(folder))


def run_train(cfg: TrainConfig, progress: Optional[ProgressFn] = None) -> dict[str, Any]:
    """The train job: fit the scorer on Ray Train and write it to `<output>/scorer`.

    Returns the manifest written beside it (validation metrics of the chosen epoch, history).
    `progress(what, done, total)` hears of every epoch (one bar per phase).
    """

    cfg = dataclasses.replace(cfg, input=storage.absolute(cfg.input), output=storage.absolute(cfg.output),
                              embeddings=storage.absolute(cfg.embeddings))
    check_train_config(cfg)
    started = time.perf_counter()
    run = fit_on_ray_train(train_loop, cfg, ("output",), ray.train.CheckpointConfig(num_to_keep=2), progress)
    result, name = run.result, run.name
    with result.checkpoint.as_directory() as folder:
        metrics = read_metrics(folder)
        if not os.path.isdir(os.path.join(folder, SCORER_DIR)):
            raise DataError(f"training run {name} stopped before it saved the final scorer; run it again to resume")
        stale = storage.join(cfg.output, SCORER_DIR, SECOND_STAGE_FILE)
        if not os.path.exists(os.path.join(folder, SCORER_DIR, SECOND_STAGE_FILE)) and storage.exists(stale):
            storage.delete(stale)  # an earlier model's, which must not reorder this scorer's lists
        storage.upload_dir(os.path.join(folder, SCORER_DIR), storage.join(cfg.output, SCORER_DIR))
    history = metrics["history"]
    best = next((h for h in history if h["phase"] == "select" and h["epoch"] == metrics["best_epoch"]), {})
    second_stage = metrics.get("second_stage") or {}
    # the figures of what is served: the second stage's are cross-fitted on the same cases
    validation = second_stage.get("cross_fitted") or {k[4:]: v for k, v in best.items() if k.startswith("val_")}
    manifest = {"run": name, "storage_path": run.storage_path, "best_epoch": metrics["best_epoch"],
                "validation": validation, "second_stage": second_stage or None,
                "refit": cfg.refit, "history": history, "embeddings": cfg.embeddings, "use_gpu": run.use_gpu,
                "num_workers": cfg.num_workers, "seconds": round(time.perf_counter() - started, 1),
                "config": to_dict(cfg)}
    storage.write_json(manifest, storage.join(cfg.output, SCORER_DIR, "manifest.json"))
    return manifest

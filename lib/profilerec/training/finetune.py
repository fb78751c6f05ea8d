"""Fine-tuning on Ray Train: the worker loop, checkpoints, early stopping, and the driver.

The encoder is fine-tuned on next-item prediction. The user side of each training case is the
profile built by profile.py from the case's history, with item vectors computed by the encoder
being trained (so gradients flow through the profile update); the item side is the encoder's
vector of the next item; the other items of the batch are the negatives.

One checkpoint per epoch (the model folder plus optimizer state) goes through
`ray.train.report`; re-running the same run name resumes from the last one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

import pyarrow as pa
import ray.train
import ray.train.torch
import torch
from profilerec.config import FinetuneConfig, from_dict
from profilerec.data import storage
from profilerec.data.datasets import read_prepared
from profilerec.data.vectors import item_texts
from profilerec.errors import DataError
from profilerec.model.encoder import TextEncoder
from profilerec.model.index import ItemIndex
from profilerec.model.profile import ProfileParams, build_profile, event_embedding, zero_shot_query
from profilerec.model.ranking import case_ranks, ranking_metrics
from profilerec.model.recommend import Recommender
from profilerec.model.replay import Case, iter_cases, user_sequences
from profilerec.runtime.cluster import ProgressFn
from profilerec.training.harness import (
    TRAIN_STATE,
    StepTimer,
    bf16_enabled,
    fit_on_ray_train,
    prefetch,
    read_metrics,
    report_progress,
    worker_threads,
)
from profilerec.training.losses import contrastive_loss

log = logging.getLogger(__name__)

METRIC = "val_ndcg10"
ENCODER_DIR = "encoder"


# --------------------------------------------------------------------------------------------
# Worker side


def finetune_loop(config: dict[str, Any]) -> None:
    """Ray Train worker function: fine-tune the encoder, report + checkpoint every epoch."""

    cfg = from_dict(FinetuneConfig, config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = worker_threads(cfg.threads_per_worker)
    torch.manual_seed(cfg.seed)
    params = ProfileParams()

    data = read_prepared(cfg.input)
    train_cases, eval_cases = finetune_cases(data, cfg, params)
    texts = _item_texts(data.items)

    device = ray.train.torch.get_device()
    encoder = TextEncoder(cfg.model, device=str(device), max_length=cfg.max_length)
    # the encoder's pooler gets no gradient (profiles mean-pool the tokens): DDP must be told, or
    # the second step with two or more workers fails waiting for its gradients
    encoder.model = ray.train.torch.prepare_model(encoder.model,
                                                  parallel_strategy_kwargs={"find_unused_parameters": True})
    use_bf16 = bf16_enabled(cfg.bf16, device)
    log.info("worker %d of %d: %d torch threads on %s, bf16 autocast %s", rank, world, threads, device,
             "on" if use_bf16 else "off")
    optimizer = torch.optim.AdamW(encoder.model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    steps_per_epoch = finetune_steps(len(train_cases), cfg, world)
    scheduler = _warmup_linear(optimizer, steps_per_epoch * cfg.epochs, cfg.warmup_ratio)

    start_epoch, best, stale, history = 0, -1.0, 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            start_epoch, best, stale, history = _restore(folder, encoder, optimizer, scheduler)
        log.info("resuming from the checkpoint after epoch %d (best %s %.4f)", start_epoch, METRIC, best)

    def finish_epoch(epoch: int, losses: list[torch.Tensor], timing: dict[str, Any], started: float) -> None:
        """Validate, then report and checkpoint the epoch (every worker reports, rank 0 saves)."""
        nonlocal best, stale
        encoder.model.eval()
        metrics = evaluate_encoder(encoder, data.items, eval_cases, params)
        score = metrics["NDCG@10"]
        stale = 0 if score > best else stale + 1
        best = max(best, score)
        report = {"epoch": epoch, "train_loss": float(torch.stack(losses).mean()) if losses else None, METRIC: score,
                  "val_hr10": metrics["HR@10"], "best": best, "steps": len(losses),
                  "seconds": round(time.perf_counter() - started, 1), **timing}
        history.append(report)
        log.info("epoch %d: %s", epoch, report)
        with tempfile.TemporaryDirectory() as folder:
            if rank == 0:
                _save(folder, encoder, optimizer, scheduler, epoch, best, stale, history)
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(folder))
            else:
                ray.train.report(report)

    if not checkpoint:
        # epoch 0 is the untuned encoder: if no epoch beats it, the best checkpoint is the original
        finish_epoch(0, [], {}, time.perf_counter())
        stale = 0
    total_steps = steps_per_epoch * cfg.epochs
    report_progress(config, "fine-tune steps", start_epoch * steps_per_epoch, total_steps)
    for epoch in range(start_epoch, cfg.epochs):
        if stale >= cfg.patience:
            log.info("early stop: %s has not improved for %d epochs", METRIC, stale)
            report_progress(config, "fine-tune steps", epoch * steps_per_epoch, epoch * steps_per_epoch)
            break
        started = time.perf_counter()
        encoder.model.train()
        batches = (batch_inputs([train_cases[i] for i in rows], texts, encoder.tokenize)
                   for rows in epoch_batches(len(train_cases), cfg, epoch, rank, world))
        losses: list[torch.Tensor] = []
        timer = StepTimer(device)
        # the next batches are tokenised on a thread while this one trains
        for inputs in prefetch(batches):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = inputs_loss(encoder, inputs, params, cfg.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(encoder.model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.detach())  # no float() here: that would wait for the GPU every step
            timer.step(len(inputs.cases))
            report_progress(config, "fine-tune steps", epoch * steps_per_epoch + len(losses), total_steps)
        # the thread counts, precision and malloc settings go into the history so a benchmark can
        # run its reference loop alike
        finish_epoch(epoch + 1, losses, {**timer.summary(world), "torch_threads": threads,
                                         "interop_threads": torch.get_num_interop_threads(), "bf16": use_bf16,
                                         "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")},
                     started)


def finetune_cases(data: Any, cfg: FinetuneConfig, params: ProfileParams) -> tuple[list[Case], list[Case]]:
    """The training cases (with a history and a target) and the validation cases of a prepared log."""
    sequences = user_sequences(data.events)
    train_cases = [c for c in iter_cases(sequences, data.cases, cfg.train_splits, data.max_history or params.window)
                   if c.history and c.target is not None]
    eval_cases = _every_nth(list(iter_cases(sequences, data.cases, [cfg.eval_split], data.max_history)),
                            cfg.eval_max_cases)
    if not train_cases:
        raise DataError(f"no training cases in splits {cfg.train_splits} of {cfg.input}")
    return train_cases, eval_cases


def finetune_steps(n_cases: int, cfg: FinetuneConfig, world: int) -> int:
    """Optimizer steps per epoch of each worker."""
    steps = math.ceil(math.ceil(n_cases / world) / cfg.batch_size)
    return min(steps, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else steps


def epoch_batches(n_cases: int, cfg: FinetuneConfig, epoch: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """The case positions of each of this worker's batches in `epoch` (a seeded shuffle, dealt
    round-robin to the workers). Every worker gets the same number of batches, as DDP needs (a
    worker with one step fewer would leave the others waiting): like torch's DistributedSampler,
    the shuffled order is padded with its own first cases up to a multiple of `world`."""
    order = list(range(n_cases))
    random.Random(cfg.seed * 1000 + epoch).shuffle(order)
    order += order[: math.ceil(n_cases / world) * world - n_cases]
    mine = order[rank::world]
    batches = [mine[s * cfg.batch_size : (s + 1) * cfg.batch_size] for s in range(finetune_steps(n_cases, cfg, world))]
    return [b for b in batches if b]


@dataclasses.dataclass
class BatchInputs:
    """A batch of cases ready for the encoder: the distinct item and event texts it needs, tokenised."""

    cases: Sequence[Case]
    items: dict[str, int]  # item id -> its row in `tokens` (targets included)
    event_texts: dict[str, int]  # an event's own text -> its row in `tokens`
    tokens: dict[str, torch.Tensor]


def batch_inputs(cases: Sequence[Case], texts: dict[str, str], tokenize: Callable[[list[str]], Any]) -> BatchInputs:
    """Collect and tokenise the texts a batch of cases needs (no model: safe on a loader thread)."""
    items: dict[str, int] = {}
    for case in cases:
        for event in case.history:
            if event.item_id is not None:
                items.setdefault(event.item_id, len(items))
        items.setdefault(case.target, len(items))
    event_texts: dict[str, int] = {}
    for case in cases:
        for event in case.history:
            if event.text:
                event_texts.setdefault(event.text, len(items) + len(event_texts))
    batch_texts = [texts.get(i, "") for i in items] + list(event_texts)
    return BatchInputs(cases, items, event_texts, dict(tokenize(batch_texts)))


def inputs_loss(encoder: TextEncoder, inputs: BatchInputs, params: ProfileParams, temperature: float) -> torch.Tensor:
    """Next-item contrastive loss of a prepared batch, gradients flowing through profile.py."""
    vectors = encoder.embed(inputs.tokens)
    items, event_texts = inputs.items, inputs.event_texts

    def vector_of(event):
        item = vectors[items[event.item_id]] if event.item_id is not None else None
        text = vectors[event_texts[event.text]] if event.text else None
        return event_embedding(item, text, params)

    queries, positives = [], []
    for case in inputs.cases:
        query = zero_shot_query(build_profile(case.user_id, case.history, vector_of, params), params)
        if query is not None:
            queries.append(query)
            positives.append(items[case.target])
    keys = vectors[: len(items)]
    return contrastive_loss(torch.stack(queries), keys, torch.tensor(positives, device=keys.device), temperature)


def case_loss(encoder: TextEncoder, cases: Sequence[Case], texts: dict[str, str], params: ProfileParams,
              temperature: float) -> torch.Tensor:
    """Next-item contrastive loss of a batch of cases, gradients flowing through profile.py."""
    return inputs_loss(encoder, batch_inputs(cases, texts, encoder.tokenize), params, temperature)


def _item_texts(items) -> dict[str, str]:

    table = item_texts(items)
    return dict(zip(table.column("item_id").to_pylist(), table.column("text").to_pylist()))


def _every_nth(cases: list, limit: Optional[int]) -> list:
    if not limit or len(cases) <= limit:
        return cases
    step = len(cases) / limit
    return [cases[int(i * step)] for i in range(limit)]


def _warmup_linear(optimizer, total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _save(folder: str, encoder: TextEncoder, optimizer, scheduler, epoch: int, best: float, stale: int,
          history: list[dict[str, Any]]) -> None:
    encoder.save(os.path.join(folder, ENCODER_DIR))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                "best": best, "stale": stale, "history": history}, os.path.join(folder, TRAIN_STATE))
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump({**history[-1], "history": history}, f)


def _restore(folder: str, encoder: TextEncoder, optimizer, scheduler) -> tuple[int, float, int, list]:
    from transformers import AutoModel

    trained = AutoModel.from_pretrained(os.path.join(folder, ENCODER_DIR))
    getattr(encoder.model, "module", encoder.model).load_state_dict(trained.state_dict())
    state = torch.load(os.path.join(folder, TRAIN_STATE), weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["epoch"], state["best"], state["stale"], state["history"]


# --------------------------------------------------------------------------------------------
# Driver side


def run_finetune(cfg: FinetuneConfig, progress: Optional[ProgressFn] = None) -> dict[str, Any]:
    """The finetune job: train on Ray Train, then write the best epoch's model to `cfg.output`.

    Returns the manifest written next to the model (best validation metrics, epochs, seconds).
    `progress(what, done, total)` hears of every training step.
    """

    # the workers run in another directory: hand them absolute locations
    cfg = dataclasses.replace(cfg, input=storage.absolute(cfg.input), output=storage.absolute(cfg.output),
                              model=_absolute_model(cfg.model))
    started = time.perf_counter()
    # more epochs continue a run
    run = fit_on_ray_train(finetune_loop, cfg, ("epochs", "patience", "output"),
                           ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=METRIC,
                                                      checkpoint_score_order="max"), progress)
    result, name = run.result, run.name
    best = result.get_best_checkpoint(METRIC, "max") if result.best_checkpoints else result.checkpoint
    with result.checkpoint.as_directory() as folder:
        history = read_metrics(folder)["history"]
    with best.as_directory() as folder:
        metrics = read_metrics(folder)
        metrics.pop("history")
        storage.upload_dir(os.path.join(folder, ENCODER_DIR), storage.join(cfg.output, ENCODER_DIR))
    if metrics["epoch"] == 0:
        log.warning("fine-tuning did not beat the untuned encoder on %s; keeping the untuned encoder", METRIC)
    manifest = {"encoder": ENCODER_DIR, "base_model": cfg.model, "run": name, "storage_path": run.storage_path,
                "best_epoch": metrics["epoch"], "metrics": metrics, "history": history, "use_gpu": run.use_gpu,
                "last_checkpoint": result.checkpoint.path,
                "num_workers": cfg.num_workers, "seconds": round(time.perf_counter() - started, 1),
                "profile": ProfileParams().to_dict()}
    storage.write_json(manifest, storage.join(cfg.output, "manifest.json"))
    return manifest


def _absolute_model(model: str) -> str:
    """A model given as a local folder becomes absolute; "default" and hub ids stay as they are."""
    return storage.absolute(model) if os.path.isdir(model) else model


def evaluate_encoder(encoder, items: pa.Table, cases: Sequence[Case], params: ProfileParams,
                     ks: Sequence[int] = (3, 5, 10)) -> dict[str, float]:
    """Metrics of the zero-shot profile with item vectors from `encoder` (used while training)."""
    table = item_texts(items)
    vectors = encoder.encode(table.column("text").to_pylist())
    index = ItemIndex(table.column("item_id").to_pylist(), vectors)
    return ranking_metrics(case_ranks(Recommender(index, params), cases), ks)

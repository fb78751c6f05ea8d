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
import hashlib
import json
import logging
import math
import os
import posixpath
import queue
import random
import tempfile
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, TypeVar

import torch

from profilerec import storage
from profilerec.config import FinetuneConfig, from_dict, to_dict
from profilerec.encoder import TextEncoder, cpu_multiplies_bf16
from profilerec.errors import DataError
from profilerec.model import contrastive_loss
from profilerec.profile import ProfileParams, build_profile, event_embedding, zero_shot_query
from profilerec.replay import Case, iter_cases, user_sequences

log = logging.getLogger(__name__)
T = TypeVar("T")

METRIC = "val_ndcg10"
TRAIN_STATE = "train_state.pt"
ENCODER_DIR = "encoder"


# --------------------------------------------------------------------------------------------
# Worker side


def finetune_loop(config: dict[str, Any]) -> None:
    """Ray Train worker function: fine-tune the encoder, report + checkpoint every epoch."""
    import ray.train
    import ray.train.torch
    from profilerec.datasets import read_prepared
    from profilerec.evaluation import evaluate_encoder

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
    for epoch in range(start_epoch, cfg.epochs):
        if stale >= cfg.patience:
            log.info("early stop: %s has not improved for %d epochs", METRIC, stale)
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


def worker_threads(threads: Optional[int] = None) -> int:
    """Set (and return) the torch threads of this Ray Train worker: `threads`, or else the cores
    this process may run on shared evenly by the workers of its node. Ray starts workers with
    OMP_NUM_THREADS=1, which leaves every other core idle."""
    import ray.train

    if not threads:
        from profilerec.parallel import cores_per_worker

        threads = cores_per_worker(ray.train.get_context().get_local_world_size())
    torch.set_num_threads(threads)
    return threads


def bf16_enabled(setting: Optional[bool], device: torch.device) -> bool:
    """Whether to train under bf16 autocast: `setting`, or by default on CUDA GPUs that support it
    and on CPUs that multiply bf16 in hardware (AMX: about 1.6x the fp32 samples/s, docs/throughput.md)."""
    if setting is not None:
        return setting
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_multiplies_bf16()


class StepTimer:
    """Samples per second of the steady-state training steps: the first step of an epoch (lazy
    initialisation, allocator warm-up) is left out, and so is everything outside the steps
    (Ray start, model load, validation, checkpoints). Waits for the GPU at both ends."""

    def __init__(self, device: torch.device):
        self.device = device
        self.steps = 0
        self.samples = 0
        self.since: Optional[float] = None

    def step(self, samples: int) -> None:
        """Call after each optimizer step with the number of cases it trained on."""
        self.steps += 1
        if self.since is None:
            self._sync()
            self.since = time.perf_counter()
        else:
            self.samples += samples

    def summary(self, world: int = 1) -> dict[str, Any]:
        """steady_steps, steady_seconds and samples_per_s (summed over `world` workers, which step
        in lockstep under DDP)."""
        if self.since is None or self.steps < 2:
            return {"steady_steps": 0, "steady_seconds": 0.0, "samples_per_s": None}
        self._sync()
        seconds = time.perf_counter() - self.since
        return {"steady_steps": self.steps - 1, "steady_seconds": round(seconds, 3),
                "samples_per_s": round(world * self.samples / seconds, 3)}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Yield `items`, produced up to `depth` ahead on a background thread (the tokenizer and
    most of torch release the GIL, so preparing the next batch overlaps the current step)."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put((end, None))
        except BaseException as e:  # handed to the consumer, which raises it
            buffer.put((end, e))

    thread = threading.Thread(target=produce, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = buffer.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()


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
    from profilerec.embeddings import item_texts

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


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """The finetune job: train on Ray Train, then write the best epoch's model to `cfg.output`.

    Returns the manifest written next to the model (best validation metrics, epochs, seconds).
    """
    import ray.train

    # the workers run in another directory: hand them absolute locations
    cfg = dataclasses.replace(cfg, input=storage.absolute(cfg.input), output=storage.absolute(cfg.output),
                              model=_absolute_model(cfg.model))
    started = time.perf_counter()
    # more epochs continue a run
    run = fit_on_ray_train(finetune_loop, cfg, ("epochs", "patience", "output"),
                           ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=METRIC,
                                                      checkpoint_score_order="max"))
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


@dataclasses.dataclass
class RayTrainRun:
    """A finished Ray Train run: its result (with at least one checkpoint) and how it ran."""

    result: Any
    name: str
    storage_path: str
    use_gpu: bool


def fit_on_ray_train(loop: Any, cfg: Any, ignored: Sequence[str], checkpoints: Any) -> RayTrainRun:
    """Run the worker function `loop` on a TorchTrainer for a job config with num_workers, use_gpu,
    storage_path, run_name and ray fields (gloo on CPU, NCCL on GPU). The run is named by a
    fingerprint of the settings except those and `ignored`, so the same settings resume it."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from profilerec.cluster import cluster_gpus, init_ray, model_worker_runtime_env, train_worker_resources

    init_ray(cfg.ray)
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else cluster_gpus() > 0
    storage_path = storage.absolute(cfg.storage_path) or default_storage(cfg.output)
    ignored = ("ray", "storage_path", "run_name", "num_workers", "use_gpu", "threads_per_worker", *ignored)
    name = f"{cfg.run_name}-{fingerprint(cfg, ignored)}"
    trainer = TorchTrainer(
        loop,
        train_loop_config={"cfg": to_dict(cfg)},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=train_worker_resources(use_gpu)),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(name=name, storage_path=storage_path, checkpoint_config=checkpoints,
                                       worker_runtime_env=model_worker_runtime_env()),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise DataError(f"training run {name} produced no checkpoint")
    return RayTrainRun(result, name, storage_path, use_gpu)


def _absolute_model(model: str) -> str:
    """A model given as a local folder becomes absolute; "default" and hub ids stay as they are."""
    return storage.absolute(model) if os.path.isdir(model) else model


def read_metrics(folder: str) -> dict[str, Any]:
    with open(os.path.join(folder, "metrics.json")) as f:
        return json.load(f)


def fingerprint(cfg: Any, ignored: Sequence[str]) -> str:
    """A short hash of the settings that change what is trained (all but `ignored`): a run with
    the same settings resumes from its last checkpoint, other changes start afresh."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ignored}
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def default_storage(output: str) -> str:
    """`ray_train` next to the output folder (absolute, as Ray Train requires)."""
    if storage.is_uri(output):
        base, _, query = output.partition("?")
        parent = posixpath.dirname(base.rstrip("/"))
        return f"{parent}/ray_train" + (f"?{query}" if query else "")
    return os.path.abspath(os.path.join(output, os.pardir, "ray_train"))

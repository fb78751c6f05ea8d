"""What the scorer training and the encoder fine-tune share on Ray Train: running a worker loop
on a TorchTrainer under a settings fingerprint (so the same settings resume), worker threads,
bf16 autocast, step timing, prefetching the next batches, reading back a checkpoint's metrics."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import posixpath
import queue
import threading
import time
from typing import Any, Iterable, Iterator, Optional, Sequence, TypeVar

import ray.train
import torch
from profilerec.config import to_dict
from profilerec.data import storage
from profilerec.errors import DataError
from profilerec.model.encoder import cpu_multiplies_bf16
from profilerec.runtime.cluster import (
    ProgressFn,
    cluster_gpus,
    init_ray,
    model_worker_runtime_env,
    train_worker_resources,
)
from profilerec.runtime.parallel import cores_per_worker
from ray.train.torch import TorchConfig, TorchTrainer

T = TypeVar("T")


TRAIN_STATE = "train_state.pt"
PROGRESS_KEY = "progress"  # the progress queue's key in the worker loop's config


def worker_threads(threads: Optional[int] = None) -> int:
    """Set (and return) the torch threads of this Ray Train worker: `threads`, or else the cores
    this process may run on shared evenly by the workers of its node. Ray starts workers with
    OMP_NUM_THREADS=1, which leaves every other core idle."""

    if not threads:

        threads = cores_per_worker(ray.train.get_context().get_local_world_size())
    torch.set_num_threads(threads)
    return threads


def bf16_enabled(setting: Optional[bool], device: torch.device) -> bool:
    """Whether to train under bf16 autocast: `setting`, or by default on CUDA GPUs that support it
    and on CPUs that multiply bf16 in hardware (AMX; faster than fp32 there, docs/throughput.md)."""
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
class RayTrainRun:
    """A finished Ray Train run: its result (with at least one checkpoint) and how it ran."""

    result: Any
    name: str
    storage_path: str
    use_gpu: bool


def fit_on_ray_train(loop: Any, cfg: Any, ignored: Sequence[str], checkpoints: Any,
                     progress: Optional[ProgressFn] = None) -> RayTrainRun:
    """Run the worker function `loop` on a TorchTrainer for a job config with num_workers, use_gpu,
    storage_path, run_name and ray fields (gloo on CPU, NCCL on GPU). The run is named by a
    fingerprint of the settings except those and `ignored`, so the same settings resume it.
    What the loop passes to report_progress reaches `progress(what, done, total)` in this process."""

    init_ray(cfg.ray)
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else cluster_gpus() > 0
    storage_path = storage.absolute(cfg.storage_path) or default_storage(cfg.output)
    ignored = ("ray", "storage_path", "run_name", "num_workers", "use_gpu", "threads_per_worker", *ignored)
    name = f"{cfg.run_name}-{fingerprint(cfg, ignored)}"
    with relayed_progress(progress) as queue:
        result = _fit(loop, cfg, name, storage_path, use_gpu, checkpoints, queue)
    if result.checkpoint is None:
        raise DataError(f"training run {name} produced no checkpoint")
    return RayTrainRun(result, name, storage_path, use_gpu)


def _fit(loop: Any, cfg: Any, name: str, storage_path: str, use_gpu: bool, checkpoints: Any, queue: Any) -> Any:
    """The TorchTrainer run itself; `queue` (or None) goes to the workers for report_progress."""
    trainer = TorchTrainer(
        loop,
        train_loop_config={"cfg": to_dict(cfg), PROGRESS_KEY: queue},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=train_worker_resources(use_gpu)),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(name=name, storage_path=storage_path, checkpoint_config=checkpoints,
                                       worker_runtime_env=model_worker_runtime_env()),
    )
    return trainer.fit()


@contextlib.contextmanager
def relayed_progress(progress: Optional[ProgressFn]) -> Iterator[Any]:
    """A queue (a small Ray actor) the workers put (what, done, total) on, and a thread of this
    process handing each to `progress`: the workers' output does not reach this terminal, so
    progress travels as data. Yields None, and starts nothing, without `progress`."""
    if progress is None:
        yield None
        return
    from ray.util.queue import Empty, Queue

    queue = Queue(actor_options={"num_cpus": 0})
    stop = threading.Event()

    def relay() -> None:
        while True:
            try:
                progress(*queue.get(timeout=0.5))
            except Empty:
                if stop.is_set():  # drained after the run ended
                    return

    thread = threading.Thread(target=relay, name="progress-relay", daemon=True)
    thread.start()
    try:
        yield queue
    finally:
        stop.set()
        thread.join(timeout=10)
        queue.shutdown()


def report_progress(config: dict[str, Any], what: str, done: int, total: int) -> None:
    """From a worker loop: move the driver's bar `what` to `done` of `total` (rank 0 reports;
    a no-op when the driver asked for no progress)."""
    queue = config.get(PROGRESS_KEY)
    if queue is not None and ray.train.get_context().get_world_rank() == 0:
        queue.put((what, done, total))


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

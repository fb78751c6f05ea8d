"""Joining or starting Ray, and what the cluster offers (GPUs), for every job."""

from __future__ import annotations

import logging
import os
import socket
from typing import Callable, Optional

import ray
from profilerec.config import EncodeConfig, RayConfig
from profilerec.errors import ConfigError

log = logging.getLogger(__name__)

# what the batch and training jobs call to report progress: (what is counted, done so far, total);
# the command line draws a bar per `what`, library callers may pass nothing
ProgressFn = Callable[[str, int, int], None]

# glibc malloc settings for the processes that run the model in the batch jobs (Ray Train workers,
# encoder actors). Each training step or encoded batch allocates and frees activations of many MB;
# by default glibc gives big freed blocks back to the kernel (always those over 64 MB on a
# non-main thread, where Ray Train runs its loop) and the next step faults in fresh zeroed pages.
# One arena that never maps blocks separately nor trims keeps them for reuse: fine-tuning and the
# encode job run faster on a CPU, with no higher peak RSS (measured, with the machine and the
# command: docs/throughput.md, docs/encoding.md). On a GPU node these settings are not measured yet.
MODEL_WORKER_MALLOC = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"
# set in the driver's environment to replace MODEL_WORKER_MALLOC ("" keeps glibc's defaults)
MODEL_WORKER_MALLOC_ENV = "PROFILEREC_WORKER_GLIBC_TUNABLES"


def init_ray(cfg: Optional[RayConfig] = None) -> None:
    """Connect to the cluster named by `cfg.address` or RAY_ADDRESS (set by `ray job submit`),
    or start a local Ray instance. A no-op when Ray is already initialised in this process.

    Ray logs at INFO and workers' output comes back to this process (log_to_driver): the
    command line's console sends both to the job's log file, not the terminal. An address where
    no cluster answers is a ConfigError naming the setting."""
    cfg = cfg or RayConfig()
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    setting = "ray.address" if cfg.address else "RAY_ADDRESS"
    kwargs = dict(log_to_driver=True, logging_level=logging.INFO)
    try:
        if address:
            check_reachable(address, setting)
            log.info("joining the Ray cluster at %s", address)
            ray.init(address=address, **kwargs)
        else:
            log.info("starting a local Ray instance (num_cpus=%s)", cfg.num_cpus or "all")
            # "local": a new instance of this job's own, even where `ray start` left one running
            # (without an address ray.init would join that). The dashboard serves the State API
            # that Ray Train's cleanup polls; it stays on localhost
            ray.init(address="local", num_cpus=cfg.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                     **kwargs)
    except ConnectionError as e:
        reason = " ".join(str(e).split())
        raise ConfigError(f"setting {setting}: cannot join a Ray cluster at {address or 'a local instance'}: "
                          f"{reason}") from None


def check_reachable(address: str, setting: str = "ray.address", timeout_s: float = 5.0) -> None:
    """For a `host:port` (or `ray://host:port`) address, something must answer on that port:
    ray.init would otherwise retry for a long while before it gives up. `auto` and `local` are
    left to ray.init."""
    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        if address in ("auto", "local"):
            return
        raise ConfigError(f"setting {setting}: {address!r} is not a Ray address (host:port, ray://host:port, auto)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(f"setting {setting}: no Ray cluster answers at {address} "
                          f"({e.strerror or type(e).__name__})") from None


def cluster_gpus() -> float:
    """How many GPUs the connected cluster has (0 on a CPU-only cluster)."""
    return float(ray.cluster_resources().get("GPU", 0.0))


def encoder_actor_resources(cfg: EncodeConfig, use_gpu: bool) -> dict[str, float]:
    """What one encoder actor of the encode job asks Ray for: `num_cpus_per_actor` CPUs and
    `num_gpus_per_actor` GPUs, by default one whole GPU when the cluster has GPUs, else none.
    ray_cluster.yaml's GPU worker type is sized against this (tests/test_cluster_files.py)."""
    gpus = cfg.num_gpus_per_actor if cfg.num_gpus_per_actor is not None else (1.0 if use_gpu else 0.0)
    return {"CPU": float(cfg.num_cpus_per_actor), "GPU": float(gpus)}


def train_worker_resources(use_gpu: bool) -> dict[str, float]:
    """What one Ray Train worker (fine-tuning, scorer training) asks Ray for: one CPU, plus one
    GPU when the job uses GPUs (DDP with NCCL: one process per GPU)."""
    return {"CPU": 1.0, "GPU": 1.0} if use_gpu else {"CPU": 1.0}


def model_worker_malloc() -> str:
    """The GLIBC_TUNABLES of the batch jobs' model processes: MODEL_WORKER_MALLOC, or the driver's
    PROFILEREC_WORKER_GLIBC_TUNABLES when that is set ("": glibc's defaults)."""
    return os.environ.get(MODEL_WORKER_MALLOC_ENV, MODEL_WORKER_MALLOC)


def model_worker_runtime_env() -> dict[str, dict[str, str]]:
    """The runtime environment of the batch jobs' model processes (Ray Train workers, encoder
    actors): GLIBC_TUNABLES set to model_worker_malloc(), or {} when that is empty. Other C
    libraries ignore the variable."""
    tunables = model_worker_malloc()
    return {"env_vars": {"GLIBC_TUNABLES": tunables}} if tunables else {}

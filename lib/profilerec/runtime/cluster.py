"""Joining or starting Ray, and what the cluster offers (GPUs), for every job."""

from __future__ import annotations

import logging
import os
from typing import Optional

import ray
from profilerec.config import EncodeConfig, RayConfig

log = logging.getLogger(__name__)

# glibc malloc settings for the processes that run the model in the batch jobs (Ray Train workers,
# encoder actors). Each training step or encoded batch allocates and frees activations of many MB;
# by default glibc gives big freed blocks back to the kernel (always those over 64 MB on a
# non-main thread, where Ray Train runs its loop) and the next step faults in fresh zeroed pages.
# One arena that never maps blocks separately nor trims keeps them for reuse: on a 2-core CPU,
# fine-tuning went from a median 0.90x to 0.99x the plain loop's samples/s and the encode job
# gained ~9% texts/s, with no higher peak RSS (docs/throughput.md, docs/encoding.md). On a GPU
# node these settings are not measured yet.
MODEL_WORKER_MALLOC = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184"
# set in the driver's environment to replace MODEL_WORKER_MALLOC ("" keeps glibc's defaults)
MODEL_WORKER_MALLOC_ENV = "PROFILEREC_WORKER_GLIBC_TUNABLES"


def init_ray(cfg: Optional[RayConfig] = None) -> None:
    """Connect to the cluster named by `cfg.address` or RAY_ADDRESS (set by `ray job submit`),
    or start a local Ray instance. A no-op when Ray is already initialised in this process."""
    cfg = cfg or RayConfig()
    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    kwargs = dict(log_to_driver=True, logging_level=logging.WARNING)
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, **kwargs)
    else:
        log.info("starting a local Ray instance (num_cpus=%s)", cfg.num_cpus or "all")
        # the dashboard serves the State API that Ray Train's cleanup polls; it stays on localhost
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)


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

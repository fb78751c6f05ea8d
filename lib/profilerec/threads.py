"""How many threads a process's torch and faiss use: one, where processes share the cores."""

from __future__ import annotations


def use_one_thread() -> None:
    """One torch thread and one faiss thread in this process, for processes that share the cores
    with others (pool workers, the service's replicas and shards), whatever OMP_NUM_THREADS they
    inherited: intra-op threads would only contend with the other processes, and their pools spin
    idle between calls."""
    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)

"""One line naming the machine a benchmark ran on, for every script in bench/.

The development VM has changed CPU between sessions (an AVX2 AMD EPYC, then an Intel Xeon with
AMX), and figures only compare on the same hardware, so every benchmark prints this first.
"""

from __future__ import annotations

import os
import platform


def describe() -> str:
    """Host, cores, CPU model (and whether it multiplies bf16 in hardware), memory, GPU, torch."""
    import torch
    from profilerec.model.encoder import cpu_model, cpu_multiplies_bf16

    cpu = cpu_model() or platform.machine()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.node()}: {cores} cores ({cpu}, bf16 matrix hardware: "
            f"{'yes (AMX)' if cpu_multiplies_bf16() else 'no'}), {memory:.0f} GiB, {gpu}, torch {torch.__version__}")

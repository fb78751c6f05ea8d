"""Prepare: a source folder or file -> canonical Parquet (events, items, cases, manifest).

    python jobs/prepare.py --source amazon --input ../shared/data/amazon-industrial --output work/prepared
    python jobs/prepare.py --source movielens --input ../shared/data/movielens-small --output work/ml
    python jobs/prepare.py --config configs/prepare.yaml --sample_users 500
"""

from __future__ import annotations

import time

from profilerec.cli.console import run_job
from profilerec.config import PrepareConfig, load_config
from profilerec.data.datasets import describe, prepare


def main() -> None:
    cfg = load_config(PrepareConfig)
    started = time.perf_counter()
    data = prepare(cfg)
    print(describe(data, cfg.output))
    print(f"took {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    run_job(main)

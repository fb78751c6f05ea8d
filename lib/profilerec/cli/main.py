"""The `profilerec` command: `profilerec <job> [--config file.yaml] [--setting value ...]`."""

from __future__ import annotations

import sys
from typing import Optional

from profilerec.cli.commands import COMMANDS
from profilerec.cli.console import run_job

USAGE = """usage: profilerec <command> [--config FILE.yaml] [--name value ...]

commands:
  demo       the whole workflow on the bundled defaults, then the live service (= pipeline)
  pipeline   prepare -> encode -> finetune -> encode -> profiles -> evaluate -> serve
  prepare    source files -> canonical Parquet
  encode     texts -> embeddings on a Ray Data actor pool
  finetune   fine-tune the encoder with Ray Train
  train      fit the profile scorer (the recommendation model) with Ray Train
  profiles   every user's profile from the whole log
  evaluate   full-ranking evaluation with baselines
  benchmark  the ablation table from scratch (train every variant, evaluate valid and test)

Settings are the fields of the job's config dataclass (lib/profilerec/config.py), for example
  profilerec evaluate --split valid --max_cases 500
  profilerec demo --work_dir /tmp/work --finetune.max_steps_per_epoch 10
"""


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the `profilerec` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help") or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help", "help") else sys.stdout)
        if argv and argv[0] not in ("-h", "--help", "help"):
            print(f"unknown command {argv[0]!r}", file=sys.stderr)
            sys.exit(2)
        return
    command = COMMANDS[argv[0]]
    run_job(lambda: command(argv[1:]))

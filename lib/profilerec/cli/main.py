"""The `profilerec` command: `profilerec <job> [--config file.yaml] [--setting value ...]`."""

from __future__ import annotations

import sys
from typing import Optional

from profilerec.cli.commands import JOBS, run_job
from profilerec.cli.console import EXIT_USER_ERROR
from profilerec.cli.help import main_help, print_help


def main(argv: Optional[list[str]] = None) -> None:
    """Entry point of the `profilerec` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print_help(main_help((name, job.summary + (" (= pipeline)" if name == "demo" else ""))
                             for name, job in JOBS.items()))
        return
    if argv[0] not in JOBS:
        print(f"error: unknown job {argv[0]!r}; jobs: {', '.join(JOBS)} (profilerec --help)", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)
    run_job(JOBS[argv[0]], argv[1:])

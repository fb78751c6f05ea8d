"""`python jobs/benchmark.py [--config FILE.yaml] [--name value ...]`: see profilerec.cli.commands.benchmark."""

from profilerec.cli.commands import benchmark
from profilerec.cli.console import run_job

if __name__ == "__main__":
    run_job(benchmark)

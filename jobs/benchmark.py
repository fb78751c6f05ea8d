"""`python jobs/benchmark.py [--config FILE.yaml] [--name value ...]`: see profilerec.commands.benchmark."""

from profilerec.cli_support import run_job
from profilerec.commands import benchmark

if __name__ == "__main__":
    run_job(benchmark)

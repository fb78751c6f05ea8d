"""`python jobs/evaluate.py [--config FILE.yaml] [--name value ...]`: see profilerec.cli.commands.evaluate."""

from profilerec.cli.commands import evaluate
from profilerec.cli.console import run_job

if __name__ == "__main__":
    run_job(evaluate)

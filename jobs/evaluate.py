"""`python jobs/evaluate.py [--config FILE.yaml] [--name value ...]`: see profilerec.commands.evaluate."""

from profilerec.cli_support import run_job
from profilerec.commands import evaluate

if __name__ == "__main__":
    run_job(evaluate)

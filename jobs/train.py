"""`python jobs/train.py [--config FILE.yaml] [--name value ...]`: see profilerec.cli.commands.train."""

from profilerec.cli.commands import train
from profilerec.cli.console import run_job

if __name__ == "__main__":
    run_job(train)

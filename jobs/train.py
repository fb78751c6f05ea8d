"""`python jobs/train.py [--config FILE.yaml] [--name value ...]`: see profilerec.commands.train."""

from profilerec.cli_support import run_job
from profilerec.commands import train

if __name__ == "__main__":
    run_job(train)

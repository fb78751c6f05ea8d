"""`python jobs/encode.py [--config FILE.yaml] [--name value ...]`: see profilerec.cli.commands.encode."""

from profilerec.cli.commands import encode
from profilerec.cli.console import run_job

if __name__ == "__main__":
    run_job(encode)

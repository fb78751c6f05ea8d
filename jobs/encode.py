"""`python jobs/encode.py [--config FILE.yaml] [--name value ...]`: see profilerec.commands.encode."""

from profilerec.cli_support import run_job
from profilerec.commands import encode

if __name__ == "__main__":
    run_job(encode)

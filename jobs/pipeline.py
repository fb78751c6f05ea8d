"""`python jobs/pipeline.py [--config FILE.yaml] [--name value ...]`: see profilerec.cli.commands.pipeline."""

from profilerec.cli.commands import pipeline
from profilerec.cli.console import run_job

if __name__ == "__main__":
    run_job(pipeline)

"""`python jobs/pipeline.py [--config FILE.yaml] [--name value ...]`: see profilerec.commands.pipeline."""

from profilerec.cli_support import run_job
from profilerec.commands import pipeline

if __name__ == "__main__":
    run_job(pipeline)

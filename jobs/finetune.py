"""`python jobs/finetune.py [--config FILE.yaml] [--name value ...]`: see profilerec.cli.commands.finetune."""

from profilerec.cli.commands import finetune
from profilerec.cli.console import run_job

if __name__ == "__main__":
    run_job(finetune)

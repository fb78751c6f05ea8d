"""`python jobs/finetune.py [--config FILE.yaml] [--name value ...]`: see profilerec.commands.finetune."""

from profilerec.cli_support import run_job
from profilerec.commands import finetune

if __name__ == "__main__":
    run_job(finetune)

"""`python jobs/profiles.py [--config FILE.yaml] [--name value ...]`: see profilerec.cli.commands.profiles."""

from profilerec.cli.commands import profiles
from profilerec.cli.console import run_job

if __name__ == "__main__":
    run_job(profiles)

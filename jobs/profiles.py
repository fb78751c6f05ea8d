"""`python jobs/profiles.py [--config FILE.yaml] [--name value ...]`: see profilerec.commands.profiles."""

from profilerec.cli_support import run_job
from profilerec.commands import profiles

if __name__ == "__main__":
    run_job(profiles)

"""`python jobs/index.py [--config FILE.yaml] [--setting value ...]`: the same as `profilerec index`
(`--help` lists the settings); see profilerec.cli.commands."""

from profilerec.cli.commands import run_job

if __name__ == "__main__":
    run_job("index")

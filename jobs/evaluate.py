"""`python jobs/evaluate.py [--config FILE.yaml] [--setting value ...]`: the same as `profilerec evaluate`
(`--help` lists the settings); see profilerec.cli.commands."""

from profilerec.cli.commands import run_job

if __name__ == "__main__":
    run_job("evaluate")

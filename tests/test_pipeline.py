"""The main job end to end, as a newcomer runs it: every stage, then the live service."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, write_tiny_amazon

# the demo's whole terminal output: stages, progress, the report, the service's answers, summary
MAX_DEMO_LINES = 60

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # the demo runs every stage on Ray


def test_demo_runs_every_stage_and_the_service_answers(tmp_path):
    source = write_tiny_amazon(tmp_path / "source", n_users=16)
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "profilerec", "demo", "--work_dir", str(work), "--prepare.input", str(source),
           "--train.epochs", "2",
           "--serve.port", str(free_port()), "--ray.num_cpus", "4"]
    # captured, so not a terminal: each progress bar prints its final state only, as one line
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    out = run.stdout
    assert "Recommendations for a new user" in out and "Recommendations after those events" in out
    assert "Wall time per stage" in out
    # the terminal gets the job's own story; Ray's logs and the workers' output go to the log file
    terminal = run.stdout + run.stderr
    assert "\r" not in terminal
    assert len(terminal.rstrip("\n").split("\n")) <= MAX_DEMO_LINES, terminal
    for ray_line in ("Started a local Ray instance", "RayTrainWorker", "Reporting training result", "logging_progress"):
        assert ray_line not in terminal
    log = Path(re.search(r"^Full log: (.+)$", out, re.MULTILINE).group(1))
    assert log.parent == work / "logs" and log.is_file()
    logged = log.read_text()
    assert "Started a local Ray instance" in logged and "(RayTrainWorker" in logged
    report = json.loads((work / "report" / "report.json").read_text())
    assert set(report["methods"]) == {"popularity", "zero-shot profile", "profilerec", "profilerec (two-stage)"}
    assert "| profilerec |" in out  # the report table is printed
    assert (work / "report" / "report.png").stat().st_size > 1000
    assert (work / "model" / "scorer" / "scorer.pt").is_file()
    assert (work / "profiles" / "states.parquet").is_file()
    # the service logged the demo user's events durably
    wal = list((work / "serve_state").rglob("*.jsonl"))
    assert any("demo-user" in p.read_text() for p in wal)


def test_a_bad_setting_is_one_line_and_exit_code_2(tmp_path):
    run = subprocess.run([sys.executable, "-m", "profilerec", "demo", "--finetune.epoch", "3"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().startswith("error: unknown setting finetune.epoch")
    assert "Traceback" not in run.stderr

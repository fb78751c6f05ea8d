"""The command line as a user meets it: `--help` for every job, and every user error as one line
on stderr (`error: ...`, naming the setting or file) with exit code 2, no stack trace.

The bad invocations run `python -m profilerec ...` in a subprocess and fail before Ray starts;
the one marked `ray` fails inside a Ray Train worker, to show such errors arrive as one line too.
"""

import dataclasses
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_tiny_amazon
from profilerec import config
from profilerec.cli.commands import JOBS
from profilerec.cli.console import user_error
from profilerec.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]


def profilerec(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m profilerec <args>` in `cwd`, output captured."""
    return subprocess.run([sys.executable, "-m", "profilerec", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def assert_user_error(run: subprocess.CompletedProcess, *named: str) -> None:
    """Exit code 2 and exactly one line on stderr, `error: ...`, mentioning each of `named`."""
    lines = run.stderr.splitlines()
    assert run.returncode == 2, run.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    for name in named:
        assert name in lines[0], lines[0]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A prepared folder of a few users, made by the prepare job (no Ray)."""
    base = tmp_path_factory.mktemp("cli")
    source = write_tiny_amazon(base / "source", n_users=8)
    run = profilerec("prepare", "--input", str(source), "--output", str(base / "prepared"), cwd=base)
    assert run.returncode == 0, run.stderr
    return base / "prepared"


@pytest.fixture
def busy_port():
    """A localhost port something listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


# (arguments, what the error line must name); {tmp} is a fresh folder, {prepared} the prepared one
BAD_INVOCATIONS = [
    (["nosuch"], ["unknown job 'nosuch'"]),
    (["evaluate", "--split", "nosuch"], ["setting split", "'nosuch'"]),
    (["train", "--eval_split", "nosuch"], ["setting eval_split"]),
    (["train", "--epochs", "abc"], ["setting epochs", "whole number"]),
    (["demo", "--finetune.epoch", "3"], ["unknown setting finetune.epoch"]),
    (["demo", "--encode.output", "{tmp}/x"], ["setting encode.output", "work_dir"]),
    (["demo", "--verbose", "maybe"], ["setting verbose", "true or false"]),
    (["prepare", "--input", "{tmp}/no-such-folder"], ["{tmp}/no-such-folder"]),
    (["prepare", "--source", "nosuch"], ["setting source", "'nosuch'"]),
    (["prepare", "--config", "{tmp}/missing.yaml"], ["{tmp}/missing.yaml"]),
    (["prepare", "--source", "generic", "--input", "{tmp}/generic", "--output", "{tmp}/out",
      "--columns", "{user_id: nosuch, item_id: asin, items.item_id: asin}"], ["nosuch", "columns"]),
    (["evaluate", "--input", "{tmp}/nothing-here"], ["setting input", "{tmp}/nothing-here"]),
    (["evaluate", "--input", "{prepared}", "--embeddings", "{tmp}/no-embeddings"], ["setting embeddings"]),
    (["evaluate", "--max_cases", "0"], ["setting max_cases"]),
    (["encode", "--precision", "fp64"], ["setting precision", "'fp64'"]),
    (["encode", "--model", "{tmp}/no-model", "--input", "{prepared}"], ["setting model", "{tmp}/no-model"]),
    (["train", "--ray.address", "127.0.0.1:1"], ["setting ray.address", "127.0.0.1:1"]),
    (["demo", "--ray.address", "no-port-here"], ["setting ray.address"]),
    (["demo", "--serve.port", "{busy_port}"], ["setting serve.port", "{busy_port}"]),
    (["demo", "stray"], ["unexpected argument 'stray'"]),
]


@pytest.mark.parametrize("args, named", BAD_INVOCATIONS, ids=[" ".join(a)[:60] for a, _ in BAD_INVOCATIONS])
def test_a_user_error_is_one_line_on_stderr_and_exit_code_2(args, named, tmp_path, prepared, busy_port):
    (tmp_path / "generic").mkdir()
    (tmp_path / "generic" / "events.csv").write_text("visitor,asin,ts\nu1,i1,1\n")
    (tmp_path / "generic" / "items.csv").write_text("asin,title\ni1,a thing\n")
    values = {"tmp": str(tmp_path), "prepared": str(prepared), "busy_port": str(busy_port)}
    run = profilerec(*(fill_in(a, values) for a in args), cwd=tmp_path)
    assert_user_error(run, *(fill_in(n, values) for n in named))


def fill_in(text: str, values: dict[str, str]) -> str:
    """`text` with each `{name}` of `values` replaced (other braces, YAML's, left alone)."""
    for name, value in values.items():
        text = text.replace("{" + name + "}", value)
    return text


def test_the_same_errors_from_the_job_scripts(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "jobs" / "evaluate.py"), "--split", "nosuch"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert_user_error(run, "setting split")


def test_help_lists_the_jobs(tmp_path):
    run = profilerec("--help", cwd=tmp_path)
    assert run.returncode == 0 and not run.stderr
    for name, job in JOBS.items():
        assert f"  {name} " in run.stdout and job.summary.split()[0] in run.stdout


@pytest.mark.parametrize("job", sorted(JOBS))
def test_job_help_lists_every_setting_with_default_and_description(job, tmp_path):
    run = profilerec(job, "--help", cwd=tmp_path)
    assert run.returncode == 0 and not run.stderr, run.stderr
    spec = JOBS[job]
    settings = [s for s in config.iter_settings(spec.config()) if s.name not in spec.derived]
    settings += list(config.iter_settings(config.ConsoleConfig()))
    for s in settings:
        assert f"--{s.name} " in run.stdout, s.name
        assert s.help.split()[0] in run.stdout
    if job == "demo":
        assert "--train.epochs INT  (default: 15)" in run.stdout
        assert "--encode.output" not in run.stdout  # set from work_dir


def test_the_job_scripts_answer_help_too(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--help"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0 and "--eval_split TEXT  (default: valid)" in run.stdout


def test_every_setting_has_a_description():
    """The help is only as good as the field descriptions: none may be missing."""
    classes = [c for c in vars(config).values() if isinstance(c, type) and dataclasses.is_dataclass(c)
               and c.__module__ == config.__name__ and c is not config.SettingInfo]
    missing = [f"{c.__name__}.{f.name}" for c in classes for f in dataclasses.fields(c) if not config.setting_help(f)]
    assert not missing, missing


def test_none_is_typed_as_shown_in_the_help():
    cfg = config.load_config(config.EvaluateConfig, ["--max_cases", "none", "--workers", "2"])
    assert cfg.max_cases is None and cfg.workers == 2


def test_errors_raised_inside_ray_are_told_by_their_own_message():
    """What Ray wraps a worker's or task's exception in, unwrapped to the user's message."""
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError, WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    data = DataError("no valid cases in /x: nothing to choose the epochs on")
    in_task = RayTaskError("fn", "Traceback ...\nDataError: ...", data).as_instanceof_cause()
    in_worker = WorkerGroupError("failed", {0: UserExceptionWithTraceback(data, "Traceback ...")})
    in_controller = ControllerError(ConfigError("setting x: bad"))
    assert user_error(in_task) == user_error(in_worker) == str(data)
    assert user_error(in_controller) == "setting x: bad"
    assert user_error(FileNotFoundError(2, "No such file or directory", "/a/b")) == "no such file or directory: /a/b"
    assert user_error(RuntimeError("a bug")) is None


@pytest.mark.ray
def test_an_error_inside_a_ray_train_worker_is_one_line_too(tmp_path, prepared):
    """Prepared data whose validation split lost its cases: the train job's worker loop refuses it
    (after Ray started); the driver prints the worker's message, not Ray's wrapping."""
    work = tmp_path / "work"
    (work / "prepared").mkdir(parents=True)
    for part in prepared.iterdir():
        if part.is_file():
            (work / "prepared" / part.name).write_bytes(part.read_bytes())
    cases = pq.read_table(work / "prepared" / "cases.parquet")
    pq.write_table(cases.filter(pa.compute.not_equal(cases.column("split"), "valid")),
                   work / "prepared" / "cases.parquet")
    items = pq.read_table(work / "prepared" / "items.parquet").column("item_id")
    vectors = np.random.default_rng(0).normal(size=(len(items), 8)).astype(np.float32)
    (work / "embeddings" / "items").mkdir(parents=True)
    pq.write_table(pa.table({"item_id": items, "vector": pa.FixedSizeListArray.from_arrays(vectors.ravel(), 8)}),
                   work / "embeddings" / "items" / "part-0.parquet")
    run = profilerec("train", "--input", str(work / "prepared"), "--embeddings", str(work / "embeddings"),
                     "--output", str(work / "model"), "--ray.num_cpus", "2", cwd=tmp_path, timeout=600)
    assert_user_error(run, "no valid cases")
    assert list((work / "logs").glob("train-*.log"))

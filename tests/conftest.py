"""Shared fixtures: one local Ray instance per session and a small real work folder.

The work folder is built the way users build theirs: a slice of the bundled Amazon sample goes
through the prepare job, the Ray Data encode job (real default model), the Ray Train scorer job
and the batch profiles job.
"""

import errno
import json
import socket
import subprocess
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "lib" / "profilerec" / "sample_data" / "amazon-industrial-sample"
TINY_USERS = 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tiny_amazon(folder: Path, n_users: int = TINY_USERS) -> Path:
    """The first `n_users` users of the bundled sample, with only the items their rows mention."""
    folder.mkdir(parents=True, exist_ok=True)
    frames = {s: pd.read_csv(SAMPLE / f"{s}.csv", dtype=str) for s in ("train", "valid", "test")}
    users = list(dict.fromkeys(pd.concat(frames.values()).user_id))[:n_users]
    wanted = set()
    for split, frame in frames.items():
        frame = frame[frame.user_id.isin(users)]
        frame.to_csv(folder / f"{split}.csv", index=False)
        for history, target in zip(frame.history, frame.item_id):
            wanted.update(str(history).split())
            wanted.add(target)
    with open(SAMPLE / "items.jsonl") as src, open(folder / "items.jsonl", "w") as dst:
        for line in src:
            if str(json.loads(line)["item_id"]) in wanted:
                dst.write(line)
    return folder


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: every collected test is checked
def pytest_collection_modifyitems(items):
    """Keep `-m "not ray"` and `-m "not slow"` honest: a test on the session's Ray instance must be
    marked `ray`, and one on the tiny_work folder (built by Ray jobs at session start) `slow` too."""
    unmarked = []
    for item in items:
        missing = [mark for fixture, mark in (("ray_session", "ray"), ("tiny_work", "slow"))
                   if fixture in item.fixturenames and item.get_closest_marker(mark) is None]
        if missing:
            unmarked.append(f"{item.nodeid}: mark it {' and '.join(missing)}")
    if unmarked:
        raise pytest.UsageError("tests whose fixtures start Ray lack markers:\n" + "\n".join(unmarked))


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs: a disk that really fills up (needs the right to mount, as root in CI)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


def fill(folder: Path) -> Path:
    """Write a file that takes every free byte of the disk under `folder`; returns its path."""
    path = folder / "filler"
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"x" * 4096)
        except OSError as error:
            assert error.errno == errno.ENOSPC, error
    return path


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance for the whole session (4 logical CPUs so pools never starve Ray Data)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def serve_url(ray_session):
    """Ray Serve's HTTP proxy on a free localhost port, shared by every service test."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def serve_config(work: Path, state: Path, **settings):
    """ServeConfig of the tiny work folder with the service state under `state`."""
    from profilerec.config import ServeConfig

    return ServeConfig(prepared=str(work / "prepared"), embeddings=str(work / "embeddings"), model=str(work / "model"),
                       profiles=str(work / "profiles"), state_dir=str(state / "state"), token_file=str(state / "token"),
                       **settings)


@pytest.fixture(scope="session")
def tiny_work(tmp_path_factory, ray_session):
    """A prepared + encoded + trained + indexed + profiled work folder of a few dozen real users:
    the untuned encoder's embeddings, a profile scorer trained on them and its second stage
    (work/model/scorer), the
    nearest-neighbour index of its item vectors (work/index), the batch profiles."""
    from profilerec.batch.encode import run_encode
    from profilerec.batch.index import run_index
    from profilerec.batch.profiles import run_profiles
    from profilerec.config import (
        EncodeConfig,
        IndexConfig,
        PrepareConfig,
        ProfilesConfig,
        SecondStageConfig,
        TrainConfig,
    )
    from profilerec.data.datasets import prepare
    from profilerec.training.scorer import run_train

    base = tmp_path_factory.mktemp("tiny")
    source = write_tiny_amazon(base / "source")
    work = base / "work"
    prepare(PrepareConfig(source="amazon", input=str(source), output=str(work / "prepared")))
    # fp32 on every machine (auto is bf16 on CPUs with AMX): tests compare vectors with TextEncoder's
    # fp32 output; test_encode_job.py covers bf16
    run_encode(EncodeConfig(input=str(work / "prepared"), output=str(work / "embeddings"), precision="fp32"),
               use_gpu=False)
    # a second stage from the few valid cases of two dozen users, whatever its figures there: the
    # defaults ask for more cases and a gain
    run_train(TrainConfig(input=str(work / "prepared"), embeddings=str(work / "embeddings"), output=str(work / "model"),
                          epochs=4, patience=4, storage_path=str(base / "ray_train"),
                          second_stage=SecondStageConfig(min_cases=5, epochs=10, only_if_better=False)))
    run_index(IndexConfig(input=str(work / "prepared"), embeddings=str(work / "embeddings"), model=str(work / "model"),
                          output=str(work / "index"), threads=1))
    run_profiles(ProfilesConfig(input=str(work / "prepared"), embeddings=str(work / "embeddings"),
                                model=str(work / "model"), output=str(work / "profiles")))
    return work

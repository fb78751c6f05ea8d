"""The cluster workflow of docs/operations.md on a real local cluster (`ray start --head`) with a
real S3-compatible server on localhost (moto): the pipeline submitted with `ray job submit` reads
its input from and writes every output to the bucket; the service is deployed with
`serve deploy` from serve/config.yaml with its state in the bucket, then scaled (more ingress
replicas, more profile shards) by editing the config and deploying again, losing no profile."""

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import yaml
from conftest import ROOT, free_port, write_tiny_amazon

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BUCKET = "profilerec-test"
WORK = f"s3://{BUCKET}/work"
TOKEN = "cluster-token-789"
BIN = Path(sys.executable).parent


def run(*cmd, timeout=600, **kwargs):
    """Run a CLI command; returns its output (stdout and stderr: Ray's CLI logs to both), which is
    also the assertion message when it fails."""
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on localhost with the tiny Amazon sample uploaded under raw/."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per S3 request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    source = write_tiny_amazon(tmp_path_factory.mktemp("s3src") / "amazon", n_users=16)
    for f in sorted(source.iterdir()):
        client.upload_file(str(f), BUCKET, f"raw/{f.name}")
    yield {"env": env, "client": client}
    server.stop()


def keys(s3, prefix):
    pages = s3["client"].get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


@pytest.fixture(scope="module")
def cluster():
    """`ray start --head --block` on free ports with its own temp dir; stopped by ending that
    process group (never `ray stop`, which would stop every Ray instance on the machine)."""
    temp = tempfile.mkdtemp(prefix="/tmp/prc-")  # short: Ray's socket paths have a length limit
    ports = {name: free_port() for name in ("gcs", "dashboard", "client", "agent", "serve")}
    # serve.app (the import_path of serve/config.yaml) is imported from the checkout on every node,
    # as the cluster images do (deploy/kubernetes/Dockerfile, ray_cluster.yaml)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")} | {"PYTHONPATH": str(ROOT)}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `python` in job entrypoints: this environment's
    # Ray token authentication, as on every cluster the project ships: the CLI commands below
    # carry the same token
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head = subprocess.Popen(
        [BIN / "ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={ports['gcs']}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
         f"--ray-client-server-port={ports['client']}", f"--dashboard-agent-listen-port={ports['agent']}",
         "--num-cpus=4", f"--temp-dir={temp}", "--disable-usage-stats"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard']}"
    try:
        deadline = time.monotonic() + 180
        while True:  # the job API answers once the head is up
            probe = subprocess.run([BIN / "ray", "job", "list", "--address", address], capture_output=True, text=True,
                                   env=env)
            if probe.returncode == 0:
                break
            assert head.poll() is None, "ray start --head exited"
            assert "Authentication" not in probe.stderr, probe.stderr[-2000:]
            assert time.monotonic() < deadline, probe.stderr[-2000:]
            time.sleep(2)
        yield {"address": address, "serve_port": ports["serve"], "env": env}
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # ray start --block stops the processes it started
        try:
            head.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        time.sleep(2)
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything of that group still running
        except ProcessLookupError:
            pass
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def submitted(cluster, s3):
    """The pipeline job, submitted as docs/operations.md shows, on the bucket."""
    runtime_env = {"env_vars": s3["env"], "excludes": ["work"]}
    out = run(BIN / "ray", "job", "submit", "--address", cluster["address"], "--submission-id", "pipeline-1",
              "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env), "--",
              "python", "jobs/pipeline.py", "--work_dir", WORK, "--prepare.input", f"s3://{BUCKET}/raw",
              "--train.epochs", "2", "--run_service", "false", env=cluster["env"], timeout=900)
    return out


def test_the_submitted_pipeline_reads_and_writes_the_bucket(submitted, cluster, s3):
    status = run(BIN / "ray", "job", "status", "--address", cluster["address"], "pipeline-1", env=cluster["env"])
    assert "Job 'pipeline-1' succeeded" in status, status
    assert "| profilerec |" in submitted, submitted[-3000:]  # the job's log (its report table) streamed back
    written = keys(s3, "work/")
    for key in ("prepared/events.parquet", "prepared/items.parquet", "embeddings/base/manifest.json",
                "model/scorer/scorer.pt", "profiles/states.parquet", "report/report.json", "report/report.png"):
        assert f"work/{key}" in written, sorted(written)
    assert any(k.startswith("work/ray_train/") for k in written)  # Ray Train checkpoints too
    report = json.loads(s3["client"].get_object(Bucket=BUCKET, Key="work/report/report.json")["Body"].read())
    assert report["cases"] > 0 and "profilerec" in report["methods"]


def serve_config(cluster, s3, num_shards, ingress_replicas):
    """serve/config.yaml as an operator edits it for this cluster: state in the bucket."""
    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    config["http_options"]["port"] = cluster["serve_port"]
    (app,) = config["applications"]
    app["args"].update(prepared=f"{WORK}/prepared", embeddings=f"{WORK}/embeddings/base", model=f"{WORK}/model",
                       profiles=f"{WORK}/profiles", state_dir=f"{WORK}/serve_state", num_shards=num_shards,
                       shard_num_cpus=0.1, retrieval={"index": f"{WORK}/index"})
    app["runtime_env"] = {"env_vars": s3["env"] | {"PROFILEREC_API_TOKEN": TOKEN}}
    ingress = next(d for d in app["deployments"] if d["name"] == "Ingress")
    ingress["autoscaling_config"]["min_replicas"] = ingress_replicas
    for deployment in app["deployments"]:
        deployment["ray_actor_options"]["num_cpus"] = 0.25  # 4 logical CPUs hold the job's leftovers too
    return config


def deploy(cluster, config, tmp_path):
    path = tmp_path / f"serve-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(config))
    run(BIN / "serve", "deploy", path, "--address", cluster["address"], env=cluster["env"])


def wait_running(cluster, ingress_replicas, timeout=300):
    """Until the app is RUNNING with `ingress_replicas` running Ingress replicas; `serve status`."""
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run([BIN / "serve", "status", "--address", cluster["address"]], capture_output=True,
                              text=True, env=cluster["env"], timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        status = yaml.safe_load(done.stdout)
        app = (status.get("applications") or {}).get("profilerec") or {}
        ingress = (app.get("deployments") or {}).get("Ingress") or {}
        if app.get("status") == "RUNNING" and ingress.get("replica_states", {}).get("RUNNING") == ingress_replicas:
            return status
        assert app.get("status") != "DEPLOY_FAILED", status
        assert time.monotonic() < deadline, status
        time.sleep(2)


def call(method, url, timeout=120, **kwargs):
    """One API call, retried while the service answers 503 (starting, or moving shards)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = requests.request(method, url, timeout=60, **kwargs)
            if response.status_code != 503:
                return response
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, f"{method} {url} kept failing"
        time.sleep(1)


def test_serve_deploy_then_scale_ingress_and_shards_by_redeploying_loses_no_profile(submitted, cluster, s3, tmp_path,
                                                                                   monkeypatch):
    from profilerec.data.datasets import read_prepared
    from profilerec.service.shard import shard_of

    for name, value in s3["env"].items():  # read the prepared items from the bucket in this process too
        monkeypatch.setenv(name, value)
    items = read_prepared(f"{WORK}/prepared").items.column("item_id").to_pylist()
    url = f"http://127.0.0.1:{cluster['serve_port']}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    users = [f"cluster-user-{n}" for n in range(12)]

    def post(n):
        events = [{"event_id": f"{u}-{n}", "user_id": u, "item_id": items[(5 * n + i) % len(items)],
                   "type": "purchase", "ts": 1_700_000_000 + 60 * n} for i, u in enumerate(users)]
        answer = call("POST", f"{url}/v1/events", json={"events": events}, headers=auth)
        assert answer.status_code == 200, answer.text
        return answer.json()

    def profiles():
        answers = {u: call("GET", f"{url}/v1/users/{u}/profile") for u in users}
        assert all(a.status_code == 200 for a in answers.values()), {u: a.text for u, a in answers.items()}
        return {u: {k: a.json()[k] for k in ("events", "last_event", "top_interests", "recent_events")}
                for u, a in answers.items()}

    deploy(cluster, serve_config(cluster, s3, num_shards=2, ingress_replicas=1), tmp_path)
    wait_running(cluster, ingress_replicas=1)
    for n in range(3):
        assert post(n)["accepted"] == len(users)
    before = profiles()
    assert all(p["events"] == 3 for p in before.values())
    # the users do live on different shards, so re-partitioning 2 -> 3 moves some of them
    assert {shard_of(u, 2) for u in users} == {0, 1} and any(shard_of(u, 2) != shard_of(u, 3) for u in users)

    deploy(cluster, serve_config(cluster, s3, num_shards=3, ingress_replicas=2), tmp_path)
    wait_running(cluster, ingress_replicas=2)
    assert profiles() == before, "a profile changed or was lost in the redeploy"
    assert call("GET", f"{url}/healthz").json()["shards"] == 3
    assert post(2)["duplicates"] == len(users)  # idempotency survives the move too
    assert post(3)["accepted"] == len(users)
    assert all(p["events"] == 4 for p in profiles().values())
    # the durable state is in the bucket, under the new layout
    assert any(k.startswith("work/serve_state/shards-3/") for k in keys(s3, "work/serve_state/"))

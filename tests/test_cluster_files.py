"""ray_cluster.yaml: valid for the cluster launcher of the installed Ray, and its GPU workers sized
for what the encode and training jobs ask Ray for."""

import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from profilerec.config import EncodeConfig, FinetuneConfig, PipelineConfig, TrainConfig
from profilerec.runtime.cluster import encoder_actor_resources, train_worker_resources

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def test_the_launcher_config_matches_the_launcher_schema_shipped_with_ray(cluster):
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)
    # and the schema does reject a misspelt setting (so the check above means something)
    with pytest.raises(jsonschema.ValidationError, match="head_node_typ"):
        jsonschema.validate({**cluster, "head_node_typ": "head"}, schema)


def test_the_head_node_type_exists_and_has_no_gpu(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0  # GPU work goes to the worker type only
    assert all(t.get("max_workers", 0) <= cluster["max_workers"] for t in types.values())


def gpu_workers(cluster):
    return [t for t in cluster["available_node_types"].values() if t["resources"].get("GPU", 0) > 0]


def test_gpu_workers_fit_exactly_one_encoder_actor_or_train_worker_each(cluster):
    (worker,) = gpu_workers(cluster)
    offered = worker["resources"]
    assert worker["min_workers"] <= worker["max_workers"]
    requests = [encoder_actor_resources(EncodeConfig(), use_gpu=True),
                encoder_actor_resources(PipelineConfig().encode, use_gpu=True)]
    requests += [train_worker_resources(use_gpu=True)] * 2
    for request in requests:
        assert request["GPU"] == offered["GPU"] == 1, (request, offered)
        assert request["CPU"] <= offered["CPU"], (request, offered)
    # the default number of Train workers of each training job fits the GPU workers there can be
    for cfg in (TrainConfig(), FinetuneConfig()):
        assert cfg.num_workers <= worker["max_workers"]


def test_setup_installs_the_synced_checkout_and_every_node_uses_token_auth(cluster):
    synced = [remote for remote, local in cluster["file_mounts"].items() if local == "."]
    assert synced, "the checkout is synced to every node"
    assert any(re.search(rf"pip install .*-e {re.escape(synced[0])}\b", c) for c in cluster["setup_commands"])
    assert ray.__version__ in cluster["docker"]["image"] and ray.__version__ in cluster["docker"]["head_image"]
    head = " ".join(cluster["head_start_ray_commands"])
    workers = " ".join(cluster["worker_start_ray_commands"])
    for command in (head, workers):
        assert "RAY_AUTH_MODE=token" in command
        token_path = re.search(r"RAY_AUTH_TOKEN_PATH=(\S+)", command).group(1)
        assert token_path in cluster["file_mounts"]
        assert f"PYTHONPATH={synced[0]}" in command  # serve/config.yaml's import_path, serve.app
    assert "--dashboard-host=127.0.0.1" in head  # job API and dashboard not exposed

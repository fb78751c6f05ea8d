"""deploy/kubernetes: the RayJob and RayService manifests against KubeRay's CRD schemas (vendored
in tests/schemas, see its README), and the RayService's embedded Serve config against Ray's own
Serve config schema and against serve/config.yaml."""

import copy
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from profilerec.config import EncodeConfig, ServeConfig, from_dict
from profilerec.runtime.cluster import encoder_actor_resources, train_worker_resources
from ray.serve.schema import ServeDeploySchema

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "deploy" / "kubernetes"
CRDS = yaml.safe_load((ROOT / "tests" / "schemas" / "kuberay_v1.yaml").read_text())


def strict(schema):
    """kubectl's strict field validation: an object with listed properties takes no others."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


def validator(kind):
    schema = strict({"$defs": CRDS["$defs"], **CRDS[kind]})
    return jsonschema.Draft202012Validator(schema)


def manifest(name):
    return yaml.safe_load((KUBE / name).read_text())


@pytest.mark.parametrize("name,kind", [("rayjob-pipeline.yaml", "RayJob"), ("rayservice.yaml", "RayService")])
def test_manifests_match_the_kuberay_crd_schemas(name, kind):
    doc = manifest(name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(kind).iter_errors(doc)]
    assert not errors, errors
    # a misspelt field is caught (the schema is strict, as `kubectl apply` is)
    broken = copy.deepcopy(doc)
    cluster = broken["spec"]["rayClusterSpec" if kind == "RayJob" else "rayClusterConfig"]
    cluster["workerGroupSpecs"][0]["maxReplica"] = 3
    assert any("maxReplica" in e.message for e in validator(kind).iter_errors(broken))


def cluster_spec(doc):
    return doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]


@pytest.mark.parametrize("name", ["rayjob-pipeline.yaml", "rayservice.yaml"])
def test_clusters_use_ray_token_auth_the_installed_ray_and_one_gpu_per_worker_pod(name):
    spec = cluster_spec(manifest(name))
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["rayVersion"] == ray.__version__
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    (gpu_group,) = spec["workerGroupSpecs"]
    assert gpu_group["minReplicas"] <= gpu_group["replicas"] <= gpu_group["maxReplicas"]
    (container,) = gpu_group["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    for request in (encoder_actor_resources(EncodeConfig(), use_gpu=True), train_worker_resources(use_gpu=True)):
        assert request["GPU"] == limits["nvidia.com/gpu"] == 1
        assert request["CPU"] <= float(limits["cpu"])


def test_the_pipeline_job_writes_to_shared_storage():
    entrypoint = manifest("rayjob-pipeline.yaml")["spec"]["entrypoint"].split()
    assert entrypoint[:2] == ["python", "jobs/pipeline.py"]
    assert (ROOT / entrypoint[1]).is_file()
    work_dir = entrypoint[entrypoint.index("--work_dir") + 1]
    assert work_dir.startswith("s3://")


def test_the_embedded_serve_config_is_serve_config_yaml_on_a_gpu_with_state_in_the_bucket():
    embedded = yaml.safe_load(manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)  # what `serve deploy` / KubeRay will accept
    local = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    (app,) = embedded["applications"]
    from_dict(ServeConfig, app["args"])  # the args are valid service settings
    assert all(str(app["args"][k]).startswith("s3://") for k in ("prepared", "embeddings", "model", "profiles",
                                                                  "state_dir"))
    assert app["args"]["retrieval"]["index"].startswith("s3://")
    # the only differences from serve/config.yaml: locations in the bucket, the Encoder on a GPU
    expected = copy.deepcopy(local["applications"][0])
    expected["args"].update({k: v for k, v in app["args"].items() if k in ("prepared", "embeddings", "model",
                                                                             "profiles", "state_dir", "retrieval")})
    encoder = next(d for d in expected["deployments"] if d["name"] == "Encoder")
    encoder["ray_actor_options"]["num_gpus"] = 1
    assert app == expected
    assert embedded["http_options"]["port"] == local["http_options"]["port"]

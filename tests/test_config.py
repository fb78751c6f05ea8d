"""Job configs: YAML, flags, nested sections, clear errors."""

import pytest
from profilerec.config import EncodeConfig, PipelineConfig, load_config
from profilerec.errors import ConfigError


def test_flags_override_yaml_and_nested_sections(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: 16\nmodel: /some/model\nray:\n  num_cpus: 3\n")
    cfg = load_config(EncodeConfig, ["--config", str(path), "--batch_size", "8", "--ray.address", "auto"])
    assert (cfg.batch_size, cfg.model, cfg.ray.num_cpus, cfg.ray.address) == (8, "/some/model", 3, "auto")


def test_pipeline_sections_take_dotted_flags():
    cfg = load_config(PipelineConfig, ["--finetune.epochs=2", "--serve.num_shards", "4", "--run_service", "false"])
    assert cfg.finetune.epochs == 2 and cfg.serve.num_shards == 4 and cfg.run_service is False


@pytest.mark.parametrize("argv, message", [
    (["--batch_sise", "3"], "unknown setting batch_sise"),
    (["--batch_size", "many"], "batch_size must be a whole number"),
    (["--include_event_texts", "3"], "include_event_texts must be true or false"),
    (["--config", "/nonexistent.yaml"], "config file not found: /nonexistent.yaml"),
    (["--batch_size"], "needs a value"),
])
def test_bad_settings_are_named(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(EncodeConfig, argv)


def test_the_serve_config_file_is_valid_for_ray_serve_and_profilerec():
    from pathlib import Path

    import yaml
    from profilerec.config import ServeConfig, from_dict
    from ray.serve.schema import ServeDeploySchema

    path = Path(__file__).resolve().parents[1] / "serve" / "config.yaml"
    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    app = schema.applications[0]
    assert app.import_path == "serve.app:app_builder"
    assert from_dict(ServeConfig, dict(app.args)).num_shards >= 1
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {"Ingress", "Encoder"}
    for deployment in deployments.values():
        assert deployment.max_queued_requests > 0 and deployment.backpressure_config.retry_after_s >= 1
        assert deployment.autoscaling_config["max_replicas"] > deployment.autoscaling_config["min_replicas"]

"""The profilerec Ray Serve application.

    serve run serve.app:app                   settings from $PROFILEREC_SERVE_CONFIG (YAML) or defaults
    serve deploy serve/config.yaml            on a running cluster; settings under `args:` there

The HTTP API, the deployments and the shard actors live in the library (profilerec.service.api,
profilerec.service.shard_actors); this file only binds them to their settings.
"""

from typing import Any

from profilerec.config import ServeConfig, from_dict
from profilerec.service.api import app_from_env, build_app


def app_builder(args: dict[str, Any]):
    """Application builder for Serve config files: `args` are ServeConfig settings."""
    return build_app(from_dict(ServeConfig, dict(args)))


app = app_from_env()

"""Checks of a job's settings that run before the job starts Ray: a wrong split, a missing
folder, an unknown model or a busy port is then one line a second after the command, not a
stack trace after a minute of Ray starting up. The jobs check the same things again where they
use them; these only make the common mistakes fail early."""

from __future__ import annotations

import os
import socket
import urllib.parse
from typing import Optional, Sequence

from profilerec.data import storage
from profilerec.data.datasets import prepared_manifest
from profilerec.data.schema import SPLITS
from profilerec.errors import ConfigError, DataError


def check_prepared(location: str, setting: str) -> None:
    """`location` holds prepared data (the output of the prepare job)."""
    try:
        prepared_manifest(location)
    except DataError as e:
        raise ConfigError(f"setting {setting}: {e}") from None


def check_embeddings(location: str, setting: str) -> None:
    """`location` holds embeddings (the output of the encode job)."""
    if not storage.exists(storage.join(location, "items")):
        raise ConfigError(f"setting {setting}: no embeddings at {location}: run the encode job first")


def check_folder(location: Optional[str], setting: str, what: str) -> None:
    """`location` (when set) is an existing file or folder."""
    if location and not storage.exists(location):
        raise ConfigError(f"setting {setting}: no {what} at {location}")


def check_splits(splits: Sequence[str], setting: str) -> None:
    """Each of `splits` is a split the prepare job writes."""
    for split in splits:
        if split not in SPLITS:
            raise ConfigError(f"setting {setting}: unknown split {split!r}; splits are {', '.join(SPLITS)}")


def check_text_model(model: str, setting: str) -> None:
    """`model` is a text model this machine can load: the bundled default, a folder, a hub id in
    the local Hugging Face cache, or one the hub has (asked only when it can be reached, so an
    offline machine answers at once instead of after the hub client's retries)."""
    from profilerec.model.encoder import resolve_model_path
    from transformers import AutoConfig

    try:
        path = resolve_model_path(model)
    except ConfigError as e:
        raise ConfigError(f"setting {setting}: {e}") from None
    try:
        AutoConfig.from_pretrained(path, local_files_only=True)
        return
    except (OSError, ValueError) as e:
        if os.path.isdir(path):
            raise ConfigError(f"setting {setting}: {model} is not a text model folder: {_first_line(e)}") from None
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if not _reachable(endpoint):
        raise ConfigError(f"setting {setting}: {model!r} is neither a folder here nor a model in the local Hugging "
                          f"Face cache, and {endpoint} cannot be reached to look for it") from None
    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"setting {setting}: cannot load the text model {model!r}: {_first_line(e)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _reachable(url: str, timeout_s: float = 3.0) -> bool:
    """Whether something answers on the host and port of `url`."""
    parts = urllib.parse.urlsplit(url)
    try:
        socket.create_connection((parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)),
                                 timeout=timeout_s).close()
        return True
    except OSError:
        return False


def check_precision(precision: str, setting: str) -> None:
    """`precision` is one of the encoder's choices (whether it suits the device is checked later)."""
    from profilerec.model.encoder import PRECISIONS

    choices = ("auto",) + PRECISIONS
    if precision not in choices:
        raise ConfigError(f"setting {setting}: {precision!r} is not a precision; choose one of {', '.join(choices)}")


def check_port_free(host: str, port: int, setting: str) -> None:
    """Nothing listens on `host`:`port` yet, so the service can."""
    if not 0 < port < 65536:
        raise ConfigError(f"setting {setting}: {port} is not a port number (1-65535)")
    with socket.socket() as probe:
        # a port a finished run left in TIME_WAIT is free for the service, which sets this too
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ConfigError(f"setting {setting}: cannot listen on {host}:{port} ({e.strerror or e}); "
                              f"is another service using it?") from None


def check_positive(value: Optional[int], setting: str) -> None:
    """`value` (when set) is at least 1."""
    if value is not None and value < 1:
        raise ConfigError(f"setting {setting} must be at least 1, got {value}")

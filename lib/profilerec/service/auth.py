"""The service's write token: where it comes from (an environment variable, a file, or generated
once, owner-only) and the bearer check of the write routes."""

from __future__ import annotations

import logging
import os
import secrets
from typing import Optional

import pyarrow.fs as pafs
from fastapi import HTTPException
from profilerec.config import ServeConfig
from profilerec.data import storage
from profilerec.errors import ConfigError

log = logging.getLogger(__name__)


def api_token(cfg: ServeConfig) -> str:
    """The write token: $PROFILEREC_API_TOKEN (`cfg.token_env`), else the token file (default
    <state_dir>/api_token, generated once, owner-only from its creation).

    ConfigError, naming the variable or the file, when the token found there is blank or holds
    other than printable ASCII: the service never runs with an empty token, nor with one no HTTP
    client could send (headers carry ASCII; such a token made every write a 500)."""
    token = os.environ.get(cfg.token_env)
    if token:  # unset and "" both mean: use the token file
        return _checked_token(token, f"${cfg.token_env}", "set it to a token, or unset it to use the token file")
    location = cfg.token_file or storage.join(cfg.state_dir, "api_token")
    if not storage.exists(location):
        _create_token_file(location)
    try:
        token = storage.read_bytes(location).decode("utf-8")
    except UnicodeDecodeError:
        token = "\ufffd"  # reported as not ASCII below
    return _checked_token(token, f"the API token file {location}",
                          "write a token into it, or delete it to have one generated")


def _checked_token(token: str, where: str, fix: str) -> str:
    token = token.strip()
    if not token:
        raise ConfigError(f"{where} holds a blank API token: {fix}")
    if not (token.isascii() and token.isprintable()):
        raise ConfigError(f"{where} holds an API token with characters other than printable ASCII, which HTTP "
                          f"clients cannot send in a header: {fix}")
    return token


def _create_token_file(location: str) -> None:
    token = secrets.token_urlsafe(32).encode()
    fs, path = storage.resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):  # a plain path or file://
        storage.create_private_file(path, token)
    else:  # object stores have no file modes: the bucket's policy protects it
        storage.write_bytes(token, location)
    log.warning("no API token configured: generated one in %s", location)


def check_bearer(authorization: Optional[str], token: str) -> None:
    """Pass when the `Authorization` header value is `Bearer <token>`; else raise HTTPException:
    401 when the header or its Bearer scheme is missing, 403 for any other token."""
    if not authorization or not authorization.startswith("Bearer "):
        raise HTTPException(401, "this endpoint needs an 'Authorization: Bearer <token>' header",
                            headers={"WWW-Authenticate": "Bearer"})
    given = authorization[len("Bearer "):].strip()
    # as bytes: compare_digest raises TypeError for str with non-ASCII characters (a 500)
    if not secrets.compare_digest(_utf8(given), _utf8(token)):
        raise HTTPException(403, "the bearer token is not valid")


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # any str, even one no HTTP header could hold

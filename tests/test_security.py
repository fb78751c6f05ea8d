"""Local security of the service, without Ray: the API token and its file, the bearer check, the
node's private folder, and what the logs may say about a user."""

import hashlib
import json
import logging
import os
import stat
import tempfile

import pytest
from fastapi import HTTPException
from profilerec.config import ServeConfig
from profilerec.data import node_files, storage
from profilerec.errors import ConfigError
from profilerec.service import auth
from profilerec.service.pseudonym import log_key, pseudonym
from profilerec.service.read_channel import _answer

TOKEN_ENV = "PROFILEREC_TEST_API_TOKEN"
TOKEN = "s3cret-token"


def config(tmp_path, **settings) -> ServeConfig:
    return ServeConfig(state_dir=str(tmp_path / "state"), token_env=TOKEN_ENV, **settings)


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """The node's temp dir moved to a folder of the test's own."""
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path))
    return tmp_path


# --- the API token ---------------------------------------------------------------------------


@pytest.mark.parametrize("blank", [" ", "\t \n", "\u3000"])
def test_a_blank_token_in_the_environment_is_refused_naming_the_variable(tmp_path, monkeypatch, blank):
    monkeypatch.setenv(TOKEN_ENV, blank)
    with pytest.raises(ConfigError, match=TOKEN_ENV):
        auth.api_token(config(tmp_path))


def test_an_empty_environment_variable_reads_as_unset(tmp_path, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "")
    assert len(auth.api_token(config(tmp_path))) >= 32  # generated in the state folder


def test_a_blank_token_file_is_refused_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    token_file = tmp_path / "token"
    token_file.write_text("  \n")
    with pytest.raises(ConfigError) as error:
        auth.api_token(config(tmp_path, token_file=str(token_file)))
    assert str(token_file) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("token", ["tøken", "tok\u00a0en", "tok\x07en", "tok\nen"])
def test_a_token_no_http_client_could_send_is_refused(tmp_path, monkeypatch, token):
    monkeypatch.setenv(TOKEN_ENV, token)
    with pytest.raises(ConfigError, match=TOKEN_ENV):
        auth.api_token(config(tmp_path))
    monkeypatch.delenv(TOKEN_ENV)
    (tmp_path / "token").write_bytes(token.encode("utf-8"))
    with pytest.raises(ConfigError, match="token file"):
        auth.api_token(config(tmp_path, token_file=str(tmp_path / "token")))


def test_a_token_file_that_is_not_text_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    (tmp_path / "token").write_bytes(b"\xff\xfe-binary")
    with pytest.raises(ConfigError, match="token file"):
        auth.api_token(config(tmp_path, token_file=str(tmp_path / "token")))


def test_tokens_are_stripped(tmp_path, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, f"  {TOKEN}\n")
    assert auth.api_token(config(tmp_path)) == TOKEN
    monkeypatch.delenv(TOKEN_ENV)
    (tmp_path / "token").write_text(f"{TOKEN}\n")
    assert auth.api_token(config(tmp_path, token_file=str(tmp_path / "token"))) == TOKEN


def test_the_generated_token_file_is_owner_only_from_its_creation(tmp_path, monkeypatch):
    # with chmod doing nothing, only the mode the file was created with protects it
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.setattr(os, "chmod", lambda *args, **kwargs: None)
    old_umask = os.umask(0o022)
    try:
        cfg = config(tmp_path)
        token = auth.api_token(cfg)
    finally:
        os.umask(old_umask)
    location = os.path.join(cfg.state_dir, "api_token")
    assert stat.S_IMODE(os.stat(location).st_mode) == 0o600
    assert len(token) >= 32 and auth.api_token(cfg) == token  # made once, then read
    assert os.listdir(cfg.state_dir) == ["api_token"]  # no temporary file left behind


def test_a_token_file_given_as_a_file_uri_is_owner_only_too(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.setattr(os, "chmod", lambda *args, **kwargs: None)
    location = tmp_path / "secrets" / "token"
    token = auth.api_token(config(tmp_path, token_file=f"file://{location}"))
    assert stat.S_IMODE(os.stat(location).st_mode) == 0o600 and location.read_text() == token


def test_a_token_file_another_replica_made_meanwhile_is_kept(tmp_path, monkeypatch):
    # this replica found no file, another one then linked its token into place first
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    cfg = config(tmp_path)
    os.makedirs(cfg.state_dir)
    with open(os.path.join(cfg.state_dir, "api_token"), "w") as f:
        f.write(TOKEN)
    monkeypatch.setattr(storage, "exists", lambda location: False)
    assert auth.api_token(cfg) == TOKEN
    assert os.listdir(cfg.state_dir) == ["api_token"]


# --- the bearer check ------------------------------------------------------------------------


BAD_HEADERS = [
    (None, 401), ("", 401), (f"Basic {TOKEN}", 401), (TOKEN, 401),
    ("Bearer wrong", 403), ("Bearer ", 403), (f"Bearer {TOKEN}x", 403),
    # Starlette hands over headers decoded as latin-1: UTF-8 "été" arrives as "\u00c3\u00a9t\u00c3\u00a9"
    ("Bearer é", 403), ("Bearer \u00c3\u00a9t\u00c3\u00a9", 403), ("Bearer \u2603", 403), ("Bearer \ud800", 403),
]


@pytest.mark.parametrize("header, status", BAD_HEADERS)
def test_check_bearer_refuses_a_missing_or_wrong_token(header, status):
    with pytest.raises(HTTPException) as error:
        auth.check_bearer(header, TOKEN)
    assert error.value.status_code == status
    if status == 401:
        assert error.value.headers == {"WWW-Authenticate": "Bearer"}


def test_the_right_bearer_token_passes():
    assert auth.check_bearer(f"Bearer  {TOKEN} ", TOKEN) is None
    assert auth.check_bearer("Bearer jeton-été", "jeton-été") is None


# --- the node's private folder ---------------------------------------------------------------


def test_the_private_folder_is_made_owner_only(private_tmp):
    folder = node_files.node_private_dir()
    assert folder == str(private_tmp / f"profilerec-{os.getuid()}")
    info = os.lstat(folder)
    assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700
    assert node_files.node_private_dir() == folder


def test_a_private_folder_of_ours_left_open_is_closed(private_tmp):
    folder = private_tmp / f"profilerec-{os.getuid()}"
    folder.mkdir()
    folder.chmod(0o777)
    assert node_files.node_private_dir() == str(folder)
    assert stat.S_IMODE(os.lstat(folder).st_mode) == 0o700


def test_a_symlink_in_place_of_the_private_folder_is_refused(private_tmp):
    target = private_tmp / "elsewhere"
    target.mkdir(mode=0o700)
    (private_tmp / f"profilerec-{os.getuid()}").symlink_to(target)
    with pytest.raises(ConfigError, match="symbolic link"):
        node_files.node_private_dir()


def test_a_dangling_symlink_in_place_of_the_private_folder_is_refused(private_tmp):
    (private_tmp / f"profilerec-{os.getuid()}").symlink_to(private_tmp / "not-yet")
    with pytest.raises(ConfigError, match="symbolic link"):
        node_files.node_private_dir()
    assert not (private_tmp / "not-yet").exists()


def test_a_file_in_place_of_the_private_folder_is_refused(private_tmp):
    (private_tmp / f"profilerec-{os.getuid()}").write_text("")
    with pytest.raises(ConfigError, match="not a folder"):
        node_files.node_private_dir()


def test_a_private_folder_someone_else_made_is_refused(private_tmp, monkeypatch):
    # the folder is the test user's; the process pretends to be another user, whose folder it
    # would be: a folder another local user pre-created for us
    someone = os.getuid()
    me = someone + 1
    folder = private_tmp / f"profilerec-{me}"
    folder.mkdir(mode=0o700)
    monkeypatch.setattr(os, "getuid", lambda: me)
    with pytest.raises(ConfigError, match=f"owned by uid {someone}"):
        node_files.node_private_dir()


# --- user ids in the logs --------------------------------------------------------------------


def failing_read(**args):
    raise RuntimeError("the shard could not answer")


@pytest.mark.parametrize("line", [
    json.dumps({"op": "describe", "args": {"user_id": "alice@example.com"}}).encode() + b"\n",
    b'{"op": "describe", "args": {"user_id": "alice@example.com"\n',  # not JSON
])
def test_a_failed_socket_read_logs_the_operation_and_a_pseudonym_never_the_id(caplog, line, monkeypatch):
    monkeypatch.setenv("PROFILEREC_LOG_KEY", "test-log-key")
    with caplog.at_level(logging.INFO, logger="profilerec.service.read_channel"):
        reply = json.loads(_answer(line, {"describe": failing_read}))
    assert "error" in reply
    assert "alice@example.com" not in caplog.text and "alice" not in caplog.text
    if line.endswith(b"}}\n"):
        assert "describe" in caplog.text and pseudonym("alice@example.com") in caplog.text


def unkeyed(user_id: str) -> str:
    """The pseudonym as it was: an unkeyed hash anyone can compute for a guessed id."""
    return hashlib.blake2b(user_id.encode("utf-8"), digest_size=6, person=b"profilerec-log").hexdigest()


def test_the_log_pseudonym_is_keyed_by_the_deployment_key(monkeypatch):
    monkeypatch.setenv("PROFILEREC_LOG_KEY", "key-one")
    first = pseudonym("alice")
    assert pseudonym("alice") == first and pseudonym("bob") != first
    monkeypatch.setenv("PROFILEREC_LOG_KEY", "key-two")
    assert pseudonym("alice") != first
    monkeypatch.setenv("PROFILEREC_LOG_KEY", "key-one")
    assert pseudonym("alice") == first
    assert first != unkeyed("alice") and len(first) == 12 and int(first, 16) >= 0


def test_without_a_configured_key_the_pseudonym_uses_a_private_node_key(private_tmp, monkeypatch, tmp_path_factory):
    monkeypatch.delenv("PROFILEREC_LOG_KEY", raising=False)
    log_key.cache_clear()  # read once per process: this test changes the node under it
    first = pseudonym("alice")
    assert first != unkeyed("alice") and pseudonym("alice") == first
    key_file = private_tmp / f"profilerec-{os.getuid()}" / "log-key"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    # another node (another temp dir) draws another key
    other = tmp_path_factory.mktemp("other-node")
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(other))
    log_key.cache_clear()
    assert pseudonym("alice") != first
    log_key.cache_clear()

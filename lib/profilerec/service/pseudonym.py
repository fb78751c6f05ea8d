"""Pseudonyms of user ids for logs: the service never logs an id in clear.

A pseudonym is a keyed hash, so that no one without the key can hash a guessed id and look for
it in the logs. The key is $PROFILEREC_LOG_KEY when set (give every node of a deployment the same
value, e.g. in the Ray runtime_env, for a user to have one pseudonym in every node's logs); else a
random key drawn once per node and OS user, kept owner-only in node_files.node_private_dir() as
"log-key", so every process of the node, restarted ones included, uses the same one (a new key,
and new pseudonyms, once the node's temp dir is cleared). It is not derived from the API token:
rotating the token keeps the pseudonyms.
"""

from __future__ import annotations

import functools
import hashlib
import os
import secrets

from profilerec.data import node_files, storage

KEY_ENV = "PROFILEREC_LOG_KEY"


def pseudonym(user_id: str) -> str:
    """A short tag that stands for `user_id` in logs."""
    return hashlib.blake2b(user_id.encode("utf-8"), digest_size=6, key=log_key(os.environ.get(KEY_ENV, "")),
                           person=b"profilerec-log").hexdigest()


@functools.lru_cache(maxsize=4)
def log_key(configured: str) -> bytes:
    """The hashing key from the `configured` secret, or from the node's key file when it is blank."""
    secret = configured.strip().encode("utf-8")
    if not secret:
        path = os.path.join(node_files.node_private_dir(), "log-key")
        storage.create_private_file(path, secrets.token_hex(32).encode())
        with open(path, "rb") as f:
            secret = f.read().strip()
    return hashlib.blake2b(secret, digest_size=32, person=b"profilerec-lkey").digest()  # blake2b keys: <= 64 bytes

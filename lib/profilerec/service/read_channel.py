"""Reads of a profile shard over a local socket: the service's fast path for recommendations.

A Ray actor call costs more on a busy small machine than scoring a profile takes
(bench/read_hop_bench.py measures both transports side by side).
So each shard actor also answers reads on a Unix socket, served on the actor's own event loop
between its Ray calls; an ingress replica on the same node sends its reads there and its
writes through Ray. Consistency is the actor's: a read is answered after every write the actor
finished, and a write's 2xx is only sent once the actor finished it. Writes never use the
socket: they need Ray's retries and restarts.

The protocol is one JSON line per request, `{"op": ..., "args": {...}}`, answered by one JSON
line, `{"result": ...}` or `{"error": ...}`. Only the read operations a shard names are served;
the socket file is readable by its owner only. A reader whose socket is gone (the actor was
restarted, or lives on another node) reports `ChannelClosed`, and the caller goes through Ray,
which waits for the restart.

A reader first waits for the answer without yielding its event loop, for up to `quick_wait_s`.
Under Ray Serve that matters: once a request handler yields, the replica starts watching the
client for a disconnect, which costs two Ray calls to the HTTP proxy and a cancellation per
request, in latency and in proxy CPU. A shard answers a read quickly; when it is busy for longer
(a large batch of events, a snapshot), the
reader stops blocking after `quick_wait_s` and awaits the rest of the answer on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from typing import Any, Callable, Optional

from profilerec.data import node_files
from profilerec.service.pseudonym import pseudonym

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 1 << 20  # a request is a user id and a few options; an answer k <= 200 items


class ChannelClosed(Exception):
    """The socket is gone or broke mid-request: read through Ray instead."""


class ReadFailed(Exception):
    """The shard raised while answering a read (logged there with its traceback)."""


def socket_path(name: str) -> str:
    """Where the actor called `name` in this process listens (node_files.process_file)."""
    return node_files.process_file(name, ".sock")


async def serve_reads(path: str, operations: dict[str, Callable[..., Any]]) -> asyncio.AbstractServer:
    """Answer `operations` (name -> function of keyword args returning JSON-able data) on a Unix
    socket at `path`, on the running event loop. Sockets of earlier incarnations are removed."""
    prefix = os.path.basename(path).rsplit("-", 1)[0]
    folder = os.path.dirname(path)
    for stale in os.listdir(folder):
        if stale.startswith(prefix + "-") and stale.endswith(".sock") and os.path.join(folder, stale) != path:
            _remove(os.path.join(folder, stale))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(_answer(line, operations))
                await writer.drain()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError) as error:
            log.warning("read channel: dropped a connection: %s", error)
        finally:
            writer.close()

    server = await asyncio.start_unix_server(handle, path=path, limit=MAX_LINE_BYTES)
    os.chmod(path, 0o600)
    return server


def _answer(line: bytes, operations: dict[str, Callable[..., Any]]) -> bytes:
    request: Any = None
    try:
        request = json.loads(line)
        op = operations.get(request.get("op"))
        if op is None:
            raise ValueError(f"unknown read operation {request.get('op')!r}")
        reply = {"result": op(**request.get("args", {}))}
    except Exception as error:  # the reader gets the message; the traceback stays in this log
        log.exception("read channel: %s failed", _loggable(request))
        reply = {"error": f"{type(error).__name__}: {error}"}
    return json.dumps(reply).encode("utf-8") + b"\n"


def _loggable(request: Any) -> str:
    """What the log may say of a request: its operation and a pseudonym of its user, never the
    request line (it holds the user id in clear)."""
    if not isinstance(request, dict):
        return "an unreadable request"
    args = request.get("args")
    user_id = args.get("user_id") if isinstance(args, dict) else None
    described = f"read {str(request.get('op'))[:40]!r}"
    if isinstance(user_id, str):
        described += f" of user {pseudonym(user_id)}"
    return described


class ReadClient:
    """Connections to one shard's read socket, each used by one request at a time."""

    def __init__(self, path: str, quick_wait_s: float = 0.0):
        self.path = path
        self.quick_wait_s = quick_wait_s
        self.quick: Optional[socket.socket] = None  # the blocking connection, when not in use
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def call(self, op: str, **args: Any) -> Any:
        """The result of `op(**args)` on the shard; ChannelClosed when the socket is gone."""
        request = json.dumps({"op": op, "args": args}).encode("utf-8") + b"\n"
        try:
            line = await (self._call_quick(request) if self.quick_wait_s > 0 else self._call_async(request))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as error:
            self.close()
            raise ChannelClosed(str(error)) from error
        if not line.endswith(b"\n"):  # the shard closed the connection: it stopped
            self.close()
            raise ChannelClosed("the shard closed the connection")
        reply = json.loads(line)
        if "error" in reply:
            raise ReadFailed(reply["error"])
        return reply["result"]

    async def _call_async(self, request: bytes) -> bytes:
        reader, writer = self.idle.pop() if self.idle else await asyncio.open_unix_connection(
            self.path, limit=MAX_LINE_BYTES)
        writer.write(request)
        await writer.drain()
        line = await reader.readline()
        if line:
            self.idle.append((reader, writer))
        return line

    async def _call_quick(self, request: bytes) -> bytes:
        """Send on the blocking connection and wait for the answer without yielding, for up to
        quick_wait_s; past that, await the rest on the event loop (the connection joins `idle`)."""
        sock, self.quick = self.quick, None  # taken: another read may run while this one awaits
        received = b""
        try:
            if sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(self.path)
            sock.settimeout(None)  # a short request into an empty buffer: never a partial send
            sock.sendall(request)
            deadline = time.monotonic() + self.quick_wait_s
            while not received.endswith(b"\n"):
                sock.settimeout(max(deadline - time.monotonic(), 1e-6))
                chunk = sock.recv(1 << 16)
                if not chunk:
                    sock.close()
                    return received
                received += chunk
                if len(received) > MAX_LINE_BYTES:
                    raise ConnectionError(f"a read answer longer than {MAX_LINE_BYTES} bytes")
        except socket.timeout:
            sock.setblocking(False)
            reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_LINE_BYTES)
            line = received + await reader.readline()
            if line.endswith(b"\n"):
                self.idle.append((reader, writer))
            return line
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        self.quick = sock
        return received

    def close(self) -> None:
        """Close the idle connections."""
        if self.quick is not None:
            self.quick.close()
            self.quick = None
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass

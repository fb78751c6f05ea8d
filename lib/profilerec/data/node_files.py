"""The files the processes of one node share, in this OS user's private folder of the node's temp
dir, and their removal once no running process uses them.

Two kinds live there:

- files made once per node and used by many processes (`node_file`): an item matrix, an Arrow
  table of item fields, the event-text vectors, the node's copy of an index kept in a bucket.
  They are named after what they were made from, so a new model or a new encode gets new files;
- a process's own files (`process_file`): a shard's read socket and profile board, named with
  the pid of the process.

Left alone, a node that serves for weeks, restarting replicas and retraining models, would keep
every file it ever made (a million items' matrix is 1.6 GB, a shard's board 200 MB). So each
process that uses a shared file holds a shared lock on the file's `.lock` companion for as long
as it lives (the kernel drops the lock when it exits, however it exits), and the first time a
process uses the folder it removes (`remove_unused`):

- a shared file whose lock no process holds (a later process that needs it makes it again);
- a process file, or a file half-written by a process, whose process no longer runs.

The folder belongs to one OS user on one node, so pids name processes of that node.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import stat
import tempfile
from typing import Callable, Optional

from profilerec.errors import ConfigError

LOCK = ".lock"  # held shared by every process using the file
MAKE = ".make"  # held by the process making the file
# process_file's names: 16 hex digits of the actor's name, the pid, a suffix
_PROCESS_FILE = re.compile(r"^[0-9a-f]{16}-(\d+)\.")
# node_file's half-written files: the name, the writer's pid, ".partial"
_PARTIAL = re.compile(r"\.(\d+)\.partial$")

_held: dict[str, int] = {}  # shared file -> open descriptor of its lock, held for this process's life
_swept: set[str] = set()  # folders this process has cleaned


def node_private_dir() -> str:
    """This user's private folder in the node's temp dir (owner-only), for files the processes of
    one node share; cleaned of unused files (remove_unused) on this process's first use.

    The temp dir is shared with every local user, any of whom may have made this folder first:
    ConfigError (naming it) unless it is a real folder (not a symbolic link) owned by this user.
    A folder of ours that others may enter is made owner-only."""
    folder = os.path.join(tempfile.gettempdir(), f"profilerec-{os.getuid()}")
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except FileExistsError:  # a file or a dangling symbolic link in its place: refused below
        pass
    info = os.lstat(folder)  # lstat: a link to a folder of ours is still someone else's path
    fix = "remove it, or set TMPDIR to a folder of your own"
    if stat.S_ISLNK(info.st_mode):
        raise ConfigError(f"{folder} is a symbolic link, not a private folder: {fix}")
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{folder} is not a folder: {fix}")
    if info.st_uid != os.getuid():
        raise ConfigError(f"{folder} is owned by uid {info.st_uid}, not by this user (uid {os.getuid()}), who could "
                          f"read or replace the sockets and files put there: {fix}")
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(folder, 0o700)  # ours but open (an older release, a umask): others may not enter it now
    if folder not in _swept:
        _swept.add(folder)
        remove_unused(folder)
    return folder


def process_file(name: str, suffix: str) -> str:
    """A file of this process for the actor called `name`, in the node's private folder: the pid
    tells incarnations apart, so a restarted actor never uses a stale file, and a later process
    removes it once this one has exited. A hash of the name, not the name: socket paths are
    limited to ~100 bytes."""
    tag = hashlib.blake2b(name.encode("utf-8"), digest_size=8).hexdigest()
    return os.path.join(node_private_dir(), f"{tag}-{os.getpid()}{suffix}")


def node_file(name: str, write: Callable[[str], None], folder: Optional[str] = None) -> str:
    """The path of the shared file (or folder) `name` in the node's private folder (or `folder`),
    written by `write(path)` first when no process of the node has; this process uses it from
    now on (it is kept while the process lives)."""
    if folder:
        os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder or node_private_dir(), name)
    if path in _held:
        return path
    while True:
        fd = os.open(path + LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # from here on no cleaner removes it
            if not os.path.exists(path):
                _make(path, write)
        except BaseException:
            os.close(fd)
            raise
        # a cleaner may have removed the file and its lock between the open and the lock: then the
        # lock held is no longer the file's
        if _same_file(fd, path + LOCK) and os.path.exists(path):
            _held[path] = fd
            return path
        os.close(fd)


def _make(path: str, write: Callable[[str], None]) -> None:
    """Write `path` unless another process does first: under its `.make` lock (processes starting
    together wait for the first one's file instead of each making their own), under a temporary
    name and then renamed (no process reads a half-written file)."""
    with open(path + MAKE, "w") as make:
        fcntl.flock(make, fcntl.LOCK_EX)
        if not os.path.exists(path):
            partial = f"{path}.{os.getpid()}.partial"
            _remove(partial)  # left by a failed write of this process
            write(partial)
            os.replace(partial, path)


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def remove_unused(folder: str) -> list[str]:
    """Remove from `folder` the shared files no process holds and the files of processes that no
    longer run; returns the names removed."""
    removed = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(LOCK):
            if _remove_unheld(path[: -len(LOCK)], path):
                removed.append(name[: -len(LOCK)])
            continue
        owner = _PROCESS_FILE.match(name) or _PARTIAL.search(name)
        if owner and not _running(int(owner.group(1))):
            _remove(path)
            removed.append(name)
    return removed


def _remove_unheld(path: str, lock: str) -> bool:
    """Remove shared file `path` and its `lock` when no process holds the lock."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False  # in use (or being made)
    try:
        for name in (path, path + MAKE, lock):
            _remove(name)
    finally:
        os.close(fd)
    return True


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # runs, as another user
        return True
    return True


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass

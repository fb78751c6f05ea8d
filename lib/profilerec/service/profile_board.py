"""A shard's packed profiles in shared memory, so that ingress replicas on its node answer
recommendation reads themselves, with no call to the shard.

A read through the shard's socket (read_channel.py) wakes one more process per request, and on a
busy small machine each wake-up waits for a core, which costs more latency than the read's own
CPU (bench/serve_bench.py --compare_socket measures both paths). So each shard actor also
writes the packed state (packed.py) of every user it writes or reads into a board: a file in the
node's private folder that the ingress replicas of the node memory-map read-only. A replica finds
the user there, unpacks it and scores it with its own copy of the recommender.

Rules that keep a board read exactly as good as a read from the shard:

- A user sits in slot `hash(user id) % slots`; another user hashing there takes the slot over. A
  missing user is a miss, never an answer: the reader then asks the shard, which holds everyone.
  The board is a cache of the users written or read recently, `slots` users at most.
- The shard updates the slot before the write that changed the user is answered, from its one
  event loop, so a read sent after a write's 2xx sees that write (read-your-writes).
- Each slot has a sequence number, odd while the shard writes it, and a CRC-32 of its contents.
  A reader copies the slot and keeps the copy only if the number was even and unchanged and the
  CRC matches; a torn copy is retried, then taken as a miss. The CRC makes this hold whatever
  order the CPU makes the writes visible in.
- The shard holds an exclusive lock (flock) on its board for as long as it lives. A reader that can
  take the lock knows the shard died: its restarted incarnation writes a new board, so the reader
  drops this one (a later process of the node deletes it: data/node_files.py). Readers check
  after copying, so what they return was current.
- Rows in the packed state are rows of the shard's item index. The header holds a fingerprint of
  the catalog files the shard applied (learned.VectorLog.fingerprint); a reader uses a slot only
  when its own index has the same fingerprint, before and after the copy.

Layout: a 64-byte header (magic, slot size u32, slots u32, catalog fingerprint u64), then the
slots: sequence u64, user key (16-byte hash of the id), length u32, CRC-32 u32, packed state.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import zlib
from typing import Optional

import numpy as np

MAGIC = b"PRBOARD1"
FILE_HEADER = struct.Struct("<8sIIQ")
HEADER_BYTES = 64
SLOT_HEADER = struct.Struct("<16sII")  # user key, length, CRC-32: after the 8-byte sequence number
KEY_AT = 8
SLOT_HEADER_BYTES = KEY_AT + SLOT_HEADER.size
FINGERPRINT_AT = 16
READ_TRIES = 3


def user_key(user_id: str) -> bytes:
    """The 16-byte hash a board files a user under."""
    return hashlib.blake2b(user_id.encode("utf-8"), digest_size=16, person=b"profilerec-board").digest()


def slot_bytes(max_state_bytes: int) -> int:
    """The slot size for packed states of at most `max_state_bytes` (cache-line aligned)."""
    return -(-(SLOT_HEADER_BYTES + max_state_bytes) // 64) * 64


class _Board:
    """The mapped file and its views, shared by the writer and the readers."""

    def __init__(self, path: str, fd: int, writable: bool):
        self.path = path
        self.fd = fd
        self.mm = mmap.mmap(fd, 0, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
        magic, self.slot_size, self.slots, _ = FILE_HEADER.unpack_from(self.mm)
        if magic != MAGIC:
            raise ValueError(f"{path} is not a profile board")
        # one strided view of every slot's sequence number; aligned 8-byte loads and stores
        self.seqs = np.ndarray((self.slots,), dtype="<u8", buffer=self.mm, offset=HEADER_BYTES,
                               strides=(self.slot_size,))
        self.fingerprint = np.ndarray((1,), dtype="<u8", buffer=self.mm, offset=FINGERPRINT_AT)

    def slot(self, key: bytes) -> tuple[int, int]:
        """The slot number of `key` and where it starts in the file."""
        i = int.from_bytes(key[:8], "little") % self.slots
        return i, HEADER_BYTES + i * self.slot_size

    def close(self) -> None:
        del self.seqs, self.fingerprint  # views must go before the map closes
        self.mm.close()
        os.close(self.fd)


class BoardWriter:
    """The board a shard writes; created empty, locked for the shard's lifetime."""

    def __init__(self, path: str, slots: int, max_state_bytes: int):
        """Create the board at `path` with `slots` slots for packed states of at most
        `max_state_bytes`; OSError when its folder has no room for it."""
        if slots < 1:
            raise ValueError("a profile board needs at least one slot")
        slot_size = slot_bytes(max_state_bytes)
        # locked under another name, then renamed: no one ever sees this board unlocked
        fd = os.open(path + ".new", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # allocated up front: a full disk fails here, not as a SIGBUS when a slot is first written
            os.posix_fallocate(fd, 0, HEADER_BYTES + slots * slot_size)
            os.pwrite(fd, FILE_HEADER.pack(MAGIC, slot_size, slots, 0), 0)
            os.rename(path + ".new", path)
        except OSError:
            os.close(fd)
            os.remove(path + ".new")
            raise
        self.board = _Board(path, fd, writable=True)

    @property
    def path(self) -> str:
        return self.board.path

    def set_fingerprint(self, fingerprint: int) -> None:
        """Record the catalog the shard's item rows refer to (before any state using it is put)."""
        self.board.fingerprint[0] = fingerprint

    def put(self, user_id: str, state: bytes) -> None:
        """Make `state` the user's packed state on the board (taking the slot over)."""
        board = self.board
        if len(state) > board.slot_size - SLOT_HEADER_BYTES:
            self.remove(user_id)  # cannot happen with the sizes the shard gives; stay correct anyway
            return
        key = user_key(user_id)
        self._write(*board.slot(key), key, state)

    def remove(self, user_id: str) -> None:
        """Take the user off the board, if their slot holds them."""
        key = user_key(user_id)
        i, at = self.board.slot(key)
        if self.board.mm[at + KEY_AT:at + KEY_AT + len(key)] == key:
            self._write(i, at, bytes(16), b"")

    def _write(self, i: int, at: int, key: bytes, state: bytes) -> None:
        board = self.board
        seq = int(board.seqs[i])
        board.seqs[i] = seq + 1  # odd: readers keep away
        board.mm[at + KEY_AT:at + SLOT_HEADER_BYTES] = SLOT_HEADER.pack(key, len(state), zlib.crc32(state))
        board.mm[at + SLOT_HEADER_BYTES:at + SLOT_HEADER_BYTES + len(state)] = state
        board.seqs[i] = seq + 2

    def close(self) -> None:
        """Remove the board (readers holding it see the lock free and drop it)."""
        os.remove(self.board.path)
        self.board.close()


class BoardReader:
    """A shard's board, mapped read-only by a process on the same node."""

    def __init__(self, path: str):
        self.board = _Board(path, os.open(path, os.O_RDONLY), writable=False)

    def fingerprint(self) -> int:
        """The fingerprint of the catalog the shard's item rows refer to."""
        return int(self.board.fingerprint[0])

    def get(self, user_id: str) -> Optional[bytes]:
        """The user's packed state, or None: not on the board, or the slot kept changing."""
        board = self.board
        key = user_key(user_id)
        i, at = board.slot(key)
        for _ in range(READ_TRIES):
            seq = int(board.seqs[i])
            if seq & 1:
                continue
            held, length, crc = SLOT_HEADER.unpack(board.mm[at + KEY_AT:at + SLOT_HEADER_BYTES])
            start = at + SLOT_HEADER_BYTES
            state = board.mm[start:start + min(length, board.slot_size - SLOT_HEADER_BYTES)]
            if int(board.seqs[i]) != seq:
                continue
            if held != key:
                return None
            if len(state) == length and zlib.crc32(state) == crc:
                return state
        return None

    def writer_alive(self) -> bool:
        """Whether the shard that writes this board still runs (it holds the lock while it does)."""
        try:
            fcntl.flock(self.board.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self.board.fd, fcntl.LOCK_UN)
        return False

    def close(self) -> None:
        self.board.close()

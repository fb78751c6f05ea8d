"""A profile state packed into one bytes object: how a shard holds a million users in memory.

A ProfileState with its numpy arrays, window objects and counter dict is several times larger as
Python objects than packed (with the default settings: two float16 vectors of 384 dims, a window
of 20 events, 12 counters, the hashes of the user's last 128 event ids; bench/profile_memory.py
measures both, docs/benchmarks.md has the figures). Packing is
lossless: unpack(pack(state)) gives back the same numbers, so packing never changes a profile.

Layout (little-endian):

    header      n_events u32, last_ts f64 (NaN = none), long_weight f64, short_weight f64,
                vector dtype code u8 (0 = no vectors yet), n_recent u8, n_counters u8, n_hashes u16
    vectors     long_sum, short_sum: dim values each, in the profile's vector dtype
    window      item rows i32[n], type codes u8[n], timestamps f64[n], weights f64[n]
    counters    key codes i32[n], values f64[n]
    hashes      u64[n]: event-id hashes, oldest first (idempotency)

Item ids are stored as their index rows (rows never move, see index.py) and counter keys as
codes into a vocabulary shared by the shard's users.
"""

from __future__ import annotations

import hashlib
import math
import struct
from typing import Callable

import numpy as np
from profilerec.data.schema import EVENT_TYPES
from profilerec.model.profile import ProfileState, RecentEvent

HEADER = struct.Struct("<IdddBBBH")
DTYPES = {1: np.dtype("<f2"), 2: np.dtype("<f4")}
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}
TYPE_CODES = {name: code for code, name in enumerate(EVENT_TYPES)}


def event_hash(event_id: str) -> int:
    """A 64-bit hash of an event id: what a shard remembers for idempotency."""
    return int.from_bytes(hashlib.blake2b(event_id.encode("utf-8"), digest_size=8).digest(), "little")


class StateCodec:
    """Packs and unpacks the states of one shard's users (item rows and counter keys as codes,
    vectors at the profile's `vector_dtype`)."""

    def __init__(self, row_of: Callable[[str], int], item_at: Callable[[int], str], vector_dtype: str):
        self.dtype_code = DTYPE_CODES[np.dtype(vector_dtype).newbyteorder("<")]
        self.row_of = row_of
        self.item_at = item_at
        self.keys: list[str] = []
        self.key_codes: dict[str, int] = {}

    def pack(self, state: ProfileState, hashes: np.ndarray) -> bytes:
        """`state` and its event-id hashes as bytes. Window items must be in the index."""
        vectors = b""
        code = 0
        if state.long_sum is not None:
            # lossless: the profile math already rounded the sums to this dtype
            code = self.dtype_code
            vectors = b"".join(np.asarray(v).astype(DTYPES[code], copy=False).tobytes()
                               for v in (state.long_sum, state.short_sum))
        recent = state.recent
        rows = np.array([self._row(e.item_id) for e in recent], dtype="<i4")
        types = np.array([TYPE_CODES[e.type] for e in recent], dtype="u1")
        times = np.array([e.ts for e in recent], dtype="<f8")
        weights = np.array([e.weight for e in recent], dtype="<f8")
        keys = np.array([self._key_code(k) for k in state.counters], dtype="<i4")
        values = np.array(list(state.counters.values()), dtype="<f8")
        last_ts = math.nan if state.last_ts is None else state.last_ts
        header = HEADER.pack(state.n_events, last_ts, state.long_weight, state.short_weight, code,
                             len(recent), len(keys), len(hashes))
        return b"".join([header, vectors, rows.tobytes(), types.tobytes(), times.tobytes(), weights.tobytes(),
                         keys.tobytes(), values.tobytes(), np.asarray(hashes, dtype="<u8").tobytes()])

    def unpack(self, user_id: str, blob: bytes, dim: int, counters: bool = True) -> tuple[ProfileState, np.ndarray]:
        """The state and event-id hashes packed in `blob` (`dim`: length of the vectors). With
        `counters=False` the state has no counters: a process other than the packing shard lacks
        its vocabulary of counter keys, and scoring does not use them."""
        n_events, last_ts, long_weight, short_weight, code, n_recent, n_counters, n_hashes = HEADER.unpack_from(blob)
        at = HEADER.size
        long_sum = short_sum = None
        if code:
            dtype = DTYPES[code]
            long_sum = np.frombuffer(blob, dtype, dim, at)
            short_sum = np.frombuffer(blob, dtype, dim, at + dim * dtype.itemsize)
            at += 2 * dim * dtype.itemsize

        def take(dtype: str, n: int) -> np.ndarray:
            nonlocal at
            out = np.frombuffer(blob, dtype, n, at)
            at += out.nbytes
            return out

        rows, types, times, weights = take("<i4", n_recent), take("u1", n_recent), take("<f8", n_recent), take("<f8", n_recent)
        keys, values = take("<i4", n_counters), take("<f8", n_counters)
        hashes = take("<u8", n_hashes)
        state = ProfileState(
            user_id=user_id, n_events=n_events, last_ts=None if math.isnan(last_ts) else last_ts,
            long_sum=long_sum, long_weight=long_weight, short_sum=short_sum, short_weight=short_weight,
            recent=[RecentEvent(self.item_at(int(r)), EVENT_TYPES[t], float(ts), float(w))
                    for r, t, ts, w in zip(rows, types, times, weights)],
            counters={self.keys[k]: float(v) for k, v in zip(keys, values)} if counters else {},
        )
        return state, hashes

    @staticmethod
    def hashes(blob: bytes) -> np.ndarray:
        """Only the event-id hashes of a packed state (they are last): the cheap idempotency check."""
        n_hashes = HEADER.unpack_from(blob)[-1]
        return np.frombuffer(blob, "<u8", n_hashes, len(blob) - 8 * n_hashes)

    def _row(self, item_id: str) -> int:
        row = self.row_of(item_id)
        if row < 0:
            raise KeyError(f"item {item_id!r} is not in the index")
        return row

    def _key_code(self, key: str) -> int:
        code = self.key_codes.get(key)
        if code is None:
            code = self.key_codes[key] = len(self.keys)
            self.keys.append(key)
        return code


def max_packed_bytes(dim: int, vector_dtype: str, window: int, counters: int, hashes: int) -> int:
    """The largest packed state: full window, counters and event-id hashes."""
    return (HEADER.size + 2 * dim * np.dtype(vector_dtype).itemsize + window * (4 + 1 + 8 + 8)
            + counters * (4 + 8) + hashes * 8)


def remember(hashes: np.ndarray, new: int, limit: int) -> np.ndarray:
    """`hashes` with `new` appended, keeping the newest `limit`."""
    return np.append(hashes, np.uint64(new))[-limit:]

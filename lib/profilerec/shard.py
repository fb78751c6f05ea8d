"""One shard of the live profiles: the users whose id hashes to it, updated event by event.

The service runs one ProfileShard per Ray actor; this module has no Ray in it, so its rules are
tested directly. Rules:

- an accepted event is in the shard's write-ahead log before `apply` returns;
- events are applied in order of (user, timestamp) within a batch and in arrival order across
  batches; an event older than the user's last one is applied with a zero time gap (see
  profile.py); the log holds them in applied order, so recovery replays the very same sequence;
- a repeated event id changes nothing: the shard keeps 64-bit hashes of each user's last
  `dedup_window` event ids (a client retrying a batch resends at most that many per user);
- `forget` removes the user from memory and rewrites the durable state without them.

Users are held packed (packed.py, ~2.5 KB each with the defaults) and unpacked for each update
or read, which keeps a million users in a few GB. With a board (profile_board.py), the packed
state of each user written or read is also put there, before the write returns, for the ingress
replicas of the node to score themselves.
"""

from __future__ import annotations

import hashlib
import logging
import time
from datetime import datetime, timezone
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa

from profilerec import storage
from profilerec.packed import StateCodec, event_hash, max_packed_bytes, remember
from profilerec.profile_board import BoardWriter
from profilerec.profile import ProfileState, apply_event, states_from_table, states_to_table, top_counters
from profilerec.recommend import Recommender
from profilerec.schema import Event
from profilerec.store import ShardStore

log = logging.getLogger(__name__)

DEDUP_WINDOW = 128  # event ids remembered per user


def shard_of(user_id: str, num_shards: int) -> int:
    """The shard that owns `user_id`: a stable hash, the same in every process and release."""
    digest = hashlib.blake2b(user_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_shards


def layout_root(state_dir: str, num_shards: int) -> str:
    """Where the durable state of the `num_shards`-shard layout lives under the service's state_dir."""
    return storage.join(state_dir, f"shards-{num_shards}")


def repartition(state_dir: str, old: int, new: int, recommender: Recommender) -> int:
    """Move every user of the `old`-shard layout to a `new`-shard layout; returns the users moved.

    Each old shard is recovered as on a restart (snapshot + log), then every new shard gets one
    snapshot of its users (with their event-id hashes, so retries stay idempotent). The old layout
    is left in place: the caller removes it once the new one is recorded as current.
    """
    tables = [ProfileShard(i, recommender, ShardStore(layout_root(state_dir, old), i)).snapshot_table()
              for i in range(old)]
    table = pa.concat_tables(tables)
    new_root = layout_root(state_dir, new)
    storage.delete(new_root)  # what an interrupted earlier attempt left
    targets = np.array([shard_of(u, new) for u in table.column("user_id").to_pylist()], dtype=np.int64)
    for j in range(new):
        ShardStore(new_root, j).write_snapshot(table.filter(pa.array(targets == j)))
    return table.num_rows


def state_codec(recommender: Recommender) -> StateCodec:
    """How the states scored by `recommender` are packed (item rows of its index)."""
    index = recommender.index
    return StateCodec(index.row, lambda row: index.item_ids[row], recommender.params.vector_dtype)


def max_state_bytes(recommender: Recommender, dedup_window: int = DEDUP_WINDOW) -> int:
    """The largest packed state of a shard scoring with `recommender` (a board's slot size)."""
    params = recommender.params
    return max_packed_bytes(recommender.index.dim, params.vector_dtype, params.window, params.max_counters,
                            dedup_window)


def recommendation(recommender: Recommender, state: ProfileState, k: int, exclude_seen: bool = False,
                   brand: Optional[str] = None, category: Optional[str] = None) -> dict[str, Any]:
    """The answer to a recommendation request for `state` (from a shard, or from an ingress
    replica that read the state on a board)."""
    items = recommender.recommend(state, k, exclude_seen, brand, category)
    return {"user_id": state.user_id, "cold_start": state.long_sum is None, "items": items}


def pseudonym(user_id: str) -> str:
    """A short non-reversible tag for a user id, for logs (ids are never logged in clear)."""
    return hashlib.blake2b(user_id.encode("utf-8"), digest_size=6, person=b"profilerec-log").hexdigest()


class ProfileShard:
    """Profiles of the users of one shard, durable through a ShardStore."""

    def __init__(self, shard: int, recommender: Recommender, store: ShardStore,
                 snapshot_every: int = 50_000, dedup_window: int = DEDUP_WINDOW, board: Optional[BoardWriter] = None):
        if recommender.params.window > 255 or recommender.params.max_counters > 255 or dedup_window > 65535:
            raise ValueError("a shard holds at most 255 window events, 255 counters and 65535 event ids per user")
        self.shard = shard
        self.recommender = recommender
        self.store = store
        self.snapshot_every = snapshot_every
        self.dedup_window = dedup_window
        self.codec = state_codec(recommender)
        self.users: dict[str, bytes] = {}  # user id -> packed state and event-id hashes
        self.board = board
        self.since_snapshot = 0
        self._recover()

    # -- writes -------------------------------------------------------------------------------

    def apply(self, events: Sequence[Event]) -> dict[str, int]:
        """Log then apply the new events of a batch; returns how many were new and repeated."""
        fresh: list[Event] = []
        batch_ids: set[str] = set()
        for event in events:
            if event.event_id in batch_ids or self._seen(event.user_id, event_hash(event.event_id)):
                continue
            batch_ids.add(event.event_id)
            fresh.append(event)
        fresh.sort(key=lambda e: (e.user_id, e.ts))  # stable: arrival order among equal times
        self.store.append(fresh)
        for event in fresh:
            self._apply_one(event)
        self.since_snapshot += len(fresh)
        if self.since_snapshot >= self.snapshot_every:
            self.snapshot()
        return {"accepted": len(fresh), "duplicates": len(events) - len(fresh)}

    def forget(self, user_id: str) -> bool:
        """Remove the user from memory, log and snapshots; True when the shard knew the user."""
        known = self.users.pop(user_id, None) is not None
        if self.board is not None:
            self.board.remove(user_id)
        self.snapshot()  # the new snapshot lacks the user and replaces every older file
        log.info("shard %d forgot user %s", self.shard, pseudonym(user_id))
        return known

    def snapshot(self) -> None:
        """Write the whole shard state and drop the log it covers."""
        started = time.perf_counter()
        self.store.write_snapshot(self.snapshot_table())
        self.since_snapshot = 0
        log.info("shard %d snapshot of %d users in %.2f s", self.shard, len(self.users),
                 time.perf_counter() - started)

    # -- reads --------------------------------------------------------------------------------

    def state(self, user_id: str) -> ProfileState:
        """The user's profile (an empty one for an unknown user)."""
        return self._unpack(user_id)[0]

    def __contains__(self, user_id: str) -> bool:
        return user_id in self.users

    def recommend(self, user_id: str, k: int, exclude_seen: bool = False, brand: Optional[str] = None,
                  category: Optional[str] = None) -> dict[str, Any]:
        """Top-k items for the user, with scores; cold-start users get popularity. The user goes on
        the board: the next read of the same node need not come here."""
        blob = self.users.get(user_id)
        if blob is not None and self.board is not None:
            self.board.put(user_id, blob)
        return recommendation(self.recommender, self.state(user_id), k, exclude_seen, brand, category)

    def describe(self, user_id: str, explain_k: int = 3) -> Optional[dict[str, Any]]:
        """What the profile holds in words: interests, recent events, why the top items are chosen."""
        if user_id not in self.users:
            return None
        state = self.state(user_id)
        index = self.recommender.index
        recent = [{"item_id": e.item_id, "title": (index.meta(e.item_id) or {}).get("title"), "type": e.type,
                   "time": _iso(e.ts), "weight": round(e.weight, 3)} for e in reversed(state.recent)]
        top = self.recommender.recommend(state, explain_k)
        return {
            "user_id": user_id,
            "events": state.n_events,
            "last_event": _iso(state.last_ts),
            "top_interests": [{"name": k, "strength": round(v, 3)} for k, v in top_counters(state)],
            "recent_events": recent,
            "recommended_because": [self.recommender.explain(state, item["item_id"]) | {"item_id": item["item_id"]}
                                    for item in top],
        }

    def stats(self) -> dict[str, Any]:
        """Users held, the bytes of their packed states, and events since the last snapshot."""
        return {"shard": self.shard, "users": len(self.users), "state_bytes": sum(map(len, self.users.values())),
                "events_since_snapshot": self.since_snapshot}

    def snapshot_table(self) -> pa.Table:
        """The shard's states plus each user's recent event-id hashes (idempotency after recovery)."""
        unpacked = [self._unpack(u) for u in sorted(self.users)]
        table = states_to_table(state for state, _ in unpacked)
        hashes = pa.array([h for _, h in unpacked], pa.list_(pa.uint64()))
        return table.append_column("recent_event_hashes", hashes)

    # -- internals ----------------------------------------------------------------------------

    def _unpack(self, user_id: str) -> tuple[ProfileState, np.ndarray]:
        blob = self.users.get(user_id)
        if blob is None:
            return ProfileState(user_id=user_id), np.zeros(0, dtype=np.uint64)
        return self.codec.unpack(user_id, blob, self.recommender.index.dim)

    def _seen(self, user_id: str, hashed: int) -> bool:
        blob = self.users.get(user_id)
        return blob is not None and hashed in StateCodec.hashes(blob)

    def _apply_one(self, event: Event) -> None:
        state, hashes = self._unpack(event.user_id)
        meta = self.recommender.index.meta(event.item_id) if event.item_id is not None else None
        state = apply_event(state, event, self.recommender.vector_of(event), self.recommender.params, meta)
        blob = self.codec.pack(state, remember(hashes, event_hash(event.event_id), self.dedup_window))
        self.users[event.user_id] = blob
        if self.board is not None:
            self.board.put(event.user_id, blob)

    def _recover(self) -> None:
        started = time.perf_counter()
        snapshot, events = self.store.load()
        if snapshot is not None:
            hashes = snapshot.column("recent_event_hashes").to_pylist()
            for state, ids in zip(states_from_table(snapshot), hashes):
                self.users[state.user_id] = self.codec.pack(state, np.array(ids, dtype=np.uint64)[-self.dedup_window:])
        replayed = 0
        for event in events:
            if not self._seen(event.user_id, event_hash(event.event_id)):
                self._apply_one(event)
                replayed += 1
        self.since_snapshot = replayed
        log.info("shard %d recovered %d users (%d events replayed from the log) in %.2f s", self.shard,
                 len(self.users), replayed, time.perf_counter() - started)


def _iso(ts: Optional[float]) -> Optional[str]:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()

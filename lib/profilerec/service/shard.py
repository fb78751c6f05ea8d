"""One shard of the live profiles: the users whose id hashes to it, updated event by event.

The service runs one ProfileShard per Ray actor; this module has no Ray in it, so its rules are
tested directly. Rules:

- an accepted event is in the shard's write-ahead log before `apply` returns;
- events are applied in order of (user, timestamp) within a batch and in arrival order across
  batches; an event older than the user's last one is applied with a zero time gap (see
  profile.py); the log holds them in applied order, so recovery replays the very same sequence;
- a repeated event id changes nothing while it is among the user's last `dedup_window` accepted
  events: the shard keeps 64-bit hashes of those ids (the ingress refuses batches with more events
  than that for one user, so a whole batch retried at once is always recognised);
- a retired shard (its users are being moved to another shard count, shard_actors.py) refuses
  writes with ShardRetired; retirement is durable, so a shard restarted mid-move stays retired
  until `resume` (a move abandoned by reverting the shard count);
- `forget` removes the user from memory and rewrites the durable state without them. It keeps a
  tombstone of the user's remembered event ids (keyed hashes of user and event id, no user id)
  for `tombstone_ttl_s`, so a late retry of one of those events does not bring the user back.

Users are held packed (packed.py: a few KB each, see docs/benchmarks.md) and unpacked for each update
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
from profilerec.config import ServeConfig
from profilerec.data import storage
from profilerec.data.schema import Event
from profilerec.errors import ShardRetired, StorageUnavailable
from profilerec.model.profile import ProfileState, apply_event, states_from_table, states_to_table, top_counters
from profilerec.model.recommend import Recommender
from profilerec.service.packed import StateCodec, event_hash, max_packed_bytes, remember
from profilerec.service.profile_board import BoardWriter
from profilerec.service.pseudonym import pseudonym
from profilerec.service.shard_store import ShardStore

log = logging.getLogger(__name__)

DEDUP_WINDOW = 128  # event ids remembered per user


def shard_of(user_id: str, num_shards: int) -> int:
    """The shard that owns `user_id`: a stable hash, the same in every process and release."""
    digest = hashlib.blake2b(user_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_shards


def layout_root(state_dir: str, num_shards: int) -> str:
    """Where the durable state of the `num_shards`-shard layout lives under the service's state_dir."""
    return storage.join(state_dir, f"shards-{num_shards}")


def layouts(state_dir: str) -> list[int]:
    """The shard counts that have a durable layout under state_dir (see layout_root)."""
    names = storage.list_folders(state_dir)
    return sorted(int(n[len("shards-"):]) for n in names if n.startswith("shards-") and n[len("shards-"):].isdigit())


def repartition(state_dir: str, old: int, new: int, recommender: Recommender) -> int:
    """Move every user of the `old`-shard layout to a `new`-shard layout; returns the users moved.

    Each old shard is recovered as on a restart (snapshot + log), then every new shard gets one
    snapshot of its users (with their event-id hashes, so retries stay idempotent) and every
    tombstone (they name no user, so each new shard keeps them all until they expire). The old
    layout is left in place: the caller removes it once the new one is recorded as current.
    """
    shards = [ProfileShard(i, recommender, ShardStore(layout_root(state_dir, old), i)) for i in range(old)]
    table = pa.concat_tables([shard.snapshot_table() for shard in shards])
    tombstones = pa.concat_tables([shard.tombstone_table() for shard in shards])
    new_root = layout_root(state_dir, new)
    storage.delete(new_root)  # what an interrupted earlier attempt left
    targets = np.array([shard_of(u, new) for u in table.column("user_id").to_pylist()], dtype=np.int64)
    for j in range(new):
        ShardStore(new_root, j).write_snapshot(table.filter(pa.array(targets == j)), tombstones)
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


def tombstone_key(user_id: str, hashed: int) -> int:
    """What a shard remembers of a forgotten user's event (its id's hash `hashed`): one 64-bit
    hash of both, from which neither the user id nor the event id can be read back."""
    data = user_id.encode("utf-8") + b"\0" + int(hashed).to_bytes(8, "little")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=b"profilerec-tomb").digest(), "little")


class ProfileShard:
    """Profiles of the users of one shard, durable through a ShardStore."""

    def __init__(self, shard: int, recommender: Recommender, store: ShardStore,
                 snapshot_every: int = 50_000, dedup_window: int = DEDUP_WINDOW, board: Optional[BoardWriter] = None,
                 tombstone_ttl_s: float = ServeConfig.tombstone_ttl_s):
        if recommender.params.window > 255 or recommender.params.max_counters > 255 or dedup_window > 65535:
            raise ValueError("a shard holds at most 255 window events, 255 counters and 65535 event ids per user")
        self.shard = shard
        self.recommender = recommender
        self.store = store
        self.snapshot_every = snapshot_every
        self.dedup_window = dedup_window
        self.codec = state_codec(recommender)
        self.users: dict[str, bytes] = {}  # user id -> packed state and event-id hashes
        self.tombstones: dict[int, float] = {}  # tombstone_key -> when the user was forgotten
        self.tombstone_ttl_s = tombstone_ttl_s
        self.board = board
        self.since_snapshot = 0
        self._recover()

    # -- writes -------------------------------------------------------------------------------

    def apply(self, events: Sequence[Event]) -> dict[str, int]:
        """Log then apply the new events of a batch; returns how many were new and repeated."""
        self._check_writable()
        fresh: list[Event] = []
        batch_ids: set[str] = set()
        for event in events:
            hashed = event_hash(event.event_id)
            if event.event_id in batch_ids or self._seen(event.user_id, hashed) or self._forgotten(event.user_id, hashed):
                continue
            batch_ids.add(event.event_id)
            fresh.append(event)
        fresh.sort(key=lambda e: (e.user_id, e.ts))  # stable: arrival order among equal times
        try:
            self.store.append(fresh)
        except OSError as error:  # nothing applied, nothing acknowledged: the client retries later
            raise StorageUnavailable(f"profile shard {self.shard} cannot write its log: {error}") from None
        for event in fresh:
            self._apply_one(event)
        self.since_snapshot += len(fresh)
        if self.since_snapshot >= self.snapshot_every:
            try:
                self.snapshot()
            except OSError as error:  # the batch is in the log: answer it; the next batch tries again
                log.error("shard %d could not write a snapshot (its log keeps growing until it can): %s",
                          self.shard, error)
        return {"accepted": len(fresh), "duplicates": len(events) - len(fresh)}

    def forget(self, user_id: str) -> bool:
        """Remove the user from memory, log and snapshots; True when the shard knew the user."""
        self._check_writable()  # else the move could carry the user into the new layout
        blob = self.users.pop(user_id, None)
        tombstones = dict(self.tombstones)
        if blob is not None:
            now = time.time()
            self.tombstones.update((tombstone_key(user_id, h), now) for h in StateCodec.hashes(blob).tolist())
        try:
            self.snapshot()  # the new snapshot lacks the user and replaces every older file
        except OSError as error:  # not forgotten anywhere yet: keep them in memory too
            if blob is not None:
                self.users[user_id] = blob
            self.tombstones = tombstones
            raise StorageUnavailable(f"profile shard {self.shard} cannot write its snapshot: {error}") from None
        if self.board is not None:
            self.board.remove(user_id)
        log.info("shard %d forgot user %s", self.shard, pseudonym(user_id))
        return blob is not None

    def snapshot(self) -> None:
        """Write the whole shard state and drop the log it covers (and the expired tombstones)."""
        started = time.perf_counter()
        expired = time.time() - self.tombstone_ttl_s
        self.tombstones = {key: at for key, at in self.tombstones.items() if at > expired}
        self.store.write_snapshot(self.snapshot_table(), self.tombstone_table())
        self.since_snapshot = 0
        log.info("shard %d snapshot of %d users in %.2f s", self.shard, len(self.users),
                 time.perf_counter() - started)

    @property
    def retired(self) -> bool:
        """True once the shard refuses writes for a re-partitioning (see the module docstring)."""
        return self.store.retired

    def retire(self) -> None:
        """Refuse writes from now on, also after a restart, and snapshot everything for the move."""
        self.store.mark_retired()
        self.snapshot()

    def resume(self) -> None:
        """Take writes again (the move this shard was retired for was abandoned)."""
        self.store.clear_retired()

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

    def tombstone_table(self) -> pa.Table:
        """The tombstones of forgotten users' event ids (see the module docstring)."""
        return pa.table({"key": pa.array(list(self.tombstones), pa.uint64()),
                         "forgotten_at": pa.array(list(self.tombstones.values()), pa.float64())})

    # -- internals ----------------------------------------------------------------------------

    def _unpack(self, user_id: str) -> tuple[ProfileState, np.ndarray]:
        blob = self.users.get(user_id)
        if blob is None:
            return ProfileState(user_id=user_id), np.zeros(0, dtype=np.uint64)
        return self.codec.unpack(user_id, blob, self.recommender.index.dim)

    def _seen(self, user_id: str, hashed: int) -> bool:
        blob = self.users.get(user_id)
        return blob is not None and hashed in StateCodec.hashes(blob)

    def _check_writable(self) -> None:
        if self.retired:
            raise ShardRetired(f"profile shard {self.shard} is retired: the service is re-partitioning its users; "
                               "retry the request")

    def _forgotten(self, user_id: str, hashed: int) -> bool:
        return bool(self.tombstones) and tombstone_key(user_id, hashed) in self.tombstones

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
        snapshot, tombstones, events = self.store.load()
        if tombstones is not None:
            self.tombstones = dict(zip(tombstones.column("key").to_pylist(), tombstones.column("forgotten_at").to_pylist()))
        if snapshot is not None:
            hashes = snapshot.column("recent_event_hashes").to_pylist()
            for state, ids in zip(states_from_table(snapshot), hashes):
                self.users[state.user_id] = self.codec.pack(state, np.array(ids, dtype=np.uint64)[-self.dedup_window:])
        replayed = 0
        for event in events:
            if not self._seen(event.user_id, event_hash(event.event_id)):  # a retried call logged twice
                self._apply_one(event)
                replayed += 1
        self.since_snapshot = replayed
        log.info("shard %d recovered %d users (%d events replayed from the log) in %.2f s", self.shard,
                 len(self.users), replayed, time.perf_counter() - started)


def _iso(ts: Optional[float]) -> Optional[str]:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()

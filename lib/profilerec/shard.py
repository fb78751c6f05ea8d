"""One shard of the live profiles: the users whose id hashes to it, updated event by event.

The service runs one ProfileShard per Ray actor; this module has no Ray in it, so its rules are
tested directly. Rules:

- an accepted event is in the shard's write-ahead log before `apply` returns;
- events are applied in order of (user, timestamp) within a batch and in arrival order across
  batches; an event older than the user's last one is applied with a zero time gap (see
  profile.py); the log holds them in applied order, so recovery replays the very same sequence;
- a repeated event id (among the user's last `dedup_window` events) changes nothing;
- `forget` removes the user from memory and rewrites the durable state without them.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from datetime import datetime, timezone
from typing import Any, Optional, Sequence

import pyarrow as pa

from profilerec.profile import ProfileState, apply_event, states_from_table, states_to_table, top_counters
from profilerec.recommend import Recommender
from profilerec.schema import Event
from profilerec.store import ShardStore

log = logging.getLogger(__name__)


def shard_of(user_id: str, num_shards: int) -> int:
    """The shard that owns `user_id`: a stable hash, the same in every process and release."""
    digest = hashlib.blake2b(user_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_shards


def pseudonym(user_id: str) -> str:
    """A short non-reversible tag for a user id, for logs (ids are never logged in clear)."""
    return hashlib.blake2b(user_id.encode("utf-8"), digest_size=6, person=b"profilerec-log").hexdigest()


class ProfileShard:
    """Profiles of the users of one shard, durable through a ShardStore."""

    def __init__(self, shard: int, recommender: Recommender, store: ShardStore,
                 snapshot_every: int = 50_000, dedup_window: int = 256):
        self.shard = shard
        self.recommender = recommender
        self.store = store
        self.snapshot_every = snapshot_every
        self.dedup_window = dedup_window
        self.states: dict[str, ProfileState] = {}
        self.recent_ids: dict[str, deque] = {}
        self.since_snapshot = 0
        self._recover()

    # -- writes -------------------------------------------------------------------------------

    def apply(self, events: Sequence[Event]) -> dict[str, int]:
        """Log then apply the new events of a batch; returns how many were new and repeated."""
        fresh: list[Event] = []
        batch_ids: set[str] = set()
        for event in events:
            if event.event_id in batch_ids or self._seen(event):
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
        known = self.states.pop(user_id, None) is not None
        self.recent_ids.pop(user_id, None)
        self.snapshot()  # the new snapshot lacks the user and replaces every older file
        log.info("shard %d forgot user %s", self.shard, pseudonym(user_id))
        return known

    def snapshot(self) -> None:
        """Write the whole shard state and drop the log it covers."""
        started = time.perf_counter()
        self.store.write_snapshot(self.snapshot_table())
        self.since_snapshot = 0
        log.info("shard %d snapshot of %d users in %.2f s", self.shard, len(self.states),
                 time.perf_counter() - started)

    # -- reads --------------------------------------------------------------------------------

    def state(self, user_id: str) -> ProfileState:
        """The user's profile (an empty one for an unknown user)."""
        return self.states.get(user_id) or ProfileState(user_id=user_id)

    def recommend(self, user_id: str, k: int, exclude_seen: bool = False, brand: Optional[str] = None,
                  category: Optional[str] = None) -> dict[str, Any]:
        """Top-k items for the user, with scores; cold-start users get popularity."""
        state = self.state(user_id)
        items = self.recommender.recommend(state, k, exclude_seen, brand, category)
        return {"user_id": user_id, "cold_start": state.long_sum is None, "items": items}

    def describe(self, user_id: str, explain_k: int = 3) -> Optional[dict[str, Any]]:
        """What the profile holds in words: interests, recent events, why the top items are chosen."""
        state = self.states.get(user_id)
        if state is None:
            return None
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
        """Users held and events since the last snapshot."""
        return {"shard": self.shard, "users": len(self.states), "events_since_snapshot": self.since_snapshot}

    def snapshot_table(self) -> pa.Table:
        """The shard's states plus each user's recent event ids (for idempotency after recovery)."""
        users = sorted(self.states)
        table = states_to_table(self.states[u] for u in users)
        ids = pa.array([list(self.recent_ids.get(u, ())) for u in users], pa.list_(pa.string()))
        return table.append_column("recent_event_ids", ids)

    # -- internals ----------------------------------------------------------------------------

    def _seen(self, event: Event) -> bool:
        return event.event_id in self.recent_ids.get(event.user_id, ())

    def _apply_one(self, event: Event) -> None:
        state = self.state(event.user_id)
        meta = self.recommender.index.meta(event.item_id) if event.item_id is not None else None
        self.states[event.user_id] = apply_event(state, event, self.recommender.vector_of(event),
                                                 self.recommender.params, meta)
        ids = self.recent_ids.setdefault(event.user_id, deque(maxlen=self.dedup_window))
        ids.append(event.event_id)

    def _recover(self) -> None:
        started = time.perf_counter()
        snapshot, events = self.store.load()
        if snapshot is not None:
            for state, ids in zip(states_from_table(snapshot), snapshot.column("recent_event_ids").to_pylist()):
                self.states[state.user_id] = state
                self.recent_ids[state.user_id] = deque(ids, maxlen=self.dedup_window)
        replayed = 0
        for event in events:
            if not self._seen(event):
                self._apply_one(event)
                replayed += 1
        self.since_snapshot = replayed
        log.info("shard %d recovered %d users (%d events replayed from the log) in %.2f s", self.shard,
                 len(self.states), replayed, time.perf_counter() - started)


def _iso(ts: Optional[float]) -> Optional[str]:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc).isoformat()

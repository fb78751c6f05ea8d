"""A profile shard without Ray: durability, idempotency, recovery, forgetting."""

import os

import numpy as np
import pytest

from profilerec.index import ItemIndex
from profilerec.priors import empty_priors
from profilerec.profile import ProfileParams
from profilerec.recommend import Recommender
from profilerec.schema import Event
from profilerec.shard import ProfileShard, shard_of
from profilerec.store import ShardStore


def recommender():
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(20, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = ItemIndex([f"i{n}" for n in range(20)], vectors, titles=[f"Item {n}" for n in range(20)])
    priors = empty_priors(20)
    priors.popularity = np.arange(20, dtype=np.float64)
    return Recommender(index, ProfileParams(), priors=priors)


def events(user, start, n, item_offset=0):
    return [Event(f"{user}-{start + k}", user, "click", 1000.0 + start + k, item_id=f"i{(item_offset + k) % 20}")
            for k in range(n)]


def open_shard(path, **kw):
    return ProfileShard(0, recommender(), ShardStore(str(path), 0), **kw)


def test_repeated_events_change_nothing(tmp_path):
    shard = open_shard(tmp_path)
    batch = events("alice", 0, 5)
    assert shard.apply(batch) == {"accepted": 5, "duplicates": 0}
    before = shard.snapshot_table()
    assert shard.apply(batch + batch[:2]) == {"accepted": 0, "duplicates": 7}
    assert shard.snapshot_table().equals(before)


def test_recovery_from_log_and_snapshot_equals_live_state(tmp_path):
    shard = open_shard(tmp_path, snapshot_every=7)  # forces a snapshot in the middle of the stream
    for start in range(0, 30, 3):
        shard.apply(events("alice", start, 3, start) + events("bob", start, 3, start + 5))
    live = shard.snapshot_table()
    assert shard.store._snapshots(), "a snapshot was written"
    recovered = open_shard(tmp_path)
    assert recovered.snapshot_table().equals(live)
    assert recovered.apply(events("alice", 27, 3, 27))["duplicates"] == 3  # ids survive recovery


def test_events_of_a_batch_apply_in_time_order_and_the_log_keeps_that_order(tmp_path):
    shard = open_shard(tmp_path)
    batch = events("alice", 0, 4)
    shard.apply(list(reversed(batch)))
    assert [e.item_id for e in shard.state("alice").recent] == ["i0", "i1", "i2", "i3"]
    assert open_shard(tmp_path).snapshot_table().equals(shard.snapshot_table())


def test_forget_leaves_no_trace_in_memory_log_or_snapshot(tmp_path):
    shard = open_shard(tmp_path, snapshot_every=4)
    shard.apply(events("alice-secret-id", 0, 6) + events("bob", 0, 6, 3))
    shard.apply(events("alice-secret-id", 6, 2))
    assert shard.forget("alice-secret-id") is True
    assert "alice-secret-id" not in shard
    for root, _, files in os.walk(tmp_path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert b"alice-secret-id" not in f.read(), name
    assert "alice-secret-id" not in open_shard(tmp_path)
    assert "bob" in open_shard(tmp_path)
    assert shard.forget("nobody") is False


def test_a_torn_last_log_line_is_ignored_but_earlier_corruption_is_an_error(tmp_path):
    shard = open_shard(tmp_path)
    shard.apply(events("alice", 0, 3))
    wal = os.path.join(tmp_path, "shard-0000", "wal")
    segment = os.path.join(wal, sorted(os.listdir(wal))[-1])
    with open(segment, "ab") as f:
        f.write(b'{"event_id": "half')
    assert open_shard(tmp_path).state("alice").n_events == 3
    with open(segment, "rb") as f:
        data = f.read()
    with open(segment, "wb") as f:
        f.write(b"garbage\n" + data)
    with pytest.raises(Exception):
        open_shard(tmp_path)


def test_cold_user_gets_popularity_and_recommendations_follow_events(tmp_path):
    shard = open_shard(tmp_path)
    cold = shard.recommend("carol", 3)
    assert cold["cold_start"] and [i["item_id"] for i in cold["items"]] == ["i19", "i18", "i17"]
    shard.apply([Event("c1", "carol", "purchase", 5.0, item_id="i4")])
    warm = shard.recommend("carol", 3)
    assert not warm["cold_start"] and warm["items"][0]["item_id"] == "i4"  # most similar to itself
    assert shard.recommend("carol", 3, exclude_seen=True)["items"][0]["item_id"] != "i4"
    described = shard.describe("carol")
    assert described["recent_events"][0]["title"] == "Item 4"
    assert described["recommended_because"][0]["closest_recent_item"]["item_id"] == "i4"


def test_shard_of_is_stable_and_spreads_users():
    assert shard_of("alice", 8) == shard_of("alice", 8)
    counts = np.bincount([shard_of(f"user-{n}", 4) for n in range(4000)], minlength=4)
    assert counts.min() > 800

"""A profile shard without Ray: durability, idempotency, recovery, forgetting."""

import dataclasses
import os

import numpy as np
import pytest
from conftest import fill
from profilerec.data.schema import Event
from profilerec.errors import ShardRetired, StorageUnavailable
from profilerec.model.index import ItemIndex
from profilerec.model.priors import empty_priors
from profilerec.model.profile import ProfileParams, states_to_table
from profilerec.model.recommend import Recommender
from profilerec.service.shard import ProfileShard, layout_root, repartition, shard_of
from profilerec.service.shard_store import ShardStore


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


def test_a_late_retry_of_a_forgotten_users_events_does_not_bring_them_back(tmp_path):
    shard = open_shard(tmp_path)
    batch = events("alice", 0, 5)
    shard.apply(batch + events("bob", 0, 2))
    shard.forget("alice")
    assert shard.apply(batch) == {"accepted": 0, "duplicates": 5}
    assert "alice" not in shard
    restarted = open_shard(tmp_path)  # the tombstones are durable
    assert restarted.apply(batch[:2]) == {"accepted": 0, "duplicates": 2}
    assert "alice" not in restarted and "bob" in restarted
    # new events of the same user are a new profile
    assert restarted.apply(events("alice", 100, 1)) == {"accepted": 1, "duplicates": 0}
    assert restarted.state("alice").n_events == 1


def test_tombstones_expire_after_their_ttl_and_follow_a_repartition(tmp_path):
    shard = open_shard(tmp_path, tombstone_ttl_s=0)
    shard.apply(events("alice", 0, 3))
    shard.forget("alice")  # its snapshot drops tombstones older than 0 s: none is kept
    assert shard.apply(events("alice", 0, 3))["accepted"] == 3

    state_dir = str(tmp_path / "state")
    old = ProfileShard(0, recommender(), ShardStore(layout_root(state_dir, 1), 0))
    old.apply(events("carol", 0, 4) + events("dave", 0, 4))
    old.forget("carol")
    repartition(state_dir, 1, 3, recommender())
    new = [ProfileShard(j, recommender(), ShardStore(layout_root(state_dir, 3), j)) for j in range(3)]
    owner = new[shard_of("carol", 3)]
    assert owner.apply(events("carol", 0, 4)) == {"accepted": 0, "duplicates": 4}
    assert "dave" in new[shard_of("dave", 3)]


def test_a_retired_shard_refuses_writes_and_deletes_also_after_a_restart(tmp_path):
    shard = open_shard(tmp_path)
    shard.apply(events("alice", 0, 2))
    shard.retire()
    with pytest.raises(ShardRetired):
        shard.apply(events("alice", 2, 1))
    with pytest.raises(ShardRetired):
        shard.forget("alice")
    restarted = open_shard(tmp_path)  # e.g. killed in the middle of a move
    with pytest.raises(ShardRetired):
        restarted.apply(events("alice", 2, 1))
    assert restarted.state("alice").n_events == 2  # reads still work
    restarted.resume()  # the move was abandoned
    assert open_shard(tmp_path).apply(events("alice", 2, 1))["accepted"] == 1


def test_out_of_order_arrivals_follow_the_late_event_rule(tmp_path):
    first, late, newest = (Event(f"e{n}", "u", "click", ts, item_id=f"i{n}") for n, ts in enumerate((900.0, 1000.0, 2000.0)))

    def state_after(folder, *batches):
        shard = open_shard(tmp_path / folder)
        for batch in batches:
            shard.apply(batch)
        return shard.state("u")

    in_order = state_after("in-order", [first], [late], [newest])
    # within a batch, events apply in time order: the same profile as in-order arrivals
    assert states_to_table([state_after("one-batch", [newest, late, first])]).equals(states_to_table([in_order]))
    # across batches, a late event applies as if it happened at the user's newest time (no time
    # gap), and the window keeps it in arrival order with its own time
    arrived = state_after("late", [first], [newest], [late])
    restamped = state_after("restamped", [first], [newest], [dataclasses.replace(late, ts=newest.ts)])
    assert np.array_equal(arrived.long_sum, restamped.long_sum) and np.array_equal(arrived.short_sum, restamped.short_sum)
    assert (arrived.long_weight, arrived.short_weight, arrived.counters, arrived.last_ts) == \
        (restamped.long_weight, restamped.short_weight, restamped.counters, newest.ts)
    assert [(e.item_id, e.ts) for e in arrived.recent] == [("i0", 900.0), ("i2", 2000.0), ("i1", 1000.0)]
    assert not np.array_equal(arrived.short_sum, in_order.short_sum)


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


# Pinned values, not computed ones: a user's shard decides where their durable state lives, so a
# change of shard_of (another hash, byte order, encoding or normalisation) moves every stored user
# to a shard that does not hold them. Such a change needs a repartition of every deployment, not
# new numbers here.
@pytest.mark.parametrize("user, num_shards, shard", [
    ("alice", 8, 1),
    ("bob", 8, 2),
    ("user-42", 4, 2),
    ("team/caf\u00e9", 3, 2),  # the NFC form: the one the service passes (test_ids.py)
    ("caf\u00e9", 16, 3),
    ("\u7528\u6237-7", 2, 1),
    ("alice", 1_000_003, 429_965),  # a large count pins more of the hash than the low bits
])
def test_shard_of_gives_the_same_shard_in_every_process_and_release(user, num_shards, shard):
    assert shard_of(user, num_shards) == shard


def test_shard_of_spreads_users_evenly():
    counts = np.bincount([shard_of(f"user-{n}", 4) for n in range(4000)], minlength=4)
    assert counts.min() > 800


def test_a_full_disk_refuses_the_batch_keeps_reads_and_takes_writes_once_space_returns(small_disk):
    shard = open_shard(small_disk)
    shard.apply(events("alice", 0, 3))
    before = shard.snapshot_table()
    filler = fill(small_disk)
    with pytest.raises(StorageUnavailable, match="No space left on device"):
        shard.apply(events("alice", 3, 40) + events("bob", 0, 40))
    with pytest.raises(StorageUnavailable, match="No space left on device"):
        shard.forget("alice")
    assert shard.snapshot_table().equals(before)  # nothing of the refused requests applied
    assert shard.recommend("alice", 3)["items"]
    filler.unlink()
    assert shard.apply(events("alice", 3, 40) + events("bob", 0, 40))["accepted"] == 80
    recovered = open_shard(small_disk)
    assert recovered.snapshot_table().equals(shard.snapshot_table())
    assert recovered.state("alice").n_events == 43

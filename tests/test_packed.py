"""Packed profile states: lossless, compact, and what a shard holds per user."""

import numpy as np
from profilerec.data.schema import Event
from profilerec.model.profile import ProfileParams, ProfileState, build_profile, states_to_table
from profilerec.service.packed import StateCodec, event_hash, remember

ITEMS = [f"i{n}" for n in range(50)]
ROWS = {item: n for n, item in enumerate(ITEMS)}


def codec(dtype="float16"):
    return StateCodec(lambda item: ROWS.get(item, -1), ITEMS.__getitem__, dtype)


def full_state(params, n_events=40, dim=384):
    rng = np.random.default_rng(0)
    vectors = {item: rng.normal(size=dim).astype(np.float32) for item in ITEMS}
    types = ["view", "click", "cart", "purchase", "rating"]
    events = [Event(f"e{n}", "u1", types[n % 5], 1000.0 + 37.5 * n, item_id=ITEMS[(n * 7) % 50],
                    value=float(1 + n % 5) if types[n % 5] == "rating" else None) for n in range(n_events)]
    meta = {item: {"brand": f"brand{n % 9}", "categories": [f"cat{n % 4}", f"sub{n % 13}"]} for n, item in enumerate(ITEMS)}
    return build_profile("u1", events, lambda e: vectors[e.item_id], params, meta.get), events


def test_pack_then_unpack_gives_back_the_same_state_and_hashes():
    params = ProfileParams()
    state, events = full_state(params)
    hashes = np.array([event_hash(e.event_id) for e in events[-10:]], dtype=np.uint64)
    c = codec()
    back, back_hashes = c.unpack("u1", c.pack(state, hashes), 384)
    assert states_to_table([back]).equals(states_to_table([state]))
    assert back.counters == state.counters and list(back.counters) == list(state.counters)
    np.testing.assert_array_equal(back_hashes, hashes)
    np.testing.assert_array_equal(StateCodec.hashes(c.pack(state, hashes)), hashes)
    empty, none = c.unpack("u2", c.pack(ProfileState("u2"), np.zeros(0, np.uint64)), 384)
    assert empty == ProfileState("u2") and len(none) == 0


def test_a_full_default_profile_packs_into_under_3kb():
    params = ProfileParams()
    state, events = full_state(params)
    assert len(state.recent) == params.window and len(state.counters) == params.max_counters
    hashes = np.array([event_hash(f"event-{n}") for n in range(128)], dtype=np.uint64)
    blob = codec().pack(state, hashes)
    # vectors 2*384*2 + window 20*21 + counters 12*12 + hashes 128*8 + header
    assert len(blob) == 2 * 384 * 2 + 20 * 21 + 12 * 12 + 128 * 8 + 33
    wide = codec("float32").pack(full_state(ProfileParams(vector_dtype="float32"))[0], hashes)
    assert len(wide) - len(blob) == 2 * 384 * 2


def test_remember_keeps_the_newest_hashes():
    hashes = np.zeros(0, np.uint64)
    for n in range(5):
        hashes = remember(hashes, n, 3)
    assert hashes.tolist() == [2, 3, 4]
    assert event_hash("a") == event_hash("a") != event_hash("b")

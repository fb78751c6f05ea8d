"""The profile math: decayed averages, weights, window, late events, numpy/torch agreement."""

import math

import numpy as np
import pytest
import torch
from profilerec.data.schema import Event
from profilerec.model.profile import (
    ProfileParams,
    ProfileState,
    apply_event,
    build_profile,
    decay,
    event_weight,
    interest_vectors,
    states_from_table,
    states_to_table,
    zero_shot_query,
)

DAY = 86400.0


def ev(n, ts, item="a", etype="purchase", value=None, user="u1"):
    return Event(f"e{n}", user, etype, ts, item_id=item, value=value)


def test_two_events_match_hand_computed_decayed_average():
    params = ProfileParams(long_half_life_events=4.0, long_half_life_seconds=2 * DAY,
                           short_half_life_events=1.0, short_half_life_seconds=math.inf, vector_dtype="float32")
    e1, e2 = np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32)
    state = apply_event(ProfileState("u1"), ev(1, 0.0, "a", "click"), e1, params)
    state = apply_event(state, ev(2, DAY, "b", "purchase"), e2, params)
    w1, w2 = params.type_weights["click"], params.type_weights["purchase"]
    kept_long = 0.5 ** (DAY / (2 * DAY)) * 0.5 ** (1 / 4.0)
    kept_short = 0.5 ** 1.0
    np.testing.assert_allclose(state.long_sum, kept_long * w1 * e1 + w2 * e2, rtol=1e-6)
    assert state.long_weight == pytest.approx(kept_long * w1 + w2)
    np.testing.assert_allclose(state.short_sum, kept_short * w1 * e1 + w2 * e2, rtol=1e-6)
    long, short = interest_vectors(state)
    np.testing.assert_allclose(long, (kept_long * w1 * e1 + w2 * e2) / (kept_long * w1 + w2), rtol=1e-6)
    # the short-term vector forgets faster, so it leans further towards the newest item
    assert short[1] / short[0] > long[1] / long[0]


def test_sums_are_stored_at_the_profile_precision_with_float32_arithmetic_in_between():
    rng = np.random.default_rng(3)
    e1, e2 = rng.normal(size=(2, 16)).astype(np.float32)
    params = ProfileParams()  # float16 storage by default
    state = build_profile("u1", [ev(1, 0.0, "a", "click"), ev(2, DAY, "b")], lambda e: {"a": e1, "b": e2}[e.item_id], params)
    assert state.long_sum.dtype == np.float16
    kept = decay(DAY, params.long_half_life_seconds, params.long_half_life_events)
    first = (params.type_weights["click"] * e1).astype(np.float16)
    expected = (np.float32(kept) * first.astype(np.float32) + params.type_weights["purchase"] * e2).astype(np.float16)
    np.testing.assert_array_equal(state.long_sum, expected)
    wide = build_profile("u1", [ev(1, 0.0, "a", "click"), ev(2, DAY, "b")], lambda e: {"a": e1, "b": e2}[e.item_id],
                         ProfileParams(vector_dtype="float32"))
    np.testing.assert_allclose(interest_vectors(state)[0], interest_vectors(wide)[0], rtol=2e-3, atol=1e-3)
    assert interest_vectors(state)[0].dtype == np.float32


def test_decay_combines_time_and_event_count():
    assert decay(0.0, DAY, math.inf) == 1.0
    assert decay(DAY, DAY, math.inf) == pytest.approx(0.5)
    assert decay(DAY, DAY, 2.0) == pytest.approx(0.5 * 0.5 ** 0.5)
    assert decay(-5.0, DAY, math.inf) == 1.0


def test_low_rating_pushes_the_profile_away_from_the_item():
    params = ProfileParams()
    liked, disliked = np.array([1.0, 0.2, 0.0], np.float32), np.array([0.0, 1.0, 0.0], np.float32)
    assert event_weight(ev(1, 0, etype="rating", value=1.0), params) < 0
    state = apply_event(ProfileState("u1"), ev(1, 0.0, "x", "rating", 5.0), liked, params)
    before = float(zero_shot_query(state, params) @ disliked)
    state = apply_event(state, ev(2, 60.0, "y", "rating", 1.0), disliked, params)
    after = float(zero_shot_query(state, params) @ disliked)
    assert after < before


def test_window_keeps_only_the_most_recent_events_and_input_state_is_untouched():
    params = ProfileParams(window=3)
    state = ProfileState("u1")
    vec = np.ones(4, np.float32)
    for n in range(5):
        new = apply_event(state, ev(n, float(n), f"i{n}"), vec, params)
        assert state.n_events == n  # the old state did not change
        state = new
    assert [e.item_id for e in state.recent] == ["i2", "i3", "i4"]
    assert state.n_events == 5


def test_late_event_counts_with_zero_gap_and_keeps_last_time():
    params = ProfileParams(long_half_life_events=math.inf, long_half_life_seconds=DAY)
    vec = np.ones(2, np.float32)
    state = apply_event(ProfileState("u1"), ev(1, 10 * DAY), vec, params)
    late = apply_event(state, ev(2, 2 * DAY), vec, params)
    assert late.last_ts == 10 * DAY
    w = params.type_weights["purchase"]
    assert late.long_weight == pytest.approx(2 * w)  # no decay across a negative gap


def test_event_without_vector_moves_window_but_only_decays_vectors():
    params = ProfileParams()
    state = apply_event(ProfileState("u1"), ev(1, 0.0, "a"), np.ones(2, np.float32), params)
    state2 = apply_event(state, ev(2, DAY, "b"), None, params)
    assert [e.item_id for e in state2.recent] == ["a", "b"]
    assert state2.long_weight < state.long_weight


def test_numpy_and_torch_give_the_same_profile():
    params = ProfileParams(vector_dtype="float32")  # torch (training) keeps its own precision
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(6, 8)).astype(np.float32)
    events = [ev(n, n * 3600.0, f"i{n}", etype) for n, etype in enumerate(["view", "click", "cart", "purchase", "view", "click"])]
    np_state = build_profile("u1", events, lambda e: vectors[int(e.item_id[1:])], params)
    tvec = torch.tensor(vectors, requires_grad=True)
    t_state = build_profile("u1", events, lambda e: tvec[int(e.item_id[1:])], params)
    query = zero_shot_query(t_state, params)
    np.testing.assert_allclose(query.detach().numpy(), zero_shot_query(np_state, params), rtol=1e-5, atol=1e-6)
    query.sum().backward()  # gradients flow back to the item vectors
    assert tvec.grad is not None and float(tvec.grad.abs().sum()) > 0


def test_states_round_trip_through_arrow():
    params = ProfileParams()
    meta = {"brand": "Acme", "categories": ["tools"]}
    state = build_profile("u1", [ev(1, 0.0, "a"), ev(2, 5.0, "b", "rating", 4.5)],
                          lambda e: np.arange(3, dtype=np.float32) + 1, params, lambda item: meta)
    empty = ProfileState("u2")
    back = states_from_table(states_to_table([state, empty]))
    assert back[1] == empty
    restored = back[0]
    np.testing.assert_array_equal(restored.long_sum, state.long_sum)
    np.testing.assert_array_equal(restored.short_sum, state.short_sum)
    assert restored.recent == state.recent
    assert restored.counters == pytest.approx(state.counters)
    assert (restored.n_events, restored.last_ts, restored.long_weight) == (state.n_events, state.last_ts, state.long_weight)


def test_a_vector_decayed_to_nothing_is_gone_not_nan():
    params = ProfileParams()
    vec = np.ones(4, np.float32)
    state = apply_event(ProfileState("u1"), ev(1, 0.0, "a", "rating", 5.0), vec, params)
    # three years later, a 3-star rating (weight 0): the short-term weight is below float32's range
    state = apply_event(state, ev(2, 3 * 365 * DAY, "b", "rating", 3.0), vec, params)
    assert 0 < state.short_weight < 1e-45
    long, short = interest_vectors(state)
    assert short is None and np.isfinite(long).all()
    assert np.isfinite(zero_shot_query(state, params)).all()

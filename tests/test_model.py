"""The profile scorer and the item priors, against hand-computed values (no Ray needed)."""

import json

import numpy as np
import pytest
import torch
from profilerec.config import ScorerConfig, TrainConfig
from profilerec.data.schema import Event
from profilerec.model.index import ItemIndex
from profilerec.model.priors import grown_priors, item_priors, read_priors, write_priors
from profilerec.model.profile import ProfileParams, ProfileState, apply_event
from profilerec.model.scorer import ProfileScorer, item_graphs, load_scorer, save_scorer
from profilerec.model.scorer_inputs import scorer_batch
from profilerec.training.scorer import scorer_optimizer

ITEMS = [f"i{n}" for n in range(6)]


def _index(dim: int = 8) -> ItemIndex:
    vectors = np.random.default_rng(0).normal(size=(len(ITEMS), dim)).astype(np.float32)
    return ItemIndex(list(ITEMS), vectors / np.linalg.norm(vectors, axis=1, keepdims=True))


def _events(user: str, items: list[str]) -> list[Event]:
    return [Event(event_id=f"{user}:{n}", user_id=user, item_id=item, type="review", ts=86400.0 * n)
            for n, item in enumerate(items)]


SEQUENCES = {"a": _events("a", ["i0", "i1", "i2"]), "b": _events("b", ["i0", "i1", "i3"]),
             "c": _events("c", ["i4", "i0"])}


def _state(index: ItemIndex, items: list[str], params: ProfileParams) -> ProfileState:
    state = ProfileState("u")
    for event in _events("u", items):
        state = apply_event(state, event, index.vector(event.item_id), params)
    return state


def test_item_priors_count_popularity_and_transitions_by_distance():
    index = _index()
    priors = item_priors(SEQUENCES, index, hidden={"b:2"}, span=2)
    assert priors.popularity.tolist() == [3, 2, 1, 0, 1, 0]
    dense = np.zeros((6, 6))
    for a in range(6):
        for k in range(priors.indptr[a], priors.indptr[a + 1]):
            dense[a, priors.indices[k]] = priors.counts[k]
    expected = np.zeros((6, 6))
    expected[0, 1] = 2  # a and b: i0 -> i1
    expected[1, 2] = 1  # a: i1 -> i2 (b's i3 is hidden)
    expected[0, 2] = 0.5  # a: i0 .. i2 at distance 2
    expected[4, 0] = 1  # c
    np.testing.assert_allclose(dense, expected)


def test_priors_round_trip_through_parquet_by_item_id(tmp_path):
    index = _index()
    priors = item_priors(SEQUENCES, index)
    write_priors(priors, index, str(tmp_path))
    # an index in another order, with an extra item: statistics follow the ids
    order = [3, 5, 0, 1, 2, 4]
    other = ItemIndex([ITEMS[r] for r in order] + ["new"], np.vstack([index.vectors[order], index.vectors[:1]]))
    back = read_priors(str(tmp_path), other)
    assert back.popularity.tolist() == [1, 0, 3, 2, 1, 1, 0]
    row = other.row("i0")
    followers = {other.item_ids[j] for j in back.indices[back.indptr[row]:back.indptr[row + 1]]}
    assert followers == {"i1"}


def test_scorer_adds_transitions_repeats_and_popularity_as_hand_computed():
    index = _index()
    params = ProfileParams()
    priors = item_priors(SEQUENCES, index)
    cfg = ScorerConfig(dropout=0.0)
    model = ProfileScorer(index.vectors, priors, params.window, cfg).eval()
    with torch.no_grad():
        model.repeat[0] = 0.7  # newest window item
        model.trans[0] = torch.tensor([1.5, 2.0])  # log-count and share, for the newest item
        model.pop.fill_(0.3)
    state = _state(index, ["i4", "i0"], params)
    batch = scorer_batch([state], index.row, params, cfg, index.dim)
    with torch.no_grad():
        logits = model(batch)[0].numpy()
        content = (model.scale.exp() * model.user_vectors(batch, model.item_matrix()) @ model.item_matrix().T)[0].numpy()
    expected = content + 0.3 * np.log1p(priors.popularity)
    expected[0] += 0.7  # i0 is the newest item: repeat bonus
    expected[1] += 1.5 * np.log1p(2) + 2.0 * 1.0  # i0 -> i1 twice, all of i0's transitions
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def _dense(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, n: int = len(ITEMS)) -> np.ndarray:
    out = np.zeros((n, n))
    out[np.repeat(np.arange(n), np.diff(indptr)), indices] = values
    return out


def test_reverse_transitions_read_the_transitions_backwards():
    priors = item_priors(SEQUENCES, _index())  # i0 -> i1 twice, i1 -> i2, i1 -> i3, i4 -> i0
    reverse = item_graphs(priors, ScorerConfig(reverse_transitions=True))["r"]
    expected = np.zeros((6, 6))
    expected[1, 0], expected[2, 1], expected[3, 1], expected[0, 4] = 2, 1, 1, 1  # row: the later item
    np.testing.assert_allclose(_dense(*reverse[:3]), expected)
    np.testing.assert_allclose(reverse[3], [1, 2, 1, 1])  # each entry's row total, entries in row order


def test_scorer_adds_reverse_transitions_as_hand_computed():
    index = _index()
    params = ProfileParams()
    priors = item_priors(SEQUENCES, index)
    cfg = ScorerConfig(dropout=0.0, transitions=False, repeat=False, popularity=False, reverse_transitions=True)
    model = ProfileScorer(index.vectors, priors, params.window, cfg).eval()
    with torch.no_grad():
        model.rtrans[0] = torch.tensor([1.5, 2.0])  # log-count and share, for the newest item
        model.rtrans[1] = torch.tensor([0.5, 3.0])  # and for the one before it
    batch = scorer_batch([_state(index, ["i0", "i1"], params)], index.row, params, cfg, index.dim)
    with torch.no_grad():
        logits = model(batch)[0].numpy()
        content = (model.scale.exp() * model.user_vectors(batch, model.item_matrix()) @ model.item_matrix().T)[0].numpy()
    expected = content.copy()
    expected[0] += 1.5 * np.log1p(2) + 2.0 * 1.0  # i1 was preceded by i0 twice, by nothing else
    expected[4] += 0.5 * np.log1p(1) + 3.0 * 1.0  # i0 was preceded by i4 once, by nothing else
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.predict(batch)[0], expected, rtol=1e-4, atol=1e-4)


def test_leave_one_out_takes_the_cases_own_transition_and_count_out():
    index = _index()
    params = ProfileParams()
    priors = item_priors(SEQUENCES, index)
    cfg = ScorerConfig(dropout=0.0, attention=False, interests=False)
    model = ProfileScorer(index.vectors, priors, params.window, cfg).eval()
    with torch.no_grad():
        model.trans[0] = torch.tensor([1.0, 0.0])
        model.pop.fill_(1.0)
    batch = scorer_batch([_state(index, ["i0"], params)], index.row, params, cfg, index.dim)
    target = torch.tensor([index.row("i1")])
    with torch.no_grad():
        plain, held_out = model(batch)[0], model(batch, target)[0]
    diff = (plain - held_out).numpy()
    # i0 -> i1 counted twice: log1p(2) - log1p(1); popularity of i1: log1p(2) - log1p(1)
    assert diff[index.row("i1")] == pytest.approx(2 * (np.log1p(2) - np.log1p(1)), rel=1e-5)
    assert np.allclose(np.delete(diff, index.row("i1")), 0.0, atol=1e-6)


def test_saved_scorer_scores_the_same_and_follows_item_ids(tmp_path):
    index = _index()
    params = ProfileParams()
    priors = item_priors(SEQUENCES, index)
    cfg = ScorerConfig(id_embeddings=True, dropout=0.0)
    torch.manual_seed(0)
    model = ProfileScorer(index.vectors, priors, params.window, cfg)
    with torch.no_grad():
        model.item_ids.weight.normal_()
    model.eval()
    save_scorer(model, str(tmp_path), index.item_ids, params, ["train"])
    state = _state(index, ["i2", "i3"], params)
    with torch.no_grad():
        original = model(scorer_batch([state], index.row, params, cfg, index.dim))[0].numpy()
    order = [5, 4, 3, 2, 1, 0]
    other = ItemIndex([ITEMS[r] for r in order], index.vectors[order])
    loaded = load_scorer(str(tmp_path), other.item_ids, other.vectors, item_priors(SEQUENCES, other))
    assert loaded.trained_on == ["train"]
    with torch.no_grad():
        again = loaded(scorer_batch([state], other.row, params, cfg, other.dim))[0].numpy()
    np.testing.assert_allclose(again, original[order], rtol=1e-5, atol=1e-5)


def test_a_scorer_saved_before_reverse_transitions_loads_without_them(tmp_path):
    index = _index()
    params = ProfileParams()
    priors = item_priors(SEQUENCES, index)
    cfg = ScorerConfig(reverse_transitions=False, dropout=0.0)
    model = ProfileScorer(index.vectors, priors, params.window, cfg).eval()
    save_scorer(model, str(tmp_path), index.item_ids, params, ["train"])
    meta = json.loads((tmp_path / "scorer.json").read_text())
    del meta["scorer"]["reverse_transitions"]  # as the scorer.json of an earlier version
    (tmp_path / "scorer.json").write_text(json.dumps(meta))
    loaded = load_scorer(str(tmp_path), index.item_ids, index.vectors, priors)
    assert not loaded.params.reverse_transitions
    batch = scorer_batch([_state(index, ["i4", "i0"], params)], index.row, params, cfg, index.dim)
    np.testing.assert_allclose(loaded.predict(batch), model.predict(batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [ScorerConfig(id_embeddings=True, reverse_transitions=True, user_transform=True),
                                 ScorerConfig(attention=False, popularity=False),
                                 ScorerConfig(interests=False, repeat=False, transitions=False)],
                         ids=["every part", "no attention or popularity", "content and attention only"])
def test_numpy_inference_scores_as_the_torch_forward(cfg):
    index = _index()
    params = ProfileParams()
    model = ProfileScorer(index.vectors, item_priors(SEQUENCES, index, span=2), params.window, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for weight in model.parameters():  # every term away from its neutral start
            weight.normal_(std=0.5)
    model.eval()
    states = [_state(index, items, params) for items in (["i4", "i0"], ["i1", "i2", "i3", "i0", "i1"], ["i5"])]
    batch = scorer_batch(states, index.row, params, cfg, index.dim)
    with torch.no_grad():
        expected = model(batch).numpy()
    np.testing.assert_allclose(model.predict(batch), expected, rtol=1e-4, atol=1e-4)
    one = scorer_batch(states[1:2], index.row, params, cfg, index.dim)
    np.testing.assert_allclose(model.predict(one)[0], expected[1], rtol=1e-4, atol=1e-4)


def test_numpy_inference_follows_new_weights_and_items():
    index = _index()
    params = ProfileParams()
    cfg = ScorerConfig(dropout=0.0)
    priors = item_priors(SEQUENCES, index)
    model = ProfileScorer(index.vectors, priors, params.window, cfg).eval()
    batch = scorer_batch([_state(index, ["i0", "i1"], params)], index.row, params, cfg, index.dim)
    before = model.predict(batch)
    model.train()
    with torch.no_grad():
        model.pop.fill_(2.0)
    model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(model.predict(batch), model(batch).numpy(), rtol=1e-4, atol=1e-4)
    assert not np.allclose(model.predict(batch), before)
    grown = np.vstack([index.vectors, index.vectors[:1]])
    model.set_items(grown, grown_priors(priors, len(grown)))
    assert model.predict(batch).shape == (1, len(grown))
    with torch.no_grad():
        np.testing.assert_allclose(model.predict(batch), model(batch).numpy(), rtol=1e-4, atol=1e-4)


def test_the_item_projection_learns_at_its_own_rate():
    index = _index()
    model = ProfileScorer(index.vectors, item_priors(SEQUENCES, index), ProfileParams().window)
    optimizer = scorer_optimizer(model, TrainConfig(learning_rate=0.01, projection_lr=0.1))
    rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert len(rates) == sum(1 for _ in model.parameters())  # every weight once
    assert rates[id(model.proj.weight)] == pytest.approx(0.001)
    assert {rate for key, rate in rates.items() if key != id(model.proj.weight)} == {0.01}

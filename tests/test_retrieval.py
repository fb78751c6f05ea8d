"""Two-stage recommendations (retrieval.py + the scorer on the candidates) against scoring every
item, on a catalog of a few thousand items where the nearest-neighbour search is exact."""

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
import torch
from profilerec.config import ScorerConfig
from profilerec.data import storage
from profilerec.data.schema import ITEMS_SCHEMA, Event
from profilerec.errors import DataError
from profilerec.model import ann, frozen_scorer, row_sets
from profilerec.model.ann import build_ivf, exact_rerank, read_index, read_manifest, write_index
from profilerec.model.frozen_scorer import ScoreParts, frozen_parts, frozen_popular_scores, frozen_row_scores
from profilerec.model.index import ItemIndex
from profilerec.model.priors import item_priors
from profilerec.model.profile import ProfileParams, ProfileState, apply_event
from profilerec.model.ranking import case_ranks
from profilerec.model.recommend import Recommender
from profilerec.model.replay import Case, case_states
from profilerec.model.retrieval import ExactNearest, Retrieval
from profilerec.model.scorer import ProfileScorer
from profilerec.model.scorer_inputs import scorer_batch
from profilerec.model.second_stage import FEATURES, SecondStage

N, DIM = 3000, 16
BRANDS = ["Acme", "Bolt", "Rare"]


def _catalog(seed: int = 0) -> tuple[ItemIndex, dict[str, list[Event]]]:
    rng = np.random.default_rng(seed)
    # items in clusters, as text embeddings are: many near neighbours, a few far ones
    centres = rng.normal(size=(30, DIM))
    vectors = centres[rng.integers(0, 30, N)] + 0.4 * rng.normal(size=(N, DIM))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    brands = [BRANDS[2] if i % 500 == 0 else BRANDS[i % 2] for i in range(N)]  # "Rare": 6 items
    categories = [[f"c{i % 7}"] for i in range(N)]
    index = ItemIndex([f"i{i}" for i in range(N)], vectors, brands, categories, [f"t{i}" for i in range(N)])
    # popularity skewed and transitions to arbitrary items (far from the user vector, often)
    sequences = {}
    for u in range(400):
        items = rng.choice(N, size=8, p=_zipf(N))
        sequences[f"u{u}"] = [Event(event_id=f"u{u}:{n}", user_id=f"u{u}", item_id=f"i{i}", type="view",
                                    ts=3600.0 * n) for n, i in enumerate(items)]
    return index, sequences


@pytest.fixture(autouse=True)
def every_scanned_row_reranked(monkeypatch):
    # the IVF exact over the rows it scans: 4-bit codes of 16-dimension vectors are too rough to
    # order them (the index job measures what they keep of real ones), and these tests check what
    # retrieval and the rerank make of the rows found
    monkeypatch.setattr(ann, "RERANK_MIN", N)


def _zipf(n: int) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1)
    return weights / weights.sum()


def random_second_stage(depth: int = 50, seed: int = 2) -> SecondStage:
    """A second stage whose corrections are as large as the scores: it reorders the lists."""
    rng = np.random.default_rng(seed)
    f, hidden = len(FEATURES), 8
    return SecondStage(depth, mean=np.zeros(f, np.float32), std=np.ones(f, np.float32),
                       w1=rng.normal(size=(f, hidden)).astype(np.float32), b1=np.zeros(hidden, np.float32),
                       w2=rng.normal(size=hidden).astype(np.float32), b2=0.0)


def _recommender(with_scorer: bool, popularity: float = 0.3, reverse: float = 0.0
                 ) -> tuple[Recommender, list[ProfileState]]:
    index, sequences = _catalog()
    params = ProfileParams()
    priors = item_priors(sequences, index)
    scorer = None
    if with_scorer:
        cfg = ScorerConfig(reverse_transitions=reverse > 0)
        scorer = ProfileScorer(index.vectors, priors, params.window, cfg)
        with torch.no_grad():  # every term switched on at the strength a trained scorer gives it
            scorer.pop.fill_(popularity)
            scorer.repeat.fill_(1.0)
            scorer.trans.fill_(1.5)
            if scorer.rtrans is not None:
                scorer.rtrans.fill_(reverse)
            torch.manual_seed(0)
            scorer.proj.weight.add_(0.05 * torch.randn_like(scorer.proj.weight))
        scorer.eval()
    recommender = Recommender(index, params, priors=priors, scorer=scorer)
    states = []
    rng = np.random.default_rng(1)
    for u in range(60):
        state = ProfileState(f"p{u}")
        for n, row in enumerate(rng.choice(N, size=int(rng.integers(1, 12)), p=_zipf(N))):
            event = Event(event_id=f"p{u}:{n}", user_id=f"p{u}", item_id=f"i{row}", type="view", ts=3600.0 * n)
            state = apply_event(state, event, index.vector(event.item_id), params)
        states.append(state)
    states.append(ProfileState("cold"))
    return recommender, states


def _exact_and_two_stage(recommender: Recommender, states: list[ProfileState], nearest: int, popular: int = 50,
                         search: str = "exact", **request) -> tuple[list, list]:
    exact = [recommender.recommend(s, **request) for s in states]
    matrix = recommender.item_matrix()
    index = ExactNearest(matrix) if search == "exact" else build_ivf(matrix, probes=24, threads=1)
    # ivf: filters go through the index's own filtered search, as on a large catalog
    recommender.retrieval = Retrieval(index, nearest=nearest, popular=popular,
                                      exact_filtered=20_000 if search == "exact" else 0)
    two_stage = [recommender.recommend(s, **request) for s in states]
    recommender.retrieval = None
    return exact, two_stage


def _same_answers(a: list[list[dict]], b: list[list[dict]], recommender: Recommender) -> None:
    """The same items in the same order, with the same scores up to float rounding (a product
    over a few rows adds up in another order than one over all of them; `recommender`'s second
    stage, when it has one, carries that rounding into its own scores)."""
    assert [[item["item_id"] for item in answer] for answer in a] == [[item["item_id"] for item in answer]
                                                                       for answer in b]
    np.testing.assert_allclose([item["score"] for answer in a for item in answer],
                               [item["score"] for answer in b for item in answer], rtol=1e-5,
                               atol=1e-5 if recommender.second_stage is not None else 1e-6)


@pytest.fixture(params=["scorer", "zero-shot", "second stage"], scope="module")
def served(request):
    recommender, states = _recommender(request.param != "zero-shot")
    if request.param == "second stage":
        recommender.second_stage = random_second_stage()
    return recommender, states


@pytest.mark.parametrize("search", ["exact", "ivf"])
def test_two_stage_returns_what_scoring_every_item_returns(served, search):
    exact, two_stage = _exact_and_two_stage(*served, nearest=100, search=search, k=10)
    _same_answers(two_stage, exact, served[0])
    assert all(len(answer) == 10 for answer in two_stage)


@pytest.mark.parametrize("search", ["exact", "ivf"])
def test_two_stage_holds_the_items_that_reverse_transitions_lift(search):
    # strong enough to lift items far from the user vector into the top 10
    recommender, states = _recommender(True, reverse=8.0)
    exact, two_stage = _exact_and_two_stage(recommender, states, nearest=100, search=search, k=10)
    _same_answers(two_stage, exact, recommender)
    # some of those items are none of the other candidates: not near, not popular, no transition
    matrix = recommender.item_matrix()
    popular = set(recommender.popular_rows()[:50].tolist())
    forward = dataclasses.replace(recommender.scorer.params, reverse_transitions=False)
    forward_only = dataclasses.replace(recommender.scorer.frozen(), params=forward, more_graphs=())
    lifted = 0
    for state, answer in zip(states, exact):
        if not state.recent:
            continue
        parts = recommender.score_parts([state])
        batch = scorer_batch([state], recommender.index.row, recommender.params, forward, recommender.index.dim)
        others = (set(ExactNearest(matrix).search(parts.user, 100)[0].tolist()) | popular
                  | set(frozen_parts(forward_only, batch).rows.tolist()))
        lifted += sum(recommender.index.row(item["item_id"]) not in others for item in answer)
    assert lifted > 0


def _overlap(a: list[list[dict]], b: list[list[dict]]) -> float:
    return float(np.mean([len({i["item_id"] for i in x} & {i["item_id"] for i in y}) / 10 for x, y in zip(a, b)]))


@pytest.mark.parametrize("popularity", [0.3, 4.0], ids=["sparse terms", "strong popularity"])
def test_items_the_vector_search_misses_are_candidates_too(popularity, monkeypatch):
    recommender, states = _recommender(True, popularity)
    # with the 10 nearest items only and no fixed list of popular ones, the repeats, transitions
    # and the items whose popularity could lift them past the 10th still make the full ranking's
    # top-10: with an exact search, the very same lists
    exact, two_stage = _exact_and_two_stage(recommender, states, nearest=10, popular=0, k=10)
    matrix = recommender.item_matrix()
    far = 0
    for state, ex in zip(states, exact):
        if not state.recent:
            continue
        parts = recommender.score_parts([state])
        nearest = set(ExactNearest(matrix).search(parts.user, 10)[0].tolist())
        far += sum(recommender.index.row(item["item_id"]) not in nearest for item in ex)
    assert far > 0  # the full ranking has items outside the 10 nearest...
    _same_answers(two_stage, exact, recommender)  # ...and the two-stage lists have them too
    if popularity > 1:  # where popularity places items, the lifted ones are what finds them
        monkeypatch.setattr(frozen_scorer, "LIFTED_LIMIT", 0)
        recommender, _ = _recommender(True, popularity)  # its popular block made with no row
        _, unlifted = _exact_and_two_stage(recommender, states, nearest=10, popular=0, k=10)
        assert _overlap(exact, unlifted) < 0.95


def test_the_popular_items_are_scored_from_their_block_as_candidates_are_scored(monkeypatch):
    monkeypatch.setattr(frozen_scorer, "LIFTED_LIMIT", 300)  # a block of part of the catalog
    recommender, states = _recommender(True, 4.0)
    frozen = recommender.scorer.frozen()
    user = recommender.score_parts([next(s for s in states if s.recent)]).user
    rows = frozen.by_popularity[0][:300]
    none = np.zeros(0, dtype=np.int64)
    dense = ScoreParts(user, none, none, np.zeros(0, dtype=np.float32))  # no repeat, no transition
    order = np.argsort(rows)
    expected = np.empty(300, dtype=np.float32)
    expected[order] = frozen_row_scores(frozen, dense, rows[order])[0]
    assert frozen.popular_items.shape == (300, recommender.index.dim)
    np.testing.assert_allclose(frozen_popular_scores(frozen, user[0], 300), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(frozen_popular_scores(frozen, user[0], 120), expected[:120], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("request_args", [{"brand": "acme"}, {"brand": "RARE"}, {"category": "c3"},
                                          {"brand": "bolt", "category": "c2"}, {"exclude_seen": True},
                                          {"brand": "nobody"}],
                         ids=["brand", "brand with fewer items than k", "category", "both", "exclude seen",
                              "no item"])
@pytest.mark.parametrize("search", ["exact", "ivf"])
def test_filters_and_exclusions_hold_as_in_the_full_ranking(served, request_args, search):
    recommender, states = served
    exact, two_stage = _exact_and_two_stage(recommender, states, nearest=100, search=search, k=10, **request_args)
    _same_answers(two_stage, exact, recommender)
    index = recommender.index
    for state, answer in zip(states, two_stage):
        for item in answer:
            meta = index.meta(item["item_id"])
            if "brand" in request_args:
                assert meta["brand"].casefold() == request_args["brand"].casefold()
            if "category" in request_args:
                assert request_args["category"] in meta["categories"]
            if request_args.get("exclude_seen"):
                assert item["item_id"] not in {ev.item_id for ev in state.recent}
    if "RARE" in request_args.values():
        assert all(len(answer) == 6 for answer in two_stage)  # every Rare item, none else
    if "nobody" in request_args.values():
        assert all(answer == [] for answer in two_stage)


def test_the_second_stage_reorders_the_first_stage_top_items_and_leaves_the_rest_below():
    recommender, states = _recommender(True)
    stage = random_second_stage()
    first_stage = [recommender.recommend(s, k=60) for s in states]
    recommender.second_stage = stage
    changed = 0
    for state, first in zip(states, first_stage):
        answer = recommender.recommend(state, k=60)
        if not state.recent:  # no profile to reorder by: the popularity list as it was
            assert answer == first
            continue
        rows = np.array([recommender.index.row(item["item_id"]) for item in first])
        scores = np.array([item["score"] for item in first], dtype=np.float32)
        features = recommender.second_stage_features([state], rows[None, :50], scores[None, :50])
        new = stage.scores(features)[0]
        head = rows[:50][np.lexsort((rows[:50], -new))]
        assert [recommender.index.row(item["item_id"]) for item in answer] == head.tolist() + rows[50:].tolist()
        assert [item["score"] for item in answer][:50] == pytest.approx(np.sort(new)[::-1].tolist(), rel=1e-5)
        assert all(a["score"] >= b["score"] for a, b in zip(answer, answer[1:]))
        changed += [item["item_id"] for item in answer[:10]] != [item["item_id"] for item in first[:10]]
    assert changed > len(states) // 2


def test_evaluation_ranks_each_target_where_the_recommendation_lists_it():
    recommender, _ = _recommender(True)
    recommender.second_stage = random_second_stage()
    index, sequences = _catalog()
    cases = [Case(user, "test", events[-1].item_id, events[:-1]) for user, events in list(sequences.items())[:40]]
    ranks = case_ranks(recommender, cases)
    states = case_states(cases, recommender.vector_of, recommender.params, recommender.index.meta)
    for case, state, rank in zip(cases, states, ranks):
        listed = [item["item_id"] for item in recommender.recommend(state, k=len(index))]
        assert listed.index(case.target) == rank
    assert (ranks < 50).any() and (ranks >= 50).any()  # targets on the reordered head and below it


@pytest.mark.parametrize("with_scorer", [True, False], ids=["scorer", "zero-shot"])
def test_items_added_while_serving_are_retrievable_at_once(with_scorer):
    recommender, states = _recommender(with_scorer)
    states = [s for s in states if s.recent]
    recommender.retrieval = Retrieval(ExactNearest(recommender.item_matrix()), nearest=50, popular=10)
    target = recommender.score_parts(states[:1]).user[0]
    # an item pointing where the user vector points: the best match in the catalog, added after
    # the nearest-neighbour index was built
    text_vector = target if recommender.scorer is None else np.linalg.solve(
        recommender.scorer.proj.weight.detach().numpy(), target)
    text_vector = (text_vector / np.linalg.norm(text_vector)).astype(np.float32)
    items = pa.Table.from_pylist([{"item_id": "fresh", "title": "Fresh", "brand": "Acme", "categories": ["c3"],
                                   "description": None}], schema=ITEMS_SCHEMA)
    recommender.upsert_items(items, text_vector[None, :])
    assert recommender.retrieval.index.size == N  # the index itself did not change
    top = recommender.recommend(states[0], k=10)
    assert "fresh" in [item["item_id"] for item in top]
    recommender.retrieval = None
    _same_answers([recommender.recommend(states[0], k=10)], [top], recommender)


def test_the_codes_candidates_are_reranked_by_the_exact_inner_product():
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(50, 8)).astype(np.float32)
    queries = rng.normal(size=(2, 8)).astype(np.float32)
    rows = np.array([[4, 9, 1, 30, -1, -1], [7, -1, -1, -1, -1, -1]])
    out = exact_rerank(rows, queries, vectors, 3)
    expected = sorted([4, 9, 1, 30], key=lambda r: -float(vectors[r] @ queries[0]))[:3]
    assert out[0].tolist() == expected and out[1].tolist() == [7, -1, -1]


def test_row_sets_agree_with_numpy():
    rng = np.random.default_rng(0)
    for size in (0, 1, 2, 50, 3000):
        rows = rng.integers(0, 500, size)
        of = np.unique(rng.integers(0, 500, 200))
        assert np.array_equal(row_sets.distinct(rows), np.unique(rows))
        assert np.array_equal(row_sets.member(rows, of), np.isin(rows, of))
        assert not row_sets.member(rows, of[:0]).any()


def test_a_process_reads_the_build_whose_manifest_it_read_while_later_builds_are_written(tmp_path):
    rng = np.random.default_rng(0)
    ids = [f"i{n}" for n in range(400)]

    def unit(seed: int) -> np.ndarray:
        vectors = np.random.default_rng(seed).normal(size=(len(ids), 16)).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def build(vectors: np.ndarray) -> dict:
        return write_index(build_ivf(vectors, lists=4, probes=4, threads=1), str(tmp_path / "index"), ids, vectors,
                           {"items": len(ids)})

    first, other = unit(1), unit(2)
    held = build(first)  # a serving process reads this manifest...
    second = build(other)  # ...and a rebuild over other vectors lands before it opens the files
    index = read_index(str(tmp_path / "index"), ids, first, held)
    query = first[rng.integers(len(ids), size=5)]
    np.testing.assert_array_equal(index.search(query, 10)[:, 0],
                                  ExactNearest(first).search(query, 10)[:, 0])  # the first build's own files
    with pytest.raises(DataError, match="other item vectors"):
        read_index(str(tmp_path / "index"), ids, first)  # the folder's current build is the second one
    third = build(other)
    assert read_manifest(str(tmp_path / "index")) == third
    builds = storage.list_folders(str(tmp_path / "index" / "builds"))
    assert sorted(builds) == sorted([second["build_id"], third["build_id"]])  # the previous kept, older removed


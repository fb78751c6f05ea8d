"""The batch jobs stream the log in chunks of whole users: the same results as the whole log at once."""

import dataclasses
import logging
import time

import numpy as np
import profilerec.data.datasets as datasets
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import write_tiny_amazon
from profilerec.batch.evaluate import run_evaluate, split_recommender
from profilerec.batch.index import run_index
from profilerec.batch.profiles import run_profiles
from profilerec.config import EvaluateConfig, IndexConfig, PrepareConfig, ProfilesConfig, RetrievalConfig
from profilerec.data import storage
from profilerec.data.learned import ITEMS_LOG, VectorLog
from profilerec.data.schema import ITEMS_SCHEMA
from profilerec.data.vectors import vectors_to_arrow
from profilerec.errors import ConfigError, DataError
from profilerec.model.priors import item_priors, log_priors
from profilerec.model.profile import build_profile, states_to_table
from profilerec.model.ranking import case_ranks, popularity_ranks, ranking_metrics
from profilerec.model.recommend import load_recommender
from profilerec.model.replay import hidden_event_ids, iter_cases, user_sequences
from profilerec.model.retrieval import configured_retrieval
from profilerec.service.shard_actors import watch_index


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared slice of the bundled sample and random unit item vectors for it."""
    tmp = tmp_path_factory.mktemp("batch")
    data = datasets.prepare(PrepareConfig(source="amazon", input=str(write_tiny_amazon(tmp / "source", 40)),
                                          output=str(tmp / "prepared")))
    items = data.items.column("item_id")
    vectors = np.random.default_rng(0).normal(size=(len(items), 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    storage.write_table(pa.table({"item_id": items, "vector": vectors_to_arrow(vectors)}),
                        str(tmp / "embeddings" / "items" / "part-0.parquet"))
    return tmp, data


def test_chunks_hold_whole_users_and_the_whole_log(prepared):
    tmp, data = prepared
    chunks = list(datasets.iter_user_events(str(tmp / "prepared"), rows=7))
    assert len(chunks) > 5
    assert pa.concat_tables(chunks).equals(data.events)
    users = [set(c.column("user_id").to_pylist()) for c in chunks]
    assert sum(map(len, users)) == len(set().union(*users))  # no user in two chunks


def test_streamed_priors_equal_priors_of_the_whole_log(prepared, monkeypatch):
    tmp, data = prepared
    monkeypatch.setattr(datasets, "EVENT_CHUNK_ROWS", 9)
    index = load_recommender(data.items, str(tmp / "embeddings")).index
    hidden = hidden_event_ids(data.cases, "valid")
    whole = item_priors(user_sequences(data.events), index, hidden, span=2)
    streamed = log_priors(str(tmp / "prepared"), index, pa.array(sorted(hidden), pa.string()), span=2)
    assert whole.counts.size > 10
    for field in ("popularity", "indptr", "indices", "counts"):
        np.testing.assert_array_equal(getattr(streamed, field), getattr(whole, field))


def test_profiles_and_evaluate_jobs_stream_to_the_whole_log_results(prepared, monkeypatch):
    tmp, data = prepared
    monkeypatch.setattr(datasets, "EVENT_CHUNK_ROWS", 11)
    folders = dict(input=str(tmp / "prepared"), embeddings=str(tmp / "embeddings"), model=str(tmp / "no-model"))
    # two worker processes: chunks go out and come back in order
    summary = run_profiles(ProfilesConfig(**folders, output=str(tmp / "profiles"), workers=2))
    sequences = user_sequences(data.events)
    recommender = load_recommender(data.items, str(tmp / "embeddings"))
    expected = states_to_table([build_profile(u, seq, recommender.vector_of, recommender.params,
                                              recommender.index.meta) for u, seq in sequences.items()])
    assert summary["users"] == len(sequences) and summary["events"] == data.events.num_rows
    assert summary["workers"] == 2
    assert storage.read_table(str(tmp / "profiles" / "states.parquet")).equals(expected)
    popularity = storage.read_table(str(tmp / "profiles" / "popularity.parquet"))
    assert pc.sum(popularity.column("count")).as_py() == data.events.num_rows  # every item is in the index

    # no index yet (retrieval.index's default is the checkout's work/, which a demo run fills)
    report = run_evaluate(EvaluateConfig(**folders, output=str(tmp / "report"), workers=2,
                                         retrieval=RetrievalConfig(index=str(tmp / "index"))))
    cases = list(iter_cases(sequences, data.cases, ["test"], data.max_history))
    whole = split_recommender(data, sequences, str(tmp / "embeddings"), "test")
    assert report["cases"] == len(cases) > 30
    assert report["methods"]["profilerec"] == ranking_metrics(case_ranks(whole, cases))
    assert report["methods"]["popularity"] == ranking_metrics(popularity_ranks(whole, cases))


def test_index_job_writes_an_index_the_service_and_evaluation_use(prepared):
    tmp, data = prepared
    folders = dict(input=str(tmp / "prepared"), embeddings=str(tmp / "embeddings"), model=str(tmp / "no-model"))
    manifest = run_index(IndexConfig(**folders, output=str(tmp / "index"), threads=1))
    assert manifest["items"] == data.items.num_rows and manifest["vectors"] == "text"
    assert manifest["recall@10"] >= 0.95 and manifest["build_seconds"] >= 0
    assert 1 <= manifest["probes"] <= manifest["lists"]
    assert storage.read_json(str(tmp / "index" / "manifest.json")) == manifest
    # recall measured on what the service will be asked: the profiles of the validation cases
    valid = list(iter_cases(user_sequences(data.events), data.cases, ["valid"], data.max_history))
    assert manifest["queries"] == "profiles replayed from the log"
    assert manifest["recall_queries"] == sum(1 for case in valid if case.history) > 30

    recommender = load_recommender(data.items, str(tmp / "embeddings"))
    two_stage = RetrievalConfig(mode="two_stage", index=str(tmp / "index"))
    assert configured_retrieval(RetrievalConfig(index=str(tmp / "index")), recommender.index.item_ids,
                                recommender.item_matrix()) is None  # auto: a small catalog scores every item
    recommender.use_retrieval(two_stage)
    assert recommender.retrieval.index.size == data.items.num_rows and not recommender.retrieval.fresh

    # evaluation adds the two-stage line: on a catalog this small, the same ranks as scoring every item
    report = run_evaluate(EvaluateConfig(**folders, output=str(tmp / "report-2"), workers=1, retrieval=two_stage))
    exact, staged = report["methods"]["profilerec"], report["methods"]["profilerec (two-stage)"]
    for name in exact:
        if name != "MRR":
            assert staged[name] == pytest.approx(exact[name])

    # the index no longer fits the catalog or its vectors: one line that says what to run
    other_order = data.items.take(np.arange(data.items.num_rows)[::-1])
    with pytest.raises(DataError, match="another catalog: run `profilerec index`"):
        load_recommender(other_order, str(tmp / "embeddings")).use_retrieval(two_stage)
    changed = load_recommender(data.items, str(tmp / "embeddings"))
    changed.index.vectors = changed.index.vectors[:, ::-1].copy()
    with pytest.raises(DataError, match="other item vectors"):
        changed.use_retrieval(two_stage)
    with pytest.raises(ConfigError, match="setting retrieval.index: no index at"):
        changed.use_retrieval(RetrievalConfig(mode="two_stage", index=str(tmp / "nowhere")))
    with pytest.raises(ConfigError, match="setting retrieval.mode"):
        changed.use_retrieval(RetrievalConfig(mode="fast"))


def _learned_items(ids: list[str], dim: int, seed: int) -> tuple[pa.Table, np.ndarray]:
    """Items as PUT /v1/items logs them, with random unit vectors."""
    vectors = np.random.default_rng(seed).normal(size=(len(ids), dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = [{"item_id": i, "title": f"T {i}", "description": None, "brand": None, "categories": [], "extra": None}
            for i in ids]
    return pa.Table.from_pylist(rows, schema=ITEMS_SCHEMA), vectors


def test_a_rebuilt_index_holding_the_items_learned_while_serving_is_swapped_in(prepared):
    tmp, data = prepared
    folders = dict(input=str(tmp / "prepared"), embeddings=str(tmp / "embeddings"), model=str(tmp / "no-model"))
    state, index = str(tmp / "serve-state"), str(tmp / "live-index")
    exact_search = dict(threads=1, probes=10_000)  # every cluster: two-stage ranks as scoring every item
    run_index(IndexConfig(**folders, output=index, **exact_search))
    two_stage = RetrievalConfig(mode="two_stage", index=index)
    behind = load_recommender(data.items, str(tmp / "embeddings"))  # a process that has not learned them yet
    behind.use_retrieval(two_stage)
    served_log = VectorLog(state, ITEMS_LOG)
    served_log.append(*_learned_items([data.items.column("item_id")[0].as_py(), "new-1", "new-2"], 16, seed=1))
    serving = load_recommender(data.items, str(tmp / "embeddings"))
    serving.apply_learned({ITEMS_LOG: served_log})
    serving.use_retrieval(two_stage)
    n = data.items.num_rows
    assert serving.retrieval.fresh == {0, n, n + 1}  # changed since the build: searched exactly

    manifest = run_index(IndexConfig(**folders, output=index, serving_state=state, **exact_search))
    assert manifest["items"] == n + 2 and manifest["learned"] == served_log.fingerprint != 0
    served_log.append(*_learned_items(["late"], 16, seed=2))  # learned after the rebuild
    serving.apply_learned({ITEMS_LOG: served_log})
    assert serving.load_rebuilt_index()
    assert not serving.load_rebuilt_index()  # loaded once
    sequences = user_sequences(data.events)
    states = [build_profile(u, seq, serving.vector_of, serving.params, serving.index.meta)
              for u, seq in list(sequences.items())[:20]]
    staged = [serving.recommend(s, k=10) for s in states]  # swaps the rebuilt index in first
    assert serving.retrieval.build["build_id"] == manifest["build_id"] and serving.retrieval.index.size == n + 2
    assert serving.retrieval.fresh == {n + 2}  # only what the build does not hold
    exact = dataclasses.replace(serving, retrieval=None)
    for got, expected in zip(staged, (exact.recommend(s, k=10) for s in states)):
        assert [r["item_id"] for r in got] == [r["item_id"] for r in expected]
        assert [r["score"] for r in got] == pytest.approx([r["score"] for r in expected], abs=1e-5)
    assert "late" in [r["item_id"] for r in staged[1]]  # an item learned after the build, found at once

    # the process that had not learned the build's items keeps its index until it has
    assert not behind.load_rebuilt_index() and behind.retrieval.build["build_id"] != manifest["build_id"]
    behind.apply_learned({ITEMS_LOG: VectorLog(state, ITEMS_LOG)})
    assert behind.load_rebuilt_index()
    behind.recommend(states[0], k=10)
    assert behind.retrieval.build["build_id"] == manifest["build_id"] and behind.retrieval.fresh == {n + 2}


def refusals(caplog) -> list[str]:
    """The warnings of an index watcher that kept its index in use."""
    return [r.getMessage() for r in caplog.records if "keeping the index in use" in r.getMessage()]


def test_a_serving_process_watches_its_index_folder_and_swaps_a_new_build_in(prepared, caplog):
    tmp, data = prepared
    folders = dict(input=str(tmp / "prepared"), embeddings=str(tmp / "embeddings"), model=str(tmp / "no-model"))
    index = str(tmp / "watched-index")
    run_index(IndexConfig(**folders, output=index, threads=1))
    serving = load_recommender(data.items, str(tmp / "embeddings"))
    serving.use_retrieval(RetrievalConfig(mode="two_stage", index=index))
    first = serving.retrieval.build["build_id"]
    sequences = user_sequences(data.events)
    user, events = next(iter(sequences.items()))
    state = build_profile(user, events, serving.vector_of, serving.params, serving.index.meta)
    stop = watch_index(serving, 0.05)
    try:
        rebuilt = run_index(IndexConfig(**folders, output=index, threads=1))
        deadline = time.monotonic() + 30
        while serving.retrieval.build["build_id"] == first and time.monotonic() < deadline:
            time.sleep(0.05)
            serving.recommend(state, k=5)  # the swap happens on the recommending thread
        assert serving.retrieval.build["build_id"] == rebuilt["build_id"] != first

        # a build the process cannot use (here: over other item vectors) leaves the index in use, said once
        other = load_recommender(data.items, str(tmp / "embeddings"))
        other.index.vectors = other.index.vectors[:, ::-1].copy()
        storage.write_table(pa.table({"item_id": other.index.item_ids, "vector": vectors_to_arrow(other.index.vectors)}),
                            str(tmp / "other-embeddings" / "items" / "part-0.parquet"))
        with caplog.at_level(logging.WARNING, logger="profilerec.service.shard_actors"):
            refused = run_index(IndexConfig(**{**folders, "embeddings": str(tmp / "other-embeddings")}, output=index,
                                            threads=1))
            deadline = time.monotonic() + 30
            while not refusals(caplog) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1)  # twenty more polls of the watcher, none of which may say it again
        serving.recommend(state, k=5)
        assert serving.retrieval.build["build_id"] == rebuilt["build_id"] != refused["build_id"]
        warnings = refusals(caplog)
        assert len(warnings) == 1 and "other item vectors" in warnings[0]
    finally:
        stop.set()

"""The batch jobs stream the log in chunks of whole users: the same results as the whole log at once."""

import numpy as np
import profilerec.data.datasets as datasets
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import write_tiny_amazon
from profilerec.batch.evaluate import split_recommender
from profilerec.batch.profiles import run_profiles
from profilerec.config import EvaluateConfig, PrepareConfig, ProfilesConfig
from profilerec.data import storage
from profilerec.data.vectors import vectors_to_arrow
from profilerec.model.priors import item_priors, log_priors
from profilerec.model.profile import build_profile, states_to_table
from profilerec.model.ranking import case_ranks, popularity_ranks, ranking_metrics
from profilerec.model.recommend import load_recommender
from profilerec.model.replay import hidden_event_ids, iter_cases, user_sequences


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

    from profilerec.batch.evaluate import run_evaluate

    report = run_evaluate(EvaluateConfig(**folders, output=str(tmp / "report"), workers=2))
    cases = list(iter_cases(sequences, data.cases, ["test"], data.max_history))
    whole = split_recommender(data, sequences, str(tmp / "embeddings"), "test")
    assert report["cases"] == len(cases) > 30
    assert report["methods"]["profilerec"] == ranking_metrics(case_ranks(whole, cases))
    assert report["methods"]["popularity"] == ranking_metrics(popularity_ranks(whole, cases))

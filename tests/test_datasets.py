"""Source adapters -> canonical tables, the shared protocol, prepared folders and the prepare job."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from profilerec.config import PrepareConfig
from profilerec.data.datasets import load_source, prepare, read_prepared, write_prepared
from profilerec.data.datasets.common import sample_user_ids
from profilerec.data.datasets.protocol import leave_last_positive_out, positive_mask
from profilerec.data.schema import EVENTS_SCHEMA
from profilerec.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared" / "data").resolve()
AMAZON = SHARED / "amazon-industrial"
MOVIELENS = SHARED / "movielens-small"
SAMPLE = ROOT / "lib" / "profilerec" / "sample_data" / "amazon-industrial-sample"
needs_amazon = pytest.mark.skipif(not AMAZON.is_dir(), reason=f"real data absent: {AMAZON} not found")
needs_movielens = pytest.mark.skipif(not MOVIELENS.is_dir(), reason=f"real data absent: {MOVIELENS} not found")


def sequences(events: pa.Table) -> dict[str, list[dict]]:
    """Each user's events in table order."""
    out: dict[str, list[dict]] = {}
    for row in events.to_pylist():
        out.setdefault(row["user_id"], []).append(row)
    return out


def assert_sorted(events: pa.Table) -> None:
    frame = events.select(["user_id", "ts"]).to_pandas()
    assert frame.equals(frame.sort_values(["user_id", "ts"], kind="stable"))


# --------------------------------------------------------------------------------------------
# Amazon folder format


def write_amazon(folder: Path, splits: dict[str, list[tuple[str, str, str]]], n_items: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "items.jsonl", "w") as f:
        for i in range(n_items):
            f.write(json.dumps({"item_id": i, "title": f"Item {i}", "description": f"about {i}", "brand": "",
                                "categories": "Tools|Hand Tools" if i == 0 else "", "price": i * 1.5}) + "\n")
        f.write("{not json\n")
    for split, rows in splits.items():
        pd.DataFrame(rows, columns=["user_id", "history", "item_id"]).to_csv(folder / f"{split}.csv", index=False)
    return folder


AMAZON_ROWS = {
    "train": [("A", "1", "2"), ("A", "1 2", "3"), ("B", "4", "5"),
              ("C", "1", "99"),          # unknown target: skipped
              ("", "1", "2")],           # missing user: skipped
    "valid": [("A", "1 2 3", "4"), ("B", "4 5", "6"),
              ("C", "1 x7", "2")],       # unparseable history id: skipped
    "test": [("A", "2 3 4", "5"),        # history != last 3 of [1 2 3 4] -> counted, not skipped
             ("B", "4 5 6", "7"), ("C", "6", "7")],
}


def test_amazon_builds_sequences_cases_and_items(tmp_path):
    data = load_source("amazon", str(write_amazon(tmp_path / "cat", AMAZON_ROWS)), max_history=10)
    seqs = sequences(data.events)
    assert {u: [e["item_id"] for e in s] for u, s in seqs.items()} == {
        "A": ["1", "2", "3", "4", "5"], "B": ["4", "5", "6", "7"], "C": ["6", "7"]}
    a = seqs["A"]
    assert [e["event_id"] for e in a] == [f"A:{i}" for i in range(5)]
    assert {e["type"] for e in data.events.to_pylist()} == {"review"}
    assert a[0]["ts"] == pd.Timestamp("2016-10-01", tz="UTC")
    assert all((y["ts"] - x["ts"]) == pd.Timedelta(days=1) for x, y in zip(a, a[1:]))
    assert data.max_history == 10
    assert data.cases.to_pylist() == [
        {"user_id": "A", "target_event_id": "A:1", "split": "train"},
        {"user_id": "A", "target_event_id": "A:2", "split": "train"},
        {"user_id": "A", "target_event_id": "A:3", "split": "valid"},
        {"user_id": "A", "target_event_id": "A:4", "split": "test"},
        {"user_id": "B", "target_event_id": "B:1", "split": "train"},
        {"user_id": "B", "target_event_id": "B:2", "split": "valid"},
        {"user_id": "B", "target_event_id": "B:3", "split": "test"},
        {"user_id": "C", "target_event_id": "C:1", "split": "test"},
    ]
    assert dict(data.invalid.reasons) == {"missing or unknown target item_id": 1, "missing user_id": 1,
                                          "unknown item_id in history": 1, "item line that is not a JSON object": 1}
    assert any("1 of 11 rows have a history that differs" in n for n in data.notes)
    assert any("synthetic" in n for n in data.notes)
    items = {r["item_id"]: r for r in data.items.to_pylist()}
    assert len(items) == 8 and items["0"]["categories"] == ["Tools", "Hand Tools"] and items["3"]["categories"] == []
    assert items["3"]["brand"] is None and items["3"]["description"] == "about 3"
    assert json.loads(items["3"]["extra"]) == {"price": 4.5}


def test_amazon_history_cap_is_used_for_the_consistency_check(tmp_path):
    rows = {"train": [("A", "1", "2"), ("A", "1 2", "3")], "valid": [("A", "2 3", "4")], "test": [("A", "3 4", "5")]}
    data = load_source("amazon", str(write_amazon(tmp_path / "cat", rows)), max_history=2)
    assert data.max_history == 2
    assert any(n.startswith("amazon: 0 of 4 rows") for n in data.notes)


@pytest.mark.parametrize("missing", ["valid.csv", "test.csv", "items.jsonl"])
def test_amazon_missing_file_is_a_data_error_naming_the_path(tmp_path, missing):
    folder = write_amazon(tmp_path / "cat", AMAZON_ROWS)
    (folder / missing).unlink()
    with pytest.raises(DataError, match=str(folder / missing).replace("\\", "\\\\")):
        load_source("amazon", str(folder))


def test_amazon_without_train_csv_and_missing_folder(tmp_path):
    folder = write_amazon(tmp_path / "cat", {k: v for k, v in AMAZON_ROWS.items() if k != "train"})
    data = load_source("amazon", str(folder))
    assert set(data.split_counts()) == {"valid", "test"} and any("no train.csv" in n for n in data.notes)
    with pytest.raises(DataError, match="nowhere"):
        load_source("amazon", str(tmp_path / "nowhere"))
    (folder / "train.csv").write_text("user,hist,target\nA,1,2\n")
    with pytest.raises(DataError, match="train.csv lacks column"):
        load_source("amazon", str(folder))


def test_bundled_sample_loads_with_only_referenced_items():
    data = load_source("amazon", str(SAMPLE))
    assert data.invalid.total == 0 and set(data.split_counts()) == {"train", "valid", "test"}
    rows = pd.concat([pd.read_csv(SAMPLE / f"{s}.csv", dtype=str) for s in ("train", "valid", "test")])
    referenced = set(rows["item_id"]) | {i for h in rows["history"] for i in h.split()}
    assert set(data.items.column("item_id").to_pylist()) == referenced
    assert data.num_users == rows["user_id"].nunique()
    assert sum(os.path.getsize(SAMPLE / f) for f in os.listdir(SAMPLE)) < 1.1e6


@pytest.fixture(scope="module")
def amazon_real():
    if not AMAZON.is_dir():
        pytest.skip(f"real data absent: {AMAZON} not found")
    return load_source("amazon", str(AMAZON))


@needs_amazon
def test_amazon_real_counts(amazon_real):
    data = amazon_real
    files = {s: pd.read_csv(AMAZON / f"{s}.csv", dtype=str) for s in ("train", "valid", "test")}
    n_items = sum(1 for line in open(AMAZON / "items.jsonl") if line.strip())
    assert data.items.num_rows == n_items == 3686
    assert data.events.num_rows == 22743 and data.num_users == 3285
    assert data.split_counts() == {s: len(f) for s, f in files.items()} == {"train": 10393, "valid": 4532, "test": 4533}
    assert data.invalid.total == 0 and data.max_history == 10
    assert_sorted(data.events)


@needs_amazon
def test_amazon_real_every_test_row_history_is_the_ten_events_before_its_target(amazon_real):
    data = amazon_real
    seqs = sequences(data.events)
    position = {e["event_id"]: i for s in seqs.values() for i, e in enumerate(s)}
    test = pd.read_csv(AMAZON / "test.csv", dtype=str)
    cases = [c for c in data.cases.to_pylist() if c["split"] == "test"]
    by_user: dict[str, list[dict]] = {}
    for c in cases:
        by_user.setdefault(c["user_id"], []).append(c)
    checked = 0
    for user, rows in test.groupby("user_id", sort=False):
        assert len(by_user[user]) == len(rows)
        for case, row in zip(by_user[user], rows.itertuples()):
            seq, at = seqs[user], position[case["target_event_id"]]
            assert seq[at]["item_id"] == row.item_id
            assert [e["item_id"] for e in seq[max(0, at - 10):at]] == row.history.split()
            checked += 1
    assert checked == len(test) == 4533


# --------------------------------------------------------------------------------------------
# MovieLens


def write_movielens(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp,,,,\n"
        "1,10,4.0,1000,,,,\n"
        "1,20,5.0,1200,,,,\n"
        "1,30,2.0,1100,,,,\n"
        "1,40,4.5,1300,,,,\n"
        "1,10,3.0,1300,,,,\n"      # same time as the previous row: file order decides
        "2,20,1.0,500,,,,\n"       # user 2 has no positive
        "3,30,4.0,700,,,,\n"
        ",30,4.0,700,,,,\n"        # missing user
        "3,999,5.0,800,,,,\n"      # unknown movie
        "3,20,5.0,yesterday,,,,\n"  # bad timestamp
        "3,20,five,900,,,,\n"      # rating without a number
    )
    (folder / "tags.csv").write_text(
        "userId,movieId,tag,timestamp\n1,10,funny,1250\n1,10,silly,1250\n2,20,\"slow, long\",600\n2,20,,601\n")
    (folder / "movies.csv").write_text(
        "movieId,title,genres\n10,Ten (1990),Comedy|Drama\n20,\"Twenty, The (1991)\",(no genres listed)\n"
        "30,Thirty (1992),Action\n40,Forty (1993),Drama\n")
    (folder / "links.csv").write_text("movieId,imdbId,tmdbId\n10,0114709,862\n20,0113497,\n")
    return folder


def test_movielens_events_items_and_invalid_rows(tmp_path):
    data = load_source("movielens", str(write_movielens(tmp_path / "ml")))
    seqs = sequences(data.events)
    assert [(e["type"], e["item_id"], e["value"], e["text"]) for e in seqs["1"]] == [
        ("rating", "10", 4.0, None), ("rating", "30", 2.0, None), ("rating", "20", 5.0, None),
        ("tag", "10", None, "funny"), ("tag", "10", None, "silly"),
        ("rating", "40", 4.5, None), ("rating", "10", 3.0, None)]
    assert [e["event_id"] for e in seqs["1"]][3:5] == ["t:1:10:1250:0", "t:1:10:1250:1"]
    assert seqs["1"][0]["ts"] == pd.Timestamp(1000, unit="s", tz="UTC")
    assert [e["text"] for e in seqs["2"] if e["type"] == "tag"] == ["slow, long"]
    assert dict(data.invalid.reasons) == {"missing user_id": 1, "unknown item_id": 1, "tag without text": 1,
                                          "missing or unparseable timestamp": 1, "rating without a numeric value": 1}
    items = {r["item_id"]: r for r in data.items.to_pylist()}
    assert items["20"]["title"] == "Twenty, The (1991)" and items["20"]["categories"] == []
    assert items["10"]["categories"] == ["Comedy", "Drama"] and items["10"]["description"] is None
    assert json.loads(items["10"]["extra"]) == {"imdbId": "0114709", "tmdbId": "862"}
    assert items["30"]["extra"] is None
    assert data.max_history is None
    target = {c["target_event_id"]: c["split"] for c in data.cases.to_pylist()}
    assert target == {"r:1:10:1000": "train", "r:1:20:1200": "valid", "r:1:40:1300": "test", "r:3:30:700": "test"}


def test_movielens_positive_threshold_and_missing_file(tmp_path):
    folder = write_movielens(tmp_path / "ml")
    strict = load_source("movielens", str(folder), positive_min_value=5.0)
    assert [c["target_event_id"] for c in strict.cases.to_pylist()] == ["r:1:20:1200"]
    (folder / "ratings.csv").unlink()
    with pytest.raises(DataError, match=str(folder / "ratings.csv")):
        load_source("movielens", str(folder))


@pytest.fixture(scope="module")
def movielens_real():
    if not MOVIELENS.is_dir():
        pytest.skip(f"real data absent: {MOVIELENS} not found")
    return load_source("movielens", str(MOVIELENS))


@needs_movielens
def test_movielens_real_users_and_last_positive_targets(movielens_real):
    data = movielens_real
    ratings = pd.read_csv(MOVIELENS / "ratings.csv", usecols=["userId", "movieId", "rating", "timestamp"])
    tags = pd.read_csv(MOVIELENS / "tags.csv")
    assert data.num_users == ratings["userId"].nunique() == 671
    assert data.events.num_rows == len(ratings) + len(tags) - data.invalid.total
    assert data.items.num_rows == len(pd.read_csv(MOVIELENS / "movies.csv"))
    positives = ratings[ratings["rating"] >= 4.0].sort_values(["userId", "timestamp"], kind="stable")
    last = positives.groupby("userId").tail(1)
    second = positives.groupby("userId").nth(-2)
    splits = data.split_counts()
    assert splits["test"] == positives["userId"].nunique() == len(last)
    assert splits["valid"] == len(second) and splits["train"] == len(positives) - len(last) - len(second)
    item_of = dict(zip(data.events.column("event_id").to_pylist(), data.events.column("item_id").to_pylist()))
    got = {c["user_id"]: item_of[c["target_event_id"]] for c in data.cases.to_pylist() if c["split"] == "test"}
    assert got == {str(u): str(m) for u, m in zip(last["userId"], last["movieId"])}
    assert_sorted(data.events)


# --------------------------------------------------------------------------------------------
# Generic logs and the shared protocol


def test_leave_last_positive_out():
    events = pa.table({
        "event_id": ["a1", "a2", "a3", "a4", "a5", "b1", "b2", "c1"],
        "user_id": ["a"] * 5 + ["b", "b", "c"],
        "item_id": ["1", "2", None, "3", "4", "1", "2", "1"],
        "type": ["click", "view", "search", "rating", "purchase", "rating", "cart", "view"],
        "ts": pa.array(range(8), pa.int64()).cast(pa.timestamp("ms", tz="UTC")),
        "text": [None, None, "q", None, None, None, None, None],
        "value": [None, None, None, 3.0, None, 4.0, None, None],
        "context": [None] * 8,
    }, schema=EVENTS_SCHEMA)
    mask = positive_mask(events, 4.0)
    assert mask.tolist() == [True, False, False, False, True, True, True, False]
    cases = leave_last_positive_out(events, mask).to_pylist()
    assert [(c["target_event_id"], c["split"]) for c in cases] == [
        ("a1", "valid"), ("a5", "test"), ("b1", "valid"), ("b2", "test")]
    assert positive_mask(events, 3.0, positive_types=()).tolist() == [False, False, False, True, False, True, False, False]


def write_generic(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({
        "visitor": ["u1", "u1", "u1", "u2", "u2", "", "u2", "u3"],
        "sku": ["s1", "s2", "s1", "s2", "s9", "s1", "s1", "s1"],
        "when": ["2021-01-01T10:00:00", "2021-01-01T11:00:00", "2021-01-02", "1609459200", "1609459300",
                 "2021-01-01", "not-a-time", "2021-01-03"],
        "action": ["View", "purchase", "cart", "click", "click", "click", "click", "teleport"],
    }).to_csv(folder / "log.csv", index=False)
    pd.DataFrame({"sku": ["s1", "s2", "s3"], "name": ["One", "Two", "Three"],
                  "cats": ["a|b", "", "c"], "colour": ["red", "", "blue"]}).to_csv(folder / "catalog.csv", index=False)
    return folder


GENERIC_COLUMNS = {"user_id": "visitor", "item_id": "sku", "ts": "when", "type": "action",
                   "items.title": "name", "categories": "cats"}


def test_generic_csv_with_mapping(tmp_path):
    folder = write_generic(tmp_path / "g")
    opts = dict(events_file="log.csv", items_file="catalog.csv", columns=GENERIC_COLUMNS)
    data = load_source("generic", str(folder), **opts)
    seqs = sequences(data.events)
    assert {u: [(e["type"], e["item_id"]) for e in s] for u, s in seqs.items()} == {
        "u1": [("view", "s1"), ("purchase", "s2"), ("cart", "s1")], "u2": [("click", "s2")]}
    assert dict(data.invalid.reasons) == {"missing user_id": 1, "unknown item_id": 1, "unknown event type": 1,
                                          "missing or unparseable timestamp": 1}
    items = {r["item_id"]: r for r in data.items.to_pylist()}
    assert items["s1"]["title"] == "One" and items["s1"]["categories"] == ["a", "b"]
    assert json.loads(items["s1"]["extra"]) == {"colour": "red"} and items["s2"]["extra"] is None
    assert len(items) == 3  # the catalog is the ranking universe: unreferenced s3 stays
    assert [(c["user_id"], c["split"]) for c in data.cases.to_pylist()] == [("u1", "valid"), ("u1", "test"), ("u2", "test")]
    again = load_source("generic", str(folder), **opts)
    assert again.events.column("event_id").to_pylist() == data.events.column("event_id").to_pylist()
    assert all(e.startswith("g:") for e in data.events.column("event_id").to_pylist())


def test_generic_parquet_and_jsonl_defaults(tmp_path):
    folder = tmp_path / "g"
    folder.mkdir()
    pd.DataFrame({"event_id": ["e1", "e2", "e3"], "user_id": [1, 1, 2], "item_id": [10, 11, 10],
                  "ts": pd.to_datetime(["2021-01-02", "2021-01-01", "2021-01-01"], utc=True)}).to_parquet(folder / "ev.parquet")
    with open(folder / "items.jsonl", "w") as f:
        for i, cats in ((10, ["x", "y"]), (11, [])):
            f.write(json.dumps({"item_id": i, "title": f"t{i}", "categories": cats, "rank": i}) + "\n")
    data = load_source("generic", str(folder), events_file="ev.parquet", items_file="items.jsonl")
    assert data.events.column("event_id").to_pylist() == ["e2", "e1", "e3"]  # sorted by user, then time
    assert set(data.events.column("type").to_pylist()) == {"click"}
    assert any("no type column" in n for n in data.notes)
    items = {r["item_id"]: r for r in data.items.to_pylist()}
    assert items["10"]["categories"] == ["x", "y"] and json.loads(items["11"]["extra"]) == {"rank": 11}


def test_generic_errors_name_the_file_or_setting(tmp_path):
    folder = write_generic(tmp_path / "g")
    with pytest.raises(DataError, match=str(folder / "events.csv")):
        load_source("generic", str(folder), items_file="catalog.csv", columns=GENERIC_COLUMNS)
    with pytest.raises(DataError, match="no column 'nope'"):
        load_source("generic", str(folder), events_file="log.csv", items_file="catalog.csv",
                    columns={**GENERIC_COLUMNS, "ts": "nope"})
    with pytest.raises(DataError, match="no user_id column"):
        load_source("generic", str(folder), events_file="log.csv", items_file="catalog.csv",
                    columns={"item_id": "sku", "ts": "when"})
    with pytest.raises(ConfigError, match="colour"):
        load_source("generic", str(folder), columns={"colour": "colour"})
    with pytest.raises(ConfigError, match="known sources"):
        load_source("netflix", str(folder))


def test_sample_users_is_deterministic_and_keeps_all_items(tmp_path):
    folder = write_amazon(tmp_path / "cat", AMAZON_ROWS)
    full = load_source("amazon", str(folder))
    one = load_source("amazon", str(folder), sample_users=2)
    two = load_source("amazon", str(folder), sample_users=2)
    assert one.events.equals(two.events) and one.cases.equals(two.cases)
    kept = sample_user_ids(["A", "B", "C"], 2)
    assert set(one.events.column("user_id").to_pylist()) == set(one.cases.column("user_id").to_pylist()) == kept
    assert one.items.equals(full.items)
    expected = [r for r in full.events.to_pylist() if r["user_id"] in kept]
    assert one.events.to_pylist() == expected
    assert sample_user_ids(["A", "B", "C"], 2) == sample_user_ids(["C", "B", "A", "A"], 2)


# --------------------------------------------------------------------------------------------
# Prepared folders and the job


def test_round_trip_keeps_everything(tmp_path):
    data = load_source("movielens", str(write_movielens(tmp_path / "ml")))
    for uri in (str(tmp_path / "out"), f"file://{tmp_path / 'out2'}"):
        write_prepared(data, uri)
        back = read_prepared(uri)
        assert back.events.equals(data.events) and back.items.equals(data.items) and back.cases.equals(data.cases)
        assert back.events.schema == data.events.schema
        assert (back.max_history, back.notes, back.source, back.input) == (data.max_history, data.notes, "movielens", data.input)
        assert back.invalid.to_dict() == data.invalid.to_dict()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["rows"] == {"events": data.events.num_rows, "items": 4, "cases": 4}
    assert manifest["splits"] == {"train": 1, "valid": 1, "test": 2} and manifest["users"] == 3


def test_writer_sorts_events_and_reader_rejects_missing_folder(tmp_path):
    data = load_source("amazon", str(write_amazon(tmp_path / "cat", AMAZON_ROWS)))
    shuffled = data.events.take(pa.array(np.random.default_rng(0).permutation(data.events.num_rows)))
    write_prepared(type(data)(shuffled, data.items, data.cases, 10), str(tmp_path / "out"))
    assert read_prepared(str(tmp_path / "out")).events.equals(data.events)
    with pytest.raises(DataError, match="jobs/prepare.py"):
        read_prepared(str(tmp_path / "nothing"))


def test_prepare_from_config(tmp_path):
    cfg = PrepareConfig(source="movielens", input=str(write_movielens(tmp_path / "ml")), output=str(tmp_path / "p"),
                        positive_min_value=5.0)
    data = prepare(cfg)
    assert data.cases.num_rows == 1 and read_prepared(cfg.output).cases.equals(data.cases)


def test_prepare_job_reports_user_errors_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "lib"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "prepare.py"), "--source", "amazon",
                           "--input", str(tmp_path / "absent"), "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: setting input: no input folder or file at {tmp_path / 'absent'}"
    assert "Traceback" not in proc.stderr


def test_sampled_catalog_keeps_only_touched_items(tmp_path):
    out = tmp_path / "prepared"
    data = prepare(PrepareConfig(source="amazon", input=str(SAMPLE), output=str(out), sample_users=20,
                                 sample_items=True))
    touched = set(data.events.column("item_id").to_pylist())
    assert set(data.items.column("item_id").to_pylist()) == touched
    assert len(touched) < 1143 and data.num_users == 20
    assert any("catalog cut" in n for n in data.notes)

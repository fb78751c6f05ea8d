"""Item vectors held once per node (shared_rows.py): a second process maps what the first made,
items added while serving go into the room after the rows, and the scorer's item matrix follows
changed items row by row."""

import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import torch
from profilerec.config import ScorerConfig
from profilerec.data import node_files, storage
from profilerec.data.schema import ITEMS_SCHEMA
from profilerec.data.vectors import vectors_to_arrow
from profilerec.model.index import ItemIndex, shared_index
from profilerec.model.priors import empty_priors, grown_priors
from profilerec.model.recommend import Recommender
from profilerec.model.scorer import ProfileScorer
from profilerec.model.shared_rows import set_rows, spare_rows

N, DIM = 50_000, 384


def _catalog(tmp_path, n=N, seed=0):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    items = pa.Table.from_pylist([{"item_id": f"i{i}", "title": f"T{i}", "description": None, "brand": None,
                                   "categories": [], "extra": None} for i in range(n)], schema=ITEMS_SCHEMA)
    ids = items.column("item_id")
    storage.write_table(pa.table({"item_id": ids, "vector": vectors_to_arrow(vectors)}),
                        str(tmp_path / "embeddings" / "items" / "part-0.parquet"))
    storage.write_table(items, str(tmp_path / "items.parquet"))
    return items, vectors


PRIVATE_GROWTH = textwrap.dedent("""
    import sys
    from profilerec.data import storage

    def private_kib():
        with open("/proc/self/smaps_rollup") as f:
            return sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean:", "Private_Dirty:")))

    from profilerec.data.vectors import read_embeddings
    from profilerec.model.index import index_from_tables, shared_index
    items = storage.read_table(sys.argv[1] + "/items.parquet")
    before = private_kib()
    if sys.argv[2] == "shared":
        vectors = shared_index(items, sys.argv[1] + "/embeddings").vectors
    else:
        vectors = index_from_tables(items, read_embeddings(sys.argv[1] + "/embeddings", "items")).vectors
    vectors.sum()  # every page read
    print(private_kib() - before)
""")


def test_a_second_process_maps_the_vectors_the_first_made(tmp_path):
    items, vectors = _catalog(tmp_path)
    first = shared_index(items, str(tmp_path / "embeddings"))  # this process makes the node's file
    np.testing.assert_array_equal(first.vectors, vectors)
    assert not first.vectors.flags.owndata
    size_kib = vectors.nbytes // 1024

    def growth(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", PRIVATE_GROWTH, str(tmp_path), mode], capture_output=True,
                              text=True, check=True)
        return int(done.stdout.split()[-1])

    assert growth("shared") < 0.25 * size_kib  # the pages are the first process's, in the page cache
    assert growth("private") > 0.9 * size_kib  # what every process paid before


def test_items_added_go_into_the_room_after_the_rows(tmp_path):
    items, vectors = _catalog(tmp_path, n=100)
    index = shared_index(items, str(tmp_path / "embeddings"))
    store = index._store
    assert len(store) == 100 + spare_rows(100)
    new = np.eye(DIM, dtype=np.float32)[:2]
    rows = index.upsert(["new-a", "i5"], new, [None, "B"], [[], ["c"]], ["A", "T5 v2"])
    assert rows == [100, 5] and len(index.vectors) == 101
    assert np.shares_memory(index.vectors, store)  # no copy of the matrix
    np.testing.assert_array_equal(index.vectors[[100, 5]], new)
    np.testing.assert_array_equal(index.vectors[:5], vectors[:5])
    # the file itself is not written: a process loading it now sees the vectors of the encode job
    np.testing.assert_array_equal(shared_index(items, str(tmp_path / "embeddings")).vectors[5], vectors[5])


def test_set_rows_grows_a_private_copy_when_out_of_room():
    store = np.zeros((3, 2), dtype=np.float32)
    store, used = set_rows(store, 2, [2], np.ones((1, 2), np.float32))
    assert used == 3 and len(store) == 3
    grown, used = set_rows(store, 3, [3, 0], np.full((2, 2), 7, np.float32))
    assert used == 4 and len(grown) == 4 + spare_rows(4) and not np.shares_memory(grown, store)
    np.testing.assert_array_equal(grown[:4], [[7, 7], [0, 0], [1, 1], [7, 7]])


def test_the_scorers_item_matrix_follows_changed_items_row_by_row():
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(50, 16)).astype(np.float32)
    index = ItemIndex([f"i{i}" for i in range(50)], vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    scorer = ProfileScorer(index.vectors, empty_priors(50), 10, ScorerConfig(id_embeddings=True)).eval()
    with torch.no_grad():
        for weight in scorer.parameters():
            weight.normal_(std=0.3)
    before = scorer.item_rows().copy()
    rows = index.upsert(["i3", "new"], rng.normal(size=(2, 16)).astype(np.float32), [None] * 2, [[]] * 2, [None] * 2)
    scorer.set_items(index.vectors, grown_priors(empty_priors(50), 51), rows)
    with torch.no_grad():
        expected = scorer.item_matrix().numpy()
    np.testing.assert_allclose(scorer.item_rows(), expected, rtol=1e-5, atol=1e-6)
    unchanged = [r for r in range(50) if r != 3]
    np.testing.assert_array_equal(scorer.item_rows()[unchanged], before[unchanged])


def test_items_changed_before_the_scorers_rows_are_first_used_are_scored_by_their_new_vectors(tmp_path):
    # a serving process applies the items learned while serving before it first scores (so that an
    # index holding them can be opened): its rows must not be the node's file of the catalog's rows
    items, _ = _catalog(tmp_path, n=2000)

    def loaded() -> Recommender:
        index = shared_index(items, str(tmp_path / "embeddings"))
        torch.manual_seed(0)
        scorer = ProfileScorer(index.vectors, empty_priors(len(index)), 10, ScorerConfig()).eval()
        with torch.no_grad():
            for weight in scorer.parameters():
                weight.normal_(std=0.3)
        scorer.shared_key = index.shared_key
        return Recommender(index, scorer=scorer)

    first = loaded()
    catalog_rows = first.item_matrix().copy()  # the node's file of the catalog's rows, made here
    second = loaded()
    changed = pa.Table.from_pylist([{"item_id": i, "title": i, "description": None, "brand": None, "categories": [],
                                     "extra": None} for i in ("i3", "brand-new")], schema=ITEMS_SCHEMA)
    vectors = np.random.default_rng(5).normal(size=(2, DIM)).astype(np.float32)
    second.upsert_items(changed, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    with torch.no_grad():
        expected = second.scorer.item_matrix().numpy()
    np.testing.assert_allclose(second.item_matrix(), expected, rtol=1e-5, atol=1e-6)
    assert len(second.item_matrix()) == 2001
    np.testing.assert_array_equal(first.item_matrix(), catalog_rows)  # the other process's rows are unchanged


def _mapped_file(address: int) -> str:
    """The file mapped at `address` in this process ("" for anonymous memory)."""
    with open("/proc/self/maps") as f:
        for line in f:
            span, *rest = line.split()
            start, end = (int(x, 16) for x in span.split("-"))
            if start <= address < end:
                return rest[4] if len(rest) > 4 else ""
    return ""


def test_the_item_metadata_is_mapped_from_the_nodes_file_not_copied(tmp_path):
    items, _ = _catalog(tmp_path, n=2_000)
    items = items.set_column(items.schema.get_field_index("title"), "title",
                             pa.array([f"A long title of item {i} " * 8 for i in range(2_000)]))
    shared_index(items, str(tmp_path / "embeddings"))  # makes the node's file
    index = shared_index(items, str(tmp_path / "embeddings"))
    titles = index.details.base["title"].chunk(0).buffers()[-1]  # the characters
    assert _mapped_file(titles.address).startswith(node_files.node_private_dir())
    assert index.meta("i7")["title"] == "A long title of item 7 " * 8

"""Item index: top-K with exclusions and filters, upserts."""

import numpy as np
import pyarrow as pa
import pytest
from profilerec.data import storage
from profilerec.data.schema import ITEMS_SCHEMA
from profilerec.data.vectors import vectors_to_arrow
from profilerec.errors import DataError
from profilerec.model.index import ItemIndex, fill_catalog_vectors, index_from_tables


def make_index():
    vectors = np.eye(4, dtype=np.float32)
    return ItemIndex(["a", "b", "c", "d"], vectors, ["Acme", "acme", "Other", None],
                     [["tools"], ["tools", "paint"], ["paint"], []], ["A", "B", "C", "D"])


def test_top_k_orders_best_first_and_skips_excluded_rows():
    index = make_index()
    rows, scores = index.top_k(np.array([0.1, 0.9, 0.5, 0.7]), 3, exclude_rows=[1])
    assert [index.item_ids[r] for r in rows] == ["d", "c", "a"]
    assert scores.tolist() == sorted(scores.tolist(), reverse=True)


def test_filters_are_case_insensitive_and_combine():
    index = make_index()
    assert index.allowed() is None
    assert index.allowed(brand="ACME").tolist() == [True, True, False, False]
    assert index.allowed(brand="acme", category="paint").tolist() == [False, True, False, False]
    rows, _ = index.top_k(np.array([0.1, 0.9, 0.5, 0.7]), 10, allowed=index.allowed(category="paint"))
    assert [index.item_ids[r] for r in rows] == ["b", "c"]


def test_upsert_adds_new_rows_and_replaces_changed_items_in_place():
    index = make_index()
    rows = index.upsert(["b", "e"], np.array([[0, 0, 0, 1], [1, 1, 0, 0]], np.float32),
                        ["New", None], [["x"], []], ["B2", "E"])
    assert rows == [1, 4]
    assert index.row("e") == 4 and len(index) == 5
    assert index.meta("b") == {"brand": "New", "categories": ["x"], "title": "B2"}
    np.testing.assert_array_equal(index.vector("b"), [0, 0, 0, 1])
    assert index.vector("zzz") is None and index.row("zzz") == -1


def test_index_from_tables_orders_vectors_by_the_catalog_and_names_items_without_one():
    items = pa.Table.from_pylist([{"item_id": i, "title": i.upper(), "description": None, "brand": None,
                                   "categories": [], "extra": None} for i in ("c", "a", "b")], schema=ITEMS_SCHEMA)
    vectors = np.arange(12, dtype=np.float32).reshape(4, 3)
    embeddings = pa.table({"item_id": ["a", "b", "c", "z"], "vector": vectors_to_arrow(vectors)})
    index = index_from_tables(items, embeddings)
    assert index.item_ids == ["c", "a", "b"] and [index.title(r) for r in range(3)] == ["C", "A", "B"]
    np.testing.assert_array_equal(index.vectors, vectors[[2, 0, 1]])
    with pytest.raises(DataError, match=r"1 items have no embedding \(e.g. \['c'\]\)"):
        index_from_tables(items, embeddings.slice(0, 2))


def test_catalog_vectors_are_read_a_row_group_at_a_time_into_the_catalogs_order(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "ROW_GROUP_ROWS", 3)
    ids = [f"i{n}" for n in range(10)]
    vectors = np.random.default_rng(0).normal(size=(12, 4)).astype(np.float32)
    order = np.random.default_rng(1).permutation(12)  # the embeddings in another order, two of them unknown
    keys = ids + ["x", "y"]
    path = str(tmp_path / "items.parquet")
    storage.write_table(pa.table({"item_id": [keys[i] for i in order], "vector": vectors_to_arrow(vectors[order])}), path)
    chunks = list(storage.iter_tables(path, 3, ["item_id", "vector"]))
    assert [c.num_rows for c in chunks] == [3, 3, 3, 3]
    out = np.zeros((10, 4), dtype=np.float32)
    fill_catalog_vectors(pa.chunked_array([ids[:4], ids[4:]]), iter(chunks), out)
    np.testing.assert_array_equal(out, vectors[:10])
    with pytest.raises(DataError, match=r"1 items have no embedding \(e.g. \['new'\]\)"):
        fill_catalog_vectors(pa.chunked_array([ids + ["new"]]), iter(chunks), np.zeros((11, 4), dtype=np.float32))
    with pytest.raises(DataError, match=r"item ids appear twice in the catalog \(e.g. \['i3'\]\)"):
        fill_catalog_vectors(pa.chunked_array([ids + ["i3"]]), iter(chunks), np.zeros((11, 4), dtype=np.float32))


def test_filters_follow_upserts_without_rebuilding_from_the_base_columns():
    rng = np.random.default_rng(0)
    n = 300
    brands = [rng.choice(["Acme", "ACME", "Bolt", None]) for _ in range(n)]
    categories = [list(rng.choice(["tools", "Paint", "garden"], size=rng.integers(0, 3), replace=False))
                  for _ in range(n)]
    index = ItemIndex([f"i{i}" for i in range(n)], np.eye(n, 8, dtype=np.float32), brands, categories,
                      [f"T{i}" for i in range(n)])
    index.allowed_rows(brand="acme")  # the lookups are made from the base columns here
    index.upsert(["i3", "i4", "new"], np.zeros((3, 8), np.float32), ["Bolt", "acme", "Acme"],
                 [["paint"], [], ["garden", "tools"]], ["T3", "T4", "New"])

    def expected(brand=None, category=None):
        # every row's values as the index reports them, filtered in Python
        metas = [index.meta(item_id) for item_id in index.item_ids]
        return [row for row, m in enumerate(metas)
                if (brand is None or (m["brand"] or "").casefold() == brand.casefold())
                and (category is None or category.casefold() in [c.casefold() for c in m["categories"]])]

    for brand, category in [("ACME", None), ("bolt", None), (None, "PAINT"), (None, "garden"), ("acme", "tools"),
                            ("nobody", None)]:
        assert index.allowed_rows(brand, category).tolist() == expected(brand, category), (brand, category)
    assert index.meta("i3") == {"brand": "Bolt", "categories": ["paint"], "title": "T3"}
    assert index.title(index.row("new")) == "New"

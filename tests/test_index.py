"""Item index: top-K with exclusions and filters, upserts."""

import numpy as np
from profilerec.model.index import ItemIndex


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

"""Canonical schema: validation of single events (the service) and of whole tables (the adapters)."""

import math

import numpy as np
import pandas as pd
import pytest
from profilerec.data.schema import (
    EVENTS_SCHEMA,
    ITEMS_SCHEMA,
    InvalidRows,
    check_event_time,
    clean_events,
    clean_items,
    item_text,
    validate_event,
)
from profilerec.errors import ValidationError

GOOD = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "type": "click", "ts": 1_600_000_000}


def test_validate_event_accepts_a_good_event_and_normalises_it():
    event = validate_event({**GOOD, "user_id": 42, "ts": "2020-09-13T12:26:40Z", "context": {"device": "app"},
                            "text": "  hello "}, known_items={"i1"})
    assert event.user_id == "42" and event.text == "hello" and event.context == '{"device": "app"}'
    assert event.ts == pd.Timestamp("2020-09-13T12:26:40Z").timestamp()
    assert validate_event({**GOOD, "ts": np.int64(5)}).ts == 5.0


@pytest.mark.parametrize("field,value", [
    ("event_id", None), ("event_id", ""), ("event_id", "x" * 300), ("event_id", True),
    ("user_id", None), ("user_id", "   "), ("user_id", 1.5),
    ("type", "like"), ("type", None),
    ("item_id", ""), ("item_id", ["i1"]),
    ("text", 5), ("text", "x" * 10_001),
    ("value", "high"), ("value", math.inf), ("value", True),
    ("ts", None), ("ts", "yesterday"), ("ts", ""), ("ts", "nan"), ("ts", 1e15), ("ts", -1), ("ts", "6000-01-01"),
    ("ts", [1]),
    ("context", "device=app"), ("context", {"a": object()}), ("context", {1: "x"}),
])
def test_each_bad_field_is_named_in_the_validation_error(field, value):
    with pytest.raises(ValidationError) as err:
        validate_event({**GOOD, field: value})
    assert err.value.field == field and str(err.value).startswith(f"{field}:")


def test_event_rules_that_span_fields():
    with pytest.raises(ValidationError) as err:
        validate_event({**GOOD, "type": "rating"})
    assert err.value.field == "value"
    with pytest.raises(ValidationError) as err:
        validate_event({**GOOD, "item_id": None})
    assert err.value.field == "item_id"
    with pytest.raises(ValidationError) as err:
        validate_event({**GOOD, "item_id": "nope"}, known_items={"i1"})
    assert err.value.field == "item_id" and "unknown item" in err.value.problem
    assert validate_event({**GOOD, "type": "search", "item_id": None, "text": "red shoes"}).text == "red shoes"


def _frame(rows):
    return pd.DataFrame(rows, columns=["event_id", "user_id", "item_id", "type", "ts", "text", "value"])


def test_clean_events_counts_bad_rows_by_reason_and_keeps_good_ones():
    rows = [
        ("ok1", "u1", "i1", "click", 1_600_000_000, None, None),
        ("ok2", "u1", "i2", "rating", "2020-09-14", None, "4.5"),
        ("ok3", "u2", None, "search", 1_600_000_100, " red shoes ", None),
        (None, "u1", "i1", "click", 1_600_000_000, None, None),           # missing event_id
        ("b2", "", "i1", "click", 1_600_000_000, None, None),             # missing user_id
        ("b3", "u1", "i1", "like", 1_600_000_000, None, None),            # unknown type
        ("b4", "u1", "i1", "click", "not a time", None, None),            # bad timestamp
        ("b5", "u1", "i1", "click", 1_600_000_000_000, None, None),       # milliseconds, not seconds
        ("b6", "u1", "zzz", "click", 1_600_000_000, None, None),          # unknown item
        ("b7", "u1", None, "click", 1_600_000_000, "  ", None),           # neither item nor text
        ("b8", "u1", "i1", "rating", 1_600_000_000, None, "great"),       # rating without a number
        ("b9", "u1", "i1", "click", 1_600_000_000, None, "inf"),          # non-finite value
        ("ok1", "u3", "i1", "click", 1_600_000_000, None, None),          # duplicate event id
    ]
    report = InvalidRows()
    table = clean_events(_frame(rows), {"i1", "i2"}, report)
    assert table.schema == EVENTS_SCHEMA
    assert table.column("event_id").to_pylist() == ["ok1", "ok2", "ok3"]
    assert table.column("value").to_pylist() == [None, 4.5, None]
    assert table.column("text").to_pylist() == [None, None, "red shoes"]
    assert table.column("ts").to_pylist()[1] == pd.Timestamp("2020-09-14", tz="UTC")
    assert dict(report.reasons) == {
        "missing event_id": 1, "missing user_id": 1, "unknown event type": 1,
        "missing or unparseable timestamp": 2, "unknown item_id": 1, "event with neither item_id nor text": 1,
        "rating without a numeric value": 1, "value is not a finite number": 1,
        "duplicate event_id (the first row wins)": 1,
    }
    assert report.total == len(rows) - 3
    assert "not a time" in report.examples["missing or unparseable timestamp"][0]  # raw value shown
    assert "zzz" in report.examples["unknown item_id"][0]


def test_clean_events_examples_are_capped_and_ids_normalised():
    rows = [(f"e{i}", None, "i1", "click", 1_600_000_000, None, None) for i in range(10)]
    rows.append(("e10", 7.0, 3.0, "click", 1_600_000_000, None, None))  # floats from a CSV with gaps
    report = InvalidRows()
    table = clean_events(_frame(rows), None, report)
    assert report.reasons["missing user_id"] == 10 and len(report.examples["missing user_id"]) == 3
    assert table.to_pylist()[0]["user_id"] == "7" and table.to_pylist()[0]["item_id"] == "3"
    nullable = pd.DataFrame({"event_id": ["a", "b"], "user_id": pd.array([1, None], dtype="Int64"),
                             "item_id": ["i", "i"], "type": ["view", "view"], "ts": [1, 2]})
    assert clean_events(nullable, None, InvalidRows()).column("user_id").to_pylist() == ["1"]


def test_clean_items_skips_missing_and_repeated_ids_and_normalises_fields():
    frame = pd.DataFrame({
        "item_id": [1, None, 2, 2, "3"],
        "title": [" A ", "x", "old", "B", ""],
        "categories": ["x|y", None, "a", ["c", " d "], None],
        "extra": [{"k": 1}, None, None, None, None],
    })
    report = InvalidRows()
    table = clean_items(frame, report)
    assert table.schema == ITEMS_SCHEMA
    rows = table.to_pylist()
    assert [r["item_id"] for r in rows] == ["1", "2", "3"]
    assert [r["title"] for r in rows] == ["A", "B", None]  # last duplicate wins; blank -> None
    assert [r["categories"] for r in rows] == [["x", "y"], ["c", "d"], []]
    assert rows[0]["extra"] == '{"k": 1}'
    assert dict(report.reasons) == {"missing item_id": 1, "duplicate item_id (the last row wins)": 1}


def test_invalid_rows_merge_and_summary():
    a, b = InvalidRows(), InvalidRows()
    a.add("bad ts", 2, ["r1", "r2"])
    b.add("bad ts", 1, ["r3", "r4"])
    b.add("no id", 1, ["r5"])
    a.merge(b)
    assert a.total == 4 and dict(a.reasons) == {"bad ts": 3, "no id": 1}
    assert a.examples["bad ts"] == ["r1", "r2", "r3"]
    assert "4 invalid rows" in a.summary() and InvalidRows().summary() == "no invalid rows"


def test_event_times_too_far_ahead_or_too_old_are_refused_by_the_stated_rule():
    now = 1_800_000_000.0
    check_event_time(now + 300, now, max_ahead_s=300, max_age_s=None)
    check_event_time(0.0, now, max_ahead_s=300, max_age_s=None)  # no age limit unless set
    with pytest.raises(ValidationError, match="^ts: .* 301 s after the service's clock"):
        check_event_time(now + 301, now, max_ahead_s=300, max_age_s=None)
    with pytest.raises(ValidationError, match="^ts: .* 86401 s before the service's clock"):
        check_event_time(now - 86401, now, max_ahead_s=300, max_age_s=86400)
    check_event_time(now - 86400, now, max_ahead_s=300, max_age_s=86400)


def test_item_text_gives_the_title_twice_then_brand_categories_description_and_is_cut():
    assert item_text("Hex bolt M8", "Acme", ["Tools", "", "Bolts"], "Zinc plated.") == \
        "Hex bolt M8. Hex bolt M8. Acme. Tools, Bolts. Zinc plated."
    assert item_text(None, "Acme", None, "Zinc plated.") == "Acme. Zinc plated."
    assert item_text("Hex bolt", None, None, "x" * 2000, max_chars=50) == ("Hex bolt. Hex bolt. " + "x" * 2000)[:50]

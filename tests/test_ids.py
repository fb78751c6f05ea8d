"""User, item and event ids: one normalisation everywhere (validate_event, the adapters' tables;
test_service.py sends such ids through every route of the service over HTTP)."""

import unicodedata

import pandas as pd
import pytest
from profilerec.data import schema
from profilerec.data.schema import InvalidRows, clean_events, clean_items, validate_event
from profilerec.errors import ValidationError

NFC = "café"
NFD = "cafe\u0301"


def test_the_two_unicode_forms_are_different_strings():
    assert NFC != NFD and unicodedata.normalize("NFC", NFD) == NFC


# --- the one normalisation -------------------------------------------------------------------


@pytest.mark.parametrize("raw", [NFC, NFD, f" {NFC} ", f"\t{NFD}\n", f"\u3000{NFD}"])
def test_normalize_id_gives_one_spelling_of_an_id(raw):
    assert schema.normalize_id(raw, "user_id") == NFC


def test_normalize_id_keeps_what_makes_ids_differ():
    assert schema.normalize_id(42, "user_id") == "42"
    assert schema.normalize_id("a b", "user_id") == "a b" and schema.normalize_id("A", "user_id") == "A"
    assert schema.normalize_id("team/alice", "user_id") == "team/alice"


@pytest.mark.parametrize("raw", ["", "   ", "\t\n", "\u3000", None, True, 1.5, ["a"], "x" * 257])
def test_normalize_id_refuses_what_is_no_id_naming_the_field(raw):
    with pytest.raises(ValidationError) as error:
        schema.normalize_id(raw, "item_id")
    assert error.value.field == "item_id" and str(error.value).startswith("item_id:")


def test_validate_event_normalises_every_id_before_checking_the_item():
    event = validate_event({"event_id": f" e-{NFD} ", "user_id": f" {NFD}", "item_id": f"{NFD} ", "type": "click",
                            "ts": 1_600_000_000}, known_items={NFC})
    assert (event.event_id, event.user_id, event.item_id) == (f"e-{NFC}", NFC, NFC)


def test_the_adapters_normalise_ids_as_the_service_does():
    report = InvalidRows()
    items = clean_items(pd.DataFrame({"item_id": [NFD, " plain "], "title": ["t1", "t2"]}), report)
    assert items.column("item_id").to_pylist() == [NFC, "plain"]
    events = clean_events(pd.DataFrame({"event_id": [f"e-{NFD}", "e2"], "user_id": [f" {NFD} ", NFC],
                                        "item_id": [NFD, f" {NFC}"], "type": ["click", "view"],
                                        "ts": [1_600_000_000, 1_600_000_001]}), {NFC}, report)
    assert report.total == 0, report.summary()
    assert events.column("user_id").to_pylist() == [NFC, NFC]
    assert events.column("item_id").to_pylist() == [NFC, NFC]
    assert events.column("event_id").to_pylist() == [f"e-{NFC}", "e2"]
    # the two spellings of one event id are one event
    dup = clean_events(pd.DataFrame({"event_id": [f"e-{NFD}", f"e-{NFC}"], "user_id": ["u", "u"],
                                     "item_id": [NFC, NFC], "type": ["click", "click"], "ts": [1, 2]}), None, report)
    assert dup.num_rows == 1

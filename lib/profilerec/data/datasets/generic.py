"""Any event log + item catalog in CSV/TSV, Parquet or JSON lines, with a column mapping.

`columns` maps canonical names to source column names. A plain name ("user_id": "visitorid")
applies to whichever table has that canonical column; "item_id" applies to both, and
"events.<name>" / "items.<name>" target one table ("items.item_id": "asin"). Unmapped columns
keep their names when they already match the canonical ones. Item columns that are not
canonical are kept in `extra` as JSON.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Optional

import numpy as np
import pandas as pd
from profilerec.data import storage
from profilerec.data.datasets.common import PreparedData, finish, read_frame, sort_events
from profilerec.data.datasets.protocol import leave_last_positive_out, positive_mask
from profilerec.data.schema import EVENTS_SCHEMA, ITEMS_SCHEMA, InvalidRows, clean_events, clean_items
from profilerec.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DEFAULT_TYPE = "click"
REQUIRED_EVENT_COLUMNS = ("user_id", "ts")


def load(path: str, events_file: str = "events.csv", items_file: str = "items.csv",
         columns: Optional[dict[str, str]] = None, sample_users: Optional[int] = None,
         positive_min_value: float = 4.0) -> PreparedData:
    """Read a generic event log and catalog (file names relative to folder `path`, or full paths/URIs)."""
    event_map, item_map = split_mapping(columns or {})
    events_loc, items_loc = _location(path, events_file), _location(path, items_file)
    report = InvalidRows()
    raw_items = read_frame(items_loc)
    items = clean_items(_item_columns(raw_items, item_map, items_loc), report)
    raw_events = read_frame(events_loc)
    frame, notes = _event_columns(raw_events, event_map, events_loc)
    events = sort_events(clean_events(frame, set(items.column("item_id").to_pylist()), report))
    cases = leave_last_positive_out(events, positive_mask(events, positive_min_value))
    notes.append(f"generic: cases hold out each user's last positive event (purchase/review/cart/click, "
                 f"or a rating >= {positive_min_value}) as test and the one before as valid")
    log.info("generic: read %d event rows from %s and %d item rows from %s", len(raw_events), events_loc,
             len(raw_items), items_loc)
    return finish(events, items, cases, max_history=None, invalid=report, notes=notes,
                  source="generic", input=path, sample_users=sample_users)


def split_mapping(columns: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """The mapping for the events table and for the items table; unknown names are a ConfigError."""
    events: dict[str, str] = {}
    items: dict[str, str] = {}
    for key, source in columns.items():
        table, _, name = key.rpartition(".")
        if table not in ("", "events", "items"):
            raise ConfigError(f"columns: {key!r} must be <name>, events.<name> or items.<name>")
        hits = [target for tname, target, schema in (("events", events, EVENTS_SCHEMA), ("items", items, ITEMS_SCHEMA))
                if table in ("", tname) and name in schema.names]
        if not hits:
            raise ConfigError(f"columns: {key!r} is not a canonical column; events: {', '.join(EVENTS_SCHEMA.names)}; "
                              f"items: {', '.join(ITEMS_SCHEMA.names)}")
        for target in hits:
            target[name] = str(source)
    return events, items


def _location(path: str, name: str) -> str:
    if storage.is_uri(name) or name.startswith("/"):
        return name
    return storage.join(path, name)


def _rename(raw: pd.DataFrame, mapping: dict[str, str], names: list[str], location: str) -> pd.DataFrame:
    absent = [src for src in mapping.values() if src not in raw.columns]
    if absent:
        raise DataError(f"{location} has no column {absent[0]!r} (mapped in `columns`); "
                        f"its columns: {', '.join(map(str, raw.columns))}")
    out = pd.DataFrame(index=raw.index)
    for name in names:
        source = mapping.get(name, name)
        if source in raw.columns:
            out[name] = raw[source]
    return out


def _event_columns(raw: pd.DataFrame, mapping: dict[str, str], location: str) -> tuple[pd.DataFrame, list[str]]:
    frame = _rename(raw, mapping, list(EVENTS_SCHEMA.names), location)
    missing = [c for c in REQUIRED_EVENT_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{location} has no {missing[0]} column; map one with columns.{missing[0]}=<name> "
                        f"(its columns: {', '.join(map(str, raw.columns))})")
    notes = []
    if "type" not in frame.columns:
        frame["type"] = DEFAULT_TYPE
        notes.append(f"generic: {location} has no type column; every event is a {DEFAULT_TYPE!r}")
    else:
        frame["type"] = frame["type"].map(lambda t: t.strip().lower() if isinstance(t, str) else t)
    if "event_id" not in frame.columns:
        frame["event_id"] = _generated_ids(frame)
        notes.append("generic: event ids generated from user, item, time and row number")
    return frame, notes


def _generated_ids(frame: pd.DataFrame) -> pd.Series:
    """Stable ids: a hash of (user, item, ts, row number), the same on every run over the same file."""
    items = frame["item_id"] if "item_id" in frame.columns else pd.Series("", index=frame.index)
    keys = zip(frame["user_id"].astype(str), items.astype(str), frame["ts"].astype(str), range(len(frame)))
    ids = ["g:" + hashlib.blake2b("\x1f".join(map(str, k)).encode("utf-8"), digest_size=8).hexdigest() for k in keys]
    return pd.Series(ids, index=frame.index, dtype=object)


def _item_columns(raw: pd.DataFrame, mapping: dict[str, str], location: str) -> pd.DataFrame:
    if mapping.get("item_id", "item_id") not in raw.columns:
        raise DataError(f"{location} has no item id column; map one with columns.item_id=<name> "
                        f"(its columns: {', '.join(map(str, raw.columns))})")
    frame = _rename(raw, mapping, list(ITEMS_SCHEMA.names), location)
    if "extra" not in frame.columns:
        used = set(mapping.values()) | set(ITEMS_SCHEMA.names)
        rest = [c for c in raw.columns if c not in used]
        if rest:
            frame["extra"] = [
                {k: _plain(v) for k, v in zip(rest, values) if not _blank(v)} or None
                for values in raw[rest].itertuples(index=False, name=None)
            ]
    return frame


def _plain(v: object) -> object:
    # numpy scalars/arrays from Parquet -> JSON-ready Python values
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v.item() if isinstance(v, np.generic) else v


def _blank(v: object) -> bool:
    if isinstance(v, (list, dict, np.ndarray)):
        return len(v) == 0
    return v is None or (isinstance(v, float) and v != v) or (isinstance(v, str) and not v.strip())

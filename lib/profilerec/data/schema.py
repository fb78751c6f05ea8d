"""Canonical tables (pyarrow schemas) and the validation of incoming events and items.

Every adapter writes these tables, every job reads them, and the service checks what it accepts
against the same rules, so a row is valid in one place exactly when it is valid everywhere.
"""

from __future__ import annotations

import json
import math
import numbers
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
from profilerec.errors import ValidationError

# Behaviour types the profile understands. "rating" carries a value; "search" and "tag" carry text
# (with or without an item); "review" is a purchase with the user's own words.
EVENT_TYPES = ("view", "click", "cart", "purchase", "review", "rating", "search", "tag")
SPLITS = ("train", "valid", "test")

EVENTS_SCHEMA = pa.schema(
    [
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string()),
        pa.field("type", pa.string(), nullable=False),
        pa.field("ts", pa.timestamp("ms", tz="UTC"), nullable=False),
        pa.field("text", pa.string()),
        pa.field("value", pa.float64()),
        pa.field("context", pa.string()),  # a JSON object (location, device, ...), or null
    ]
)

ITEMS_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("description", pa.string()),
        pa.field("brand", pa.string()),
        pa.field("categories", pa.list_(pa.string())),
        pa.field("extra", pa.string()),  # a JSON object of any further attributes, or null
    ]
)

# One evaluation/training case: predict the item of `target_event_id` from the user's earlier
# events. `split` says which protocol split the case belongs to.
CASES_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("target_event_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
    ]
)

MAX_TEXT_CHARS = 10_000
MAX_ID_CHARS = 256
# Numeric times are seconds since the epoch; larger numbers are almost surely milliseconds, which
# would land thousands of years ahead, so both the service and the adapters reject them.
MAX_EPOCH_SECONDS = 1e11


@dataclass(frozen=True)
class Event:
    """One behaviour event as the profile sees it (`ts` in seconds since the epoch)."""

    event_id: str
    user_id: str
    type: str
    ts: float
    item_id: Optional[str] = None
    text: Optional[str] = None
    value: Optional[float] = None
    context: Optional[str] = None


@dataclass
class InvalidRows:
    """What was skipped while reading a source: counts per reason and a few example rows."""

    total: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 3

    def add(self, reason: str, count: int, examples: Iterable[Any] = ()) -> None:
        """Count `count` skipped rows under `reason`, keeping the first few examples."""
        if count <= 0:
            return
        self.total += count
        self.reasons[reason] += count
        kept = self.examples.setdefault(reason, [])
        for example in examples:
            if len(kept) >= self.max_examples:
                break
            kept.append(str(example)[:200])

    def merge(self, other: "InvalidRows") -> None:
        """Add the counts and examples of `other` to this report."""
        for reason, n in other.reasons.items():
            self.add(reason, n, other.examples.get(reason, []))

    def summary(self) -> str:
        """A few lines for the log: how many rows were skipped, why, and examples."""
        if not self.total:
            return "no invalid rows"
        lines = [f"{self.total} invalid rows skipped:"]
        for reason, n in self.reasons.most_common():
            lines.append(f"  {n} x {reason}; e.g. {'; '.join(self.examples.get(reason, []))}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "reasons": dict(self.reasons), "examples": self.examples}


# --------------------------------------------------------------------------------------------
# Single records (the service)


def validate_event(raw: dict[str, Any], known_items: Optional[Any] = None) -> Event:
    """Check one incoming event mapping and return it as an Event, or raise ValidationError.

    `ts` may be seconds since the epoch (int/float) or an ISO-8601 string; it is required here
    (the service fills it with the arrival time before calling when a client omits it).
    `known_items`, when given, is anything supporting `in`; an item id outside it is rejected.
    """
    event_id = normalize_id(raw.get("event_id"), "event_id")
    user_id = normalize_id(raw.get("user_id"), "user_id")
    etype = raw.get("type")
    if etype not in EVENT_TYPES:
        raise ValidationError("type", f"must be one of {', '.join(EVENT_TYPES)}; got {etype!r}")
    item_id = raw.get("item_id")
    if item_id is not None:
        item_id = normalize_id(item_id, "item_id")
        if known_items is not None and item_id not in known_items:
            raise ValidationError("item_id", f"unknown item {item_id!r}: add it with PUT /v1/items first")
    text = raw.get("text")
    if text is not None:
        if not isinstance(text, str):
            raise ValidationError("text", "must be a string")
        if len(text) > MAX_TEXT_CHARS:
            raise ValidationError("text", f"is {len(text)} characters long; at most {MAX_TEXT_CHARS}")
        text = text.strip() or None
    if item_id is None and text is None:
        raise ValidationError("item_id", "an event needs an item_id, a text, or both")
    value = raw.get("value")
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValidationError("value", f"must be a finite number; got {value!r}")
        value = float(value)
    if etype == "rating" and value is None:
        raise ValidationError("value", "a rating event needs a numeric value")
    ts = parse_timestamp(raw.get("ts"), "ts")
    context = raw.get("context")
    if context is not None:
        if not isinstance(context, dict) or not all(isinstance(k, str) for k in context):
            raise ValidationError("context", "must be an object of string keys")
        try:
            context = json.dumps(context, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValidationError("context", f"must hold only JSON values: {e}") from None
    return Event(event_id, user_id, etype, ts, item_id, text, value, context)


def parse_timestamp(value: Any, name: str) -> float:
    """Seconds since the epoch from a number or an ISO-8601 string; ValidationError otherwise."""
    if isinstance(value, bool) or value is None:
        raise ValidationError(name, "is required: seconds since the epoch or an ISO-8601 time")
    if isinstance(value, numbers.Real):  # also numpy integers and floats
        value = float(value)
        if not math.isfinite(value) or not (0 <= value < MAX_EPOCH_SECONDS):
            raise ValidationError(name, f"{value!r} is not a plausible time in seconds since the epoch")
        return value
    if isinstance(value, str):
        try:
            stamp = pd.Timestamp(value)
        except (ValueError, TypeError, OverflowError):
            raise ValidationError(name, f"{value!r} is not an ISO-8601 time") from None
        if pd.isna(stamp):  # "", "nan", "NaT" parse to NaT instead of raising
            raise ValidationError(name, f"{value!r} is not an ISO-8601 time")
        if stamp.tzinfo is None:
            stamp = stamp.tz_localize("UTC")
        seconds = stamp.timestamp()
        if not (0 <= seconds < MAX_EPOCH_SECONDS):
            raise ValidationError(name, f"{value!r} is not a plausible time")
        return seconds
    raise ValidationError(name, f"must be a number or an ISO-8601 string; got {type(value).__name__}")


def check_event_time(ts: float, now: float, max_ahead_s: float, max_age_s: Optional[float]) -> None:
    """ValidationError naming `ts` when an event's time is more than `max_ahead_s` after `now` (a
    clock off, or milliseconds sent as seconds) or, when `max_age_s` is set, more than that before
    it. The service refuses such events rather than clamping them: a moved time would be a
    silently wrong profile."""
    if ts > now + max_ahead_s:
        raise ValidationError("ts", f"{ts:.0f} is {ts - now:.0f} s after the service's clock (at most {max_ahead_s:g} "
                                    "s ahead are accepted): send seconds since the epoch, UTC")
    if max_age_s is not None and ts < now - max_age_s:
        raise ValidationError("ts", f"{ts:.0f} is {now - ts:.0f} s before the service's clock (at most {max_age_s:g} "
                                    "s old are accepted)")


def canonical_id(text: str) -> str:
    """The one spelling of an id: Unicode NFC, without surrounding whitespace (see normalize_id)."""
    return unicodedata.normalize("NFC", text).strip()


def normalize_id(value: Any, name: str) -> str:
    """The one spelling of a user, item or event id, or ValidationError naming field `name`.

    Strings (and integers, as their digits) are put in Unicode NFC and stripped of surrounding
    whitespace, so "café" typed precomposed or as "e" + combining accent, and " alice " and
    "alice", are the same id on every route of the service and in every job's tables.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValidationError(name, "is required and must be a string (or an integer)")
    value = canonical_id(str(value))
    if not value:
        raise ValidationError(name, "must not be empty")
    if len(value) > MAX_ID_CHARS:
        raise ValidationError(name, f"is {len(value)} characters long; at most {MAX_ID_CHARS}")
    return value


# --------------------------------------------------------------------------------------------
# Whole tables (the adapters)


def clean_events(frame: pd.DataFrame, known_items: Optional[set[str]], report: InvalidRows) -> pa.Table:
    """Validate a frame of raw event columns; skip (and report) bad rows; return EVENTS_SCHEMA.

    Expects the canonical column names; `ts` may be seconds, datetimes or ISO strings.
    Rows missing ids, with an unknown type, an unparseable time or an unknown item are skipped.
    """
    frame = frame.copy()
    for col in EVENTS_SCHEMA.names:
        if col not in frame:
            frame[col] = None
    bad = pd.Series(False, index=frame.index)

    def reject(mask: pd.Series, reason: str) -> None:
        nonlocal bad
        mask = mask & ~bad
        report.add(reason, int(mask.sum()), _examples(frame.loc[mask], report.max_examples))
        bad = bad | mask

    for col in ("event_id", "user_id"):
        frame[col] = _ids(frame[col])
        reject(frame[col].isna(), f"missing {col}")
    frame["item_id"] = _ids(frame["item_id"])
    reject(~frame["type"].isin(EVENT_TYPES), "unknown event type")
    ts = _timestamps(frame["ts"])
    reject(ts.isna(), "missing or unparseable timestamp")  # before replacing: examples show the raw time
    frame["ts"] = ts
    frame["text"] = frame["text"].map(_clean_text).astype(object)
    reject(frame["item_id"].isna() & frame["text"].isna(), "event with neither item_id nor text")
    if known_items is not None:
        reject(frame["item_id"].notna() & ~frame["item_id"].isin(known_items), "unknown item_id")
    value = pd.to_numeric(frame["value"], errors="coerce").astype("float64")
    value = value.where(np.isfinite(value.to_numpy(dtype="float64", na_value=np.nan)))
    reject((frame["type"] == "rating") & value.isna(), "rating without a numeric value")
    # as in validate_event: a value that is given must be a finite number, whatever the type
    reject(frame["value"].map(_present) & value.isna(), "value is not a finite number")
    frame["value"] = value
    reject(frame["event_id"].where(~bad).duplicated(keep="first") & frame["event_id"].notna(),
           "duplicate event_id (the first row wins)")
    frame = frame.loc[~bad]
    frame["context"] = frame["context"].map(_json_or_none)
    return pa.Table.from_pandas(frame[list(EVENTS_SCHEMA.names)], schema=EVENTS_SCHEMA, preserve_index=False)


def clean_items(frame: pd.DataFrame, report: InvalidRows) -> pa.Table:
    """Validate a frame of item columns; skip rows without an id and repeated ids; ITEMS_SCHEMA."""
    frame = frame.copy()
    for col in ITEMS_SCHEMA.names:
        if col not in frame:
            frame[col] = None
    frame["item_id"] = _ids(frame["item_id"])
    missing = frame["item_id"].isna()
    report.add("missing item_id", int(missing.sum()), _examples(frame.loc[missing], report.max_examples))
    dup = frame["item_id"].duplicated(keep="last") & ~missing
    report.add("duplicate item_id (the last row wins)", int(dup.sum()), _examples(frame.loc[dup], report.max_examples))
    frame = frame.loc[~missing & ~dup]
    for col in ("title", "description", "brand"):
        frame[col] = frame[col].map(_clean_field).astype(object)
    frame["categories"] = frame["categories"].map(_category_list)
    frame["extra"] = frame["extra"].map(_json_or_none)
    return pa.Table.from_pandas(frame[list(ITEMS_SCHEMA.names)], schema=ITEMS_SCHEMA, preserve_index=False)


# The title goes into an item's text this many times. The encoder mean-pools its tokens, so a
# second copy weighs the title (the field that names the item) more against a long description;
# chosen on Amazon Industrial's valid split, three seeds (docs/results). The encode job
# records it in its manifest, and the service encodes the items it learns the way the embeddings'
# items were encoded (vectors.items_title_repeats), so an upgrade never mixes two forms.
TITLE_REPEATS = 2


def item_text(title: Optional[str], brand: Optional[str], categories: Optional[Iterable[str]],
              description: Optional[str], max_chars: int = 1000, title_repeats: int = TITLE_REPEATS) -> str:
    """The text that represents an item to the encoder: the title (`title_repeats` times), brand,
    categories, description, cut at `max_chars`."""
    parts = [title] * title_repeats if title else []
    if brand:
        parts.append(brand)
    cats = [c for c in (categories or []) if c]
    if cats:
        parts.append(", ".join(cats))
    if description:
        parts.append(description)
    return ". ".join(parts)[:max_chars]


def events_from_table(table: pa.Table) -> list[Event]:
    """Rows of an EVENTS_SCHEMA table as Event records (ts in seconds)."""
    cols = table.to_pydict()
    ts = table.column("ts").cast(pa.int64()).to_numpy(zero_copy_only=False) / 1000.0
    return [
        Event(cols["event_id"][i], cols["user_id"][i], cols["type"][i], float(ts[i]), cols["item_id"][i],
              cols["text"][i], cols["value"][i], cols["context"][i])
        for i in range(table.num_rows)
    ]


def _examples(frame: pd.DataFrame, n: int) -> list[dict[str, Any]]:
    rows = frame.head(n).to_dict("records")
    return [{k: v for k, v in row.items() if v is not None and not _is_nan(v)} for row in rows]


def _present(v: Any) -> bool:
    """A value someone supplied: not null/NaN and not a blank string."""
    if v is None or _is_nan(v) or v is pd.NA or v is pd.NaT:
        return False
    return not (isinstance(v, str) and not v.strip())


def _clean_field(v: Any) -> Optional[str]:
    # blank strings count as absent, so "" and a missing field read the same downstream
    return str(v).strip() or None if _present(v) else None


def _clean_text(v: Any) -> Optional[str]:
    if not isinstance(v, str):
        return None
    return v.strip()[:MAX_TEXT_CHARS] or None


def _ids(series: pd.Series) -> pd.Series:
    def norm(v: Any) -> Optional[str]:
        if not _present(v):  # None, NaN, pd.NA (nullable dtypes), NaT, blanks
            return None
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        try:
            return normalize_id(str(v), "id")  # the service's rule, so both find the same ids
        except ValidationError:
            return None

    return series.map(norm).astype(object)


def _timestamps(series: pd.Series) -> pd.Series:
    if pd.api.types.is_datetime64_any_dtype(series):
        out = pd.to_datetime(series, utc=True)
    elif pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
        out = _from_seconds(series)
    else:
        numeric = pd.to_numeric(series, errors="coerce")
        as_text = pd.to_datetime(series.where(numeric.isna()), utc=True, errors="coerce", format="mixed")
        out = _from_seconds(numeric).fillna(as_text)
    # the range validate_event accepts, whatever form the time came in (out of range -> NaT)
    out = out.where((out >= _EPOCH) & (out < _LAST))
    return out.astype("datetime64[ms, UTC]")


_EPOCH = pd.Timestamp(0, tz="UTC")
_LAST = pd.Timestamp(int(MAX_EPOCH_SECONDS), unit="s", tz="UTC")


def _from_seconds(numeric: pd.Series) -> pd.Series:
    # milliseconds, negative numbers and inf become NaT like unparseable text (no overflow error)
    numeric = pd.to_numeric(numeric, errors="coerce").astype("float64")
    numeric = numeric.where((numeric >= 0) & (numeric < MAX_EPOCH_SECONDS))
    return pd.to_datetime(numeric, unit="s", utc=True, errors="coerce")


def _category_list(v: Any) -> list[str]:
    if v is None or _is_nan(v):
        return []
    if isinstance(v, str):
        sep = "|" if "|" in v else ","
        return [c.strip() for c in v.split(sep) if c.strip()]
    if isinstance(v, (list, tuple, np.ndarray)):
        return [str(c).strip() for c in v if c is not None and str(c).strip()]
    return [str(v)]


def _json_or_none(v: Any) -> Optional[str]:
    if v is None or _is_nan(v):
        return None
    if isinstance(v, str):
        return v if v.strip() else None
    return json.dumps(v, sort_keys=True, default=str)


def _is_nan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)

"""What every adapter shares: the PreparedData record, reading input files at any URI, user
sampling, and the final ordering of events and cases."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from profilerec.data import storage
from profilerec.data.schema import CASES_SCHEMA, EVENTS_SCHEMA, ITEMS_SCHEMA, SPLITS, InvalidRows
from profilerec.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """Canonical tables of one source, ready for every job.

    `events` are sorted by (user_id, ts, original order); `cases` (one per target event, in
    that same log order) name the event to predict and its protocol split; `max_history` caps
    how many earlier events a case sees (None = all of them).
    """

    events: pa.Table
    items: pa.Table
    cases: pa.Table
    max_history: Optional[int]
    invalid: InvalidRows = field(default_factory=InvalidRows)
    notes: list[str] = field(default_factory=list)
    source: str = ""
    input: str = ""

    @property
    def num_users(self) -> int:
        """Distinct users with at least one event."""
        return len(pc.unique(self.events.column("user_id"))) if self.events.num_rows else 0

    def split_counts(self) -> dict[str, int]:
        """Cases per split, protocol splits first."""
        counts = pd.Series(self.cases.column("split").to_pylist(), dtype=object).value_counts()
        names = [s for s in SPLITS if s in counts] + sorted(set(counts.index) - set(SPLITS))
        return {name: int(counts[name]) for name in names}

    def summary(self) -> dict[str, Any]:
        """Counts for logs, manifests and the job's printout."""
        return {
            "source": self.source,
            "input": self.input,
            "rows": {"events": self.events.num_rows, "items": self.items.num_rows, "cases": self.cases.num_rows},
            "users": self.num_users,
            "max_history": self.max_history,
            "splits": self.split_counts(),
            "invalid": self.invalid.to_dict(),
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------------------------
# Reading inputs (local paths or any pyarrow.fs URI, so cluster jobs can read from s3:// too)


def require_dir(location: str) -> None:
    """DataError naming `location` when there is no folder there."""
    if not storage.exists(location):
        raise DataError(f"input folder not found: {location}")


def read_bytes(location: str) -> bytes:
    """The whole file; DataError naming it when it is missing or unreadable."""
    try:
        return storage.read_bytes(location)
    except DataError:
        raise
    except OSError as e:  # a folder, permissions, a broken object store
        raise DataError(f"cannot read {location}: {e}") from None


def read_csv(location: str, **kwargs: Any) -> pd.DataFrame:
    """A CSV file as strings (no NA guessing: ids like "NA" or "007" stay as written)."""
    data = read_bytes(location)
    options = {"dtype": str, "keep_default_na": False, "compression": _compression(location)}
    options.update(kwargs)
    try:
        frame = pd.read_csv(io.BytesIO(data), **options)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"cannot parse CSV {location}: {e}") from None
    # headers with stray spaces or trailing empty columns ("a,b,,,") must not break lookups
    frame.columns = [str(c).strip() for c in frame.columns]
    unnamed = [c for c in frame.columns if not c or c.startswith("Unnamed:")]
    if unnamed and all((frame[c] == "").all() for c in unnamed):
        frame = frame.drop(columns=unnamed)
    return frame


def read_jsonl(location: str, report: InvalidRows, what: str = "line") -> list[dict[str, Any]]:
    """Objects of a JSON-lines file; lines that are not JSON objects are counted and skipped."""
    rows, bad = [], []
    text = read_bytes(location)
    try:
        lines = text.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{location} is not UTF-8 text: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            rows.append(obj)
        else:
            bad.append(f"{posixpath.basename(location)}:{n}: {line[:80]}")
    report.add(f"{what} that is not a JSON object", len(bad), bad)
    return rows


def read_frame(location: str) -> pd.DataFrame:
    """A CSV/TSV, Parquet or JSON-lines file as a DataFrame, chosen by the file extension."""
    name = location.split("?", 1)[0].lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst", ".zip"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith((".parquet", ".pq")):
        return storage.read_table(location).to_pandas()
    if name.endswith((".csv", ".tsv", ".txt")):
        sep = "\t" if name.endswith(".tsv") else ","
        # strings throughout; clean_events parses ids, times and numbers itself
        return read_csv(location, sep=sep)
    if name.endswith((".jsonl", ".ndjson", ".json")):
        data = read_bytes(location)
        lines = not data.lstrip().startswith(b"[")
        try:
            return pd.read_json(io.BytesIO(data), lines=lines, dtype=False, compression=_compression(location))
        except ValueError as e:
            raise DataError(f"cannot parse JSON {location}: {e}") from None
    raise DataError(f"unsupported file type: {location} (use .csv, .tsv, .parquet or .jsonl)")


def _compression(location: str) -> Optional[str]:
    name = location.split("?", 1)[0].lower()
    return {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd", ".zip": "zip"}.get(
        posixpath.splitext(name)[1])


# --------------------------------------------------------------------------------------------
# Sampling and final ordering


def user_hash(user_id: str) -> int:
    """A stable 64-bit hash of a user id (the same in every process, unlike hash())."""
    return int.from_bytes(hashlib.blake2b(user_id.encode("utf-8"), digest_size=8).digest(), "big")


def sample_user_ids(user_ids: Iterable[str], n: int) -> set[str]:
    """The `n` users that come first in stable-hash order (a deterministic pseudo-random sample)."""
    unique = sorted(set(user_ids), key=lambda u: (user_hash(u), u))
    return set(unique[: max(n, 0)])


def sort_events(events: pa.Table) -> pa.Table:
    """Events by (user_id, ts, current row order): the order every job replays the log in."""
    order = pa.array(np.arange(events.num_rows, dtype=np.int64))
    keyed = events.append_column("__row", order)
    keyed = keyed.take(pc.sort_indices(keyed, [("user_id", "ascending"), ("ts", "ascending"),
                                               ("__row", "ascending")]))
    return keyed.drop_columns(["__row"])


def finish(events: pa.Table, items: pa.Table, cases: pa.Table, *, max_history: Optional[int],
           invalid: InvalidRows, notes: list[str], source: str, input: str,
           sample_users: Optional[int] = None) -> PreparedData:
    """Sort events, put cases in log order, apply `sample_users`, log a summary: the last step of
    every adapter. All items stay: the catalog is the ranking universe even for a sample."""
    events = sort_events(events.cast(EVENTS_SCHEMA))
    items = items.cast(ITEMS_SCHEMA)
    if sample_users is not None:
        users = pc.unique(events.column("user_id")).to_pylist()
        keep = sample_user_ids(users, sample_users)
        if len(keep) < len(users):
            keep_arr = pa.array(sorted(keep), pa.string())
            events = events.filter(pc.is_in(events.column("user_id"), keep_arr))
            cases = cases.filter(pc.is_in(cases.column("user_id"), keep_arr))
            notes.append(f"sampled {len(keep)} of {len(users)} users by a stable hash of the user id; "
                         f"all {items.num_rows} items kept")
    cases = order_cases(events, cases.cast(CASES_SCHEMA))
    data = PreparedData(events, items, cases, max_history, invalid, notes, source, input)
    splits = ", ".join(f"{k} {v}" for k, v in data.split_counts().items())
    log.info("%s %s: %d events of %d users, %d items, %d cases (%s)", source, input, events.num_rows,
             data.num_users, items.num_rows, cases.num_rows, splits or "none")
    log.info("%s invalid rows: %s", source, one_line(invalid))
    return data


def order_cases(events: pa.Table, cases: pa.Table) -> pa.Table:
    """Cases sorted by where their target sits in the (sorted) event log; a case whose target
    event is not in the log is an adapter bug and raises."""
    position = {eid: i for i, eid in enumerate(events.column("event_id").to_pylist())}
    targets = cases.column("target_event_id").to_pylist()
    missing = [t for t in targets if t not in position]
    if missing:
        raise DataError(f"{len(missing)} cases point at events that are not in the log, e.g. {missing[:3]}")
    order = np.argsort(np.array([position[t] for t in targets], dtype=np.int64), kind="stable")
    return cases.take(pa.array(order))


def one_line(invalid: InvalidRows) -> str:
    """The invalid-row report in one line: total and count per reason."""
    if not invalid.total:
        return "none"
    return f"{invalid.total} skipped (" + "; ".join(f"{n} {r}" for r, n in invalid.reasons.most_common()) + ")"


def cases_table(user_ids: list[str], target_event_ids: list[str], splits: list[str]) -> pa.Table:
    """A CASES_SCHEMA table from three equal-length columns."""
    return pa.table({"user_id": pa.array(user_ids, pa.string()),
                     "target_event_id": pa.array(target_event_ids, pa.string()),
                     "split": pa.array(splits, pa.string())}, schema=CASES_SCHEMA)

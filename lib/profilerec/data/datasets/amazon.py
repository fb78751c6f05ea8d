"""Amazon review folders in the MiniOneRec format: items.jsonl + train/valid/test.csv.

Each CSV row is `user_id,history,item_id`: the item to predict and up to `max_history` earlier
items (space separated, oldest first). A user's full sequence is the history of their first row
followed by every row's target, in the order train -> valid -> test; each row's history is then
exactly the last items of the sequence before its target, which is checked and reported.
"""

from __future__ import annotations

import ast
import json
import logging
from typing import Any, Optional

import pandas as pd
from profilerec.data import storage
from profilerec.data.datasets.common import PreparedData, cases_table, finish, read_csv, read_jsonl, require_dir
from profilerec.data.schema import InvalidRows, canonical_id, clean_events, clean_items
from profilerec.errors import DataError

log = logging.getLogger(__name__)

SPLIT_FILES = ("train", "valid", "test")
REQUIRED_SPLITS = ("valid", "test")  # train.csv is optional: valid/test histories hold the past
COLUMNS = ("user_id", "history", "item_id")
ITEM_FIELDS = ("item_id", "title", "description", "brand", "categories")
DEFAULT_MAX_HISTORY = 10
# The files carry order, not time: one synthetic day per position, from the start of the
# review window of the Amazon 2018 benchmark split.
START = pd.Timestamp("2016-10-01", tz="UTC")
STEP = pd.Timedelta(days=1)


def load(path: str, sample_users: Optional[int] = None, max_history: int = DEFAULT_MAX_HISTORY) -> PreparedData:
    """Read an Amazon category folder into canonical events, items and cases."""
    require_dir(path)
    report = InvalidRows()
    items = clean_items(read_items(storage.join(path, "items.jsonl"), report), report)
    known = set(items.column("item_id").to_pylist())
    frames = {}
    for split in SPLIT_FILES:
        location = storage.join(path, f"{split}.csv")
        if split not in REQUIRED_SPLITS and not storage.exists(location):
            continue
        if not storage.exists(location):
            raise DataError(f"Amazon folder {path} lacks {split}.csv: {location} not found")
        frames[split] = _read_split(location)
    seq = _Sequences(known, max_history, report)
    for split, frame in frames.items():
        for row in frame.itertuples(index=False):
            seq.add_row(split, row.user_id, row.history, row.item_id)
    events = clean_events(seq.events_frame(), known, report)
    cases = cases_table(seq.case_users, seq.case_targets, seq.case_splits)
    rows = sum(len(f) for f in frames.values())
    notes = [
        "amazon: the files give the order of each user's reviews, not their times; timestamps are "
        f"synthetic, one day per position from {START.date()} (use order, not time gaps)",
        f"amazon: {seq.mismatched} of {rows} rows have a history that differs from the last "
        f"{max_history} items of the sequence reconstructed before them",
    ]
    if "train" not in frames:
        notes.append(f"amazon: {path} has no train.csv; train cases come only from valid/test histories")
    if seq.mismatched:
        log.warning("amazon: %d rows' history differs from the reconstructed sequence", seq.mismatched)
    log.info("amazon: read %d items and %d rows (%s) from %s", items.num_rows, rows,
             ", ".join(f"{k} {len(v)}" for k, v in frames.items()), path)
    return finish(events, items, cases, max_history=max_history, invalid=report, notes=notes,
                  source="amazon", input=path, sample_users=sample_users)


def read_items(location: str, report: InvalidRows) -> pd.DataFrame:
    """items.jsonl as a frame of item columns; fields beyond the known ones go to `extra`."""
    rows = []
    for obj in read_jsonl(location, report, "item line"):
        extra = {k: v for k, v in obj.items() if k not in ITEM_FIELDS}
        rows.append({
            "item_id": obj.get("item_id"),
            "title": obj.get("title"),
            "description": _text(obj.get("description")),
            "brand": obj.get("brand"),
            "categories": split_categories(obj.get("categories")),
            "extra": extra or None,
        })
    return pd.DataFrame(rows, columns=list(ITEM_FIELDS) + ["extra"])


def split_categories(value: Any) -> list[str]:
    """Amazon categories as a list: a list already, a JSON/Python list literal, or a string
    separated by "|" or " > " (a category path); commas stay (they occur inside names)."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                try:
                    value = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    value = [text]
        else:
            for sep in ("|", " > "):
                if sep in text:
                    return [c.strip() for c in text.split(sep) if c.strip()]
            return [text] if text else []
    if isinstance(value, (list, tuple)):
        out = []
        for v in value:  # nested category paths (lists of lists) are flattened
            out.extend(split_categories(v) if isinstance(v, (list, tuple)) else [str(v).strip()])
        return [c for c in out if c]
    return [str(value)]


def _text(value: Any) -> Any:
    # some Amazon dumps store descriptions as a list of paragraphs
    if isinstance(value, list):
        return " ".join(str(v) for v in value if v)
    return value


def _read_split(location: str) -> pd.DataFrame:
    frame = read_csv(location)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"{location} lacks column(s) {', '.join(missing)}; expected {','.join(COLUMNS)}")
    return frame[list(COLUMNS)]


class _Sequences:
    """Rebuilds each user's item sequence from the rows, in file order."""

    def __init__(self, known: set[str], max_history: int, report: InvalidRows):
        self.known, self.max_history, self.report = known, max_history, report
        self.items: dict[str, list[str]] = {}
        self.case_users: list[str] = []
        self.case_targets: list[str] = []
        self.case_splits: list[str] = []
        self.mismatched = 0

    def add_row(self, split: str, user: str, history: str, target: str) -> None:
        """Append one row's target to its user's sequence and record its case (or skip the row)."""
        user, target = canonical_id(user or ""), canonical_id(target or "")
        hist = [canonical_id(h) for h in (history or "").split()]
        row = {"split": split, "user_id": user, "history": history, "item_id": target}
        if not user:
            self.report.add("missing user_id", 1, [row])
            return
        if not target or target not in self.known:
            self.report.add("missing or unknown target item_id", 1, [row])
            return
        if any(h not in self.known for h in hist):
            self.report.add("unknown item_id in history", 1, [row])
            return
        seq = self.items.get(user)
        if seq is None:
            seq = self.items[user] = list(hist)
        elif seq[-self.max_history:] != hist:
            self.mismatched += 1
        self.case_users.append(user)
        self.case_targets.append(f"{user}:{len(seq)}")
        self.case_splits.append(split)
        seq.append(target)

    def events_frame(self) -> pd.DataFrame:
        """One "review" event per sequence position, one synthetic day apart."""
        users, positions, items = [], [], []
        for user, seq in self.items.items():
            users.extend([user] * len(seq))
            positions.extend(range(len(seq)))
            items.extend(seq)
        pos = pd.Series(positions, dtype="int64")
        user_col = pd.Series(users, dtype=object)
        return pd.DataFrame({
            "event_id": user_col + ":" + pos.astype(str),
            "user_id": user_col,
            "item_id": pd.Series(items, dtype=object),
            "type": "review",
            "ts": START + pos * STEP,
        })

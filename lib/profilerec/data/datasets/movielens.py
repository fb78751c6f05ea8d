"""MovieLens folders (ml-latest-small and the other ml-* releases in CSV form).

ratings.csv -> "rating" events with a value, tags.csv -> "tag" events with the user's text,
movies.csv (+ links.csv) -> items. Times are real Unix timestamps. Cases follow
leave-last-positive-out with ratings >= `positive_min_value` as positives.
"""

from __future__ import annotations

import logging
from typing import Optional

import pandas as pd
from profilerec.data import storage
from profilerec.data.datasets.common import PreparedData, finish, read_csv, require_dir, sort_events
from profilerec.data.datasets.protocol import leave_last_positive_out, positive_mask
from profilerec.data.schema import InvalidRows, clean_events, clean_items
from profilerec.errors import DataError

log = logging.getLogger(__name__)

NO_GENRES = "(no genres listed)"


def load(path: str, sample_users: Optional[int] = None, positive_min_value: float = 4.0) -> PreparedData:
    """Read a MovieLens folder into canonical events, items and cases."""
    require_dir(path)
    report = InvalidRows()
    items = clean_items(read_movies(path), report)
    known = set(items.column("item_id").to_pylist())
    ratings = _table(path, "ratings.csv", ("userId", "movieId", "rating", "timestamp"))
    tag_file = storage.join(path, "tags.csv")
    tags = _table(path, "tags.csv", ("userId", "movieId", "tag", "timestamp")) if storage.exists(tag_file) else None
    frames = [_rating_events(_drop(ratings, ratings["movieId"] == "", "missing movieId", report))]
    if tags is not None:
        tags = _drop(tags, tags["movieId"] == "", "missing movieId", report)
        frames.append(_tag_events(_drop(tags, tags["tag"] == "", "tag without text", report)))
    events = clean_events(pd.concat(frames, ignore_index=True), known, report)
    notes = [f"movielens: cases hold out each user's last rating >= {positive_min_value} (test) and "
             "the one before (valid); earlier positives are train cases"]
    if tags is None:
        notes.append(f"movielens: {path} has no tags.csv; no tag events")
    log.info("movielens: read %d movies, %d ratings, %d tags from %s", items.num_rows, len(ratings),
             0 if tags is None else len(tags), path)
    # cases need the log sorted by (user, time, file order); finish() sorts again, a no-op
    events = sort_events(events)
    cases = leave_last_positive_out(events, positive_mask(events, positive_min_value, positive_types=()))
    return finish(events, items, cases, max_history=None, invalid=report, notes=notes,
                  source="movielens", input=path, sample_users=sample_users)


def read_movies(path: str) -> pd.DataFrame:
    """movies.csv (+ links.csv when present) as a frame of item columns."""
    movies = _table(path, "movies.csv", ("movieId", "title", "genres"))
    frame = pd.DataFrame({
        "item_id": movies["movieId"],
        "title": movies["title"],
        "categories": movies["genres"].map(_genres),
    })
    links_file = storage.join(path, "links.csv")
    if storage.exists(links_file):
        links = _table(path, "links.csv", ("movieId", "imdbId", "tmdbId"))
        by_movie = {m: {"imdbId": i or None, "tmdbId": t or None}
                    for m, i, t in zip(links["movieId"], links["imdbId"], links["tmdbId"])}
        frame["extra"] = frame["item_id"].map(lambda m: by_movie.get(m))
    return frame


def _drop(frame: pd.DataFrame, bad: pd.Series, reason: str, report: InvalidRows) -> pd.DataFrame:
    report.add(reason, int(bad.sum()), frame[bad].head(report.max_examples).to_dict("records"))
    return frame[~bad]


def _genres(value: str) -> list[str]:
    return [g.strip() for g in (value or "").split("|") if g.strip() and g.strip() != NO_GENRES]


def _table(path: str, name: str, columns: tuple[str, ...]) -> pd.DataFrame:
    location = storage.join(path, name)
    frame = read_csv(location)  # read_csv drops ratings.csv's trailing empty columns
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{location} lacks column(s) {', '.join(missing)}; found {', '.join(frame.columns)}")
    # short rows leave NaN: make every field a stripped string ("" = absent) so ids build cleanly
    return frame[list(columns)].fillna("").apply(lambda col: col.str.strip())


def _rating_events(ratings: pd.DataFrame) -> pd.DataFrame:
    u, m, ts = ratings["userId"], ratings["movieId"], ratings["timestamp"]
    return pd.DataFrame({
        "event_id": "r:" + u + ":" + m + ":" + ts,
        "user_id": u,
        "item_id": m,
        "type": "rating",
        "ts": ts,
        "value": ratings["rating"],
    })


def _tag_events(tags: pd.DataFrame) -> pd.DataFrame:
    u, m, ts = tags["userId"], tags["movieId"], tags["timestamp"]
    # a user may tag one movie several times in the same second: number those tags
    n = tags.groupby([u, m, ts], sort=False).cumcount().astype(str)
    return pd.DataFrame({
        "event_id": "t:" + u + ":" + m + ":" + ts + ":" + n,
        "user_id": u,
        "item_id": m,
        "type": "tag",
        "ts": ts,
        "text": tags["tag"],
    })

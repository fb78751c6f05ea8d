"""Source adapters -> canonical tables, and the prepared-data folder every job reads.

A prepared folder (any `pyarrow.fs` location) holds `events.parquet` (sorted by user, time,
original order), `items.parquet`, `cases.parquet` and `manifest.json` (what was read, counts,
the protocol's history cap, the invalid-row report and notes). The manifest is written last,
so a folder with a manifest is complete.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import time
from typing import Any, Callable, Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc
from profilerec.data import storage
from profilerec.data.datasets.common import PreparedData, one_line, order_cases, sort_events
from profilerec.data.schema import CASES_SCHEMA, EVENTS_SCHEMA, ITEMS_SCHEMA, InvalidRows
from profilerec.errors import ConfigError, DataError

__all__ = ["PreparedData", "SOURCES", "load_source", "prepare", "write_prepared", "read_prepared",
           "read_prepared_table", "read_catalog", "prepared_manifest", "iter_user_events", "describe"]

log = logging.getLogger(__name__)

# kind -> "module:function(path, **options) -> PreparedData"; imported on use, so a new source
# is one module and one line here.
SOURCES = {
    "amazon": "profilerec.data.datasets.amazon:load",
    "movielens": "profilerec.data.datasets.movielens:load",
    "generic": "profilerec.data.datasets.generic:load",
}
MANIFEST_VERSION = 1
# events per chunk when a job streams the log (iter_user_events): bounds the Event objects and
# profiles held at a time, large enough that per-chunk overheads vanish
EVENT_CHUNK_ROWS = 200_000
TABLES = {"events": EVENTS_SCHEMA, "items": ITEMS_SCHEMA, "cases": CASES_SCHEMA}


def load_source(kind: str, path: str, **options: Any) -> PreparedData:
    """Read the source at `path` with the adapter registered for `kind`."""
    return _adapter(kind)(path, **options)


def prepare(cfg: Any) -> PreparedData:
    """The prepare job: read `cfg.source` at `cfg.input`, write canonical Parquet to `cfg.output`.

    `cfg` is a PrepareConfig; only the options that apply to the source are passed on.
    """
    started = time.perf_counter()
    options: dict[str, Any] = {"sample_users": cfg.sample_users}
    if cfg.source in ("movielens", "generic"):
        options["positive_min_value"] = cfg.positive_min_value
    if cfg.source == "generic":
        options.update(events_file=cfg.events_file, items_file=cfg.items_file, columns=dict(cfg.columns))
    data = load_source(cfg.source, cfg.input, **options)
    if cfg.sample_users is not None and cfg.sample_items:
        data = only_touched_items(data)
    write_prepared(data, cfg.output)
    log.info("prepared %s -> %s in %.1f s", cfg.input, cfg.output, time.perf_counter() - started)
    return data


def only_touched_items(data: PreparedData) -> PreparedData:
    """`data` with the catalog cut to the items its events mention (a small, fast sample)."""


    touched = pc.unique(pc.drop_null(data.events.column("item_id")))
    items = data.items.filter(pc.is_in(data.items.column("item_id"), touched))
    notes = data.notes + [f"catalog cut to the {items.num_rows} items the sampled users touched "
                          f"(of {data.items.num_rows}): metrics are not comparable with the full catalog"]
    return dataclasses.replace(data, items=items, notes=notes)


def write_prepared(data: PreparedData, output_uri: str) -> None:
    """Write the tables and the manifest under `output_uri` (a path or any pyarrow.fs URI)."""
    storage.makedirs(output_uri)
    # the manifest marks a complete folder: drop the old one first so a crash mid-write can't
    # leave new tables next to a stale manifest
    storage.delete(storage.join(output_uri, "manifest.json"))
    events = sort_events(data.events.cast(EVENTS_SCHEMA))  # a no-op for adapter output
    tables = {"events": events, "items": data.items.cast(ITEMS_SCHEMA),
              "cases": order_cases(events, data.cases.cast(CASES_SCHEMA))}
    for name, table in tables.items():
        storage.write_table(table, storage.join(output_uri, f"{name}.parquet"))
    manifest = {"format_version": MANIFEST_VERSION, **data.summary(),
                "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    storage.write_json(manifest, storage.join(output_uri, "manifest.json"))


def prepared_manifest(uri: str) -> dict[str, Any]:
    """The manifest of a folder written by write_prepared; DataError naming it when it is absent,
    incomplete or of another format version."""
    manifest_loc = storage.join(uri, "manifest.json")
    if not storage.exists(manifest_loc):
        raise DataError(f"no prepared data at {uri} ({manifest_loc} not found): run jobs/prepare.py first")
    manifest = storage.read_json(manifest_loc)
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise DataError(f"{manifest_loc} has format_version {manifest.get('format_version')!r}; "
                        f"this version reads {MANIFEST_VERSION}: prepare the data again")
    return manifest


def read_prepared_table(uri: str, name: str) -> pa.Table:
    """One table ("events", "items" or "cases") of a prepared folder, checked against its schema."""
    prepared_manifest(uri)
    return _read_table(storage.join(uri, f"{name}.parquet"), TABLES[name])


def read_prepared(uri: str, events: bool = True, descriptions: bool = True) -> PreparedData:
    """Read a folder written by write_prepared; DataError naming it when it is absent or incomplete.
    `events=False` leaves the (largest) events table empty, for jobs that stream it with
    iter_user_events; `descriptions=False` reads the items as read_catalog does, for jobs that
    do not encode them."""
    manifest = prepared_manifest(uri)
    names = [n for n in TABLES if (events or n != "events") and (descriptions or n != "items")]
    tables = {name: _read_table(storage.join(uri, f"{name}.parquet"), TABLES[name]) for name in names}
    if not descriptions:
        tables["items"] = read_catalog(uri)
    tables.setdefault("events", EVENTS_SCHEMA.empty_table())
    bad = manifest.get("invalid", {})
    invalid = InvalidRows()
    for reason, n in bad.get("reasons", {}).items():
        invalid.add(reason, int(n), bad.get("examples", {}).get(reason, []))
    return PreparedData(tables["events"], tables["items"], tables["cases"], manifest.get("max_history"), invalid,
                        list(manifest.get("notes", [])), manifest.get("source", ""), manifest.get("input", ""))


CATALOG_COLUMNS = ["item_id", "title", "brand", "categories"]  # what scoring and filters read of an item


def read_catalog(uri: str) -> pa.Table:
    """The items of a prepared folder with only the columns scoring and filters use
    (CATALOG_COLUMNS): the descriptions, most of a large catalog's bytes, stay on disk."""
    location = storage.join(uri, "items.parquet")
    schema = pa.schema([ITEMS_SCHEMA.field(name) for name in CATALOG_COLUMNS])
    return _conform(storage.read_table(location, columns=CATALOG_COLUMNS), schema, location)


def iter_user_events(uri: str, rows: Optional[int] = None) -> Iterator[pa.Table]:
    """The events of a prepared folder in log order, as tables of about `rows` rows (default
    EVENT_CHUNK_ROWS) that each hold whole users (the log is sorted by user): a log of any size
    streams through the batch jobs in bounded memory."""
    rows = rows or EVENT_CHUNK_ROWS
    prepared_manifest(uri)
    location = storage.join(uri, "events.parquet")
    carry: Optional[pa.Table] = None
    for chunk in storage.iter_tables(location, rows, columns=EVENTS_SCHEMA.names):
        chunk = _conform(chunk, EVENTS_SCHEMA, location)
        if carry is not None:
            chunk = pa.concat_tables([carry, chunk]).combine_chunks()
        users = chunk.column("user_id")
        # the last user may go on in the next chunk: hold its rows back
        tail = pc.sum(pc.equal(users, users[-1])).as_py()
        carry = chunk.slice(chunk.num_rows - tail)
        if tail < chunk.num_rows:
            yield chunk.slice(0, chunk.num_rows - tail)
    if carry is not None and carry.num_rows:
        yield carry


def describe(data: PreparedData, output: str = "") -> str:
    """A short human-readable summary of prepared data (for the job's printout)."""
    s = data.summary()
    lines = [
        f"source: {s['source']} ({s['input']})",
        f"events: {s['rows']['events']:,}  users: {s['users']:,}  items: {s['rows']['items']:,}",
        "cases: " + (", ".join(f"{k} {v:,}" for k, v in s["splits"].items()) or "none")
        + f"  (history cap: {s['max_history'] if s['max_history'] is not None else 'all earlier events'})",
        f"invalid rows: {one_line(data.invalid)}",
    ]
    lines += [f"note: {n}" for n in s["notes"]]
    if output:
        lines.append(f"written to: {output}")
    return "\n".join(lines)


def _adapter(kind: str) -> Callable[..., PreparedData]:
    if kind not in SOURCES:
        raise ConfigError(f"unknown source {kind!r}; known sources: {', '.join(SOURCES)}")
    module, _, func = SOURCES[kind].partition(":")
    return getattr(importlib.import_module(module), func)


def _read_table(location: str, schema: pa.Schema) -> pa.Table:
    return _conform(storage.read_table(location), schema, location)


def _conform(table: pa.Table, schema: pa.Schema, location: str) -> pa.Table:
    missing = [n for n in schema.names if n not in table.column_names]
    if missing:
        raise DataError(f"{location} lacks column(s) {', '.join(missing)}: prepare the data again")
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataError(f"{location} does not match the canonical schema: {e}") from None

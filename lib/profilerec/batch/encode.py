"""The embeddings tables and the Ray Data pipeline that fills them.

Item texts and distinct event texts are looked up in a vector cache keyed by model fingerprint
and text hash; only texts the cache lacks are encoded, each distinct text once, by a Ray Data
pipeline (tokenise tasks -> length-bucketed batches on an actor pool of TextEncoders, one GPU
each in bf16 where the cluster has GPUs -> Parquet appended to the cache). The outputs are
then streamed out of the cache:

    <output>/items/*.parquet   item_id: string, vector: fixed_size_list<float32>[dim]
    <output>/texts/*.parquet   text_hash: string, vector: fixed_size_list<float32>[dim]
    <output>/manifest.json     model, dim, counts, precision, encoded/cached counts, seconds
    <cache>/<fingerprint>/*.parquet   text_hash, vector (default cache: <output>/cache)

See docs/encoding.md.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
from profilerec.config import EncodeConfig
from profilerec.data import storage
from profilerec.data.datasets import read_prepared_table
from profilerec.data.vectors import item_texts, read_embeddings, vectors_to_arrow
from profilerec.errors import DataError
from profilerec.model.encoder import (
    PRECISIONS,
    TextEncoder,
    check_precision,
    cpu_multiplies_bf16,
    load_tokenizer,
    model_fingerprint,
    resolve_model_path,
    text_hash,
    token_ids,
)
from profilerec.runtime.cluster import ProgressFn, encoder_actor_resources, model_worker_runtime_env
from profilerec.runtime.parallel import cores_per_worker

log = logging.getLogger(__name__)

SCAN_ROWS = 1 << 16  # rows per streamed batch when reading the events and the cache


def tokenize_batch(batch: pa.Table, model_path: str, max_length: int) -> pa.Table:
    """Ray Data task: token ids (list<int32>) of each text, so encoder actors only run the model."""
    ids = token_ids(load_tokenizer(model_path), batch.column("text").to_pylist(), max_length)
    return pa.table({"text_hash": batch.column("text_hash"), "ids": pa.array(ids, pa.list_(pa.int32()))})


class EncodeBatch:
    """Ray Data callable: a TextEncoder held by one pool actor, applied to tokenised batches."""

    def __init__(self, model: str, max_length: int, batch_size: int, token_budget: int, precision: str,
                 threads: Optional[int] = None):
        import torch

        if threads:
            # Ray sets OMP_NUM_THREADS=1 in workers; the encoder actor owns its share of the cores
            torch.set_num_threads(threads)
        self.encoder = TextEncoder(model, max_length=max_length, batch_size=batch_size, token_budget=token_budget,
                                   precision=precision)

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column("ids").combine_chunks()
        offsets = ids.offsets.to_numpy()
        values = ids.values.to_numpy()
        rows = [values[offsets[i]:offsets[i + 1]] for i in range(len(ids))]
        vectors = self.encoder.encode_ids(rows)
        return pa.table({"text_hash": batch.column("text_hash"), "vector": vectors_to_arrow(vectors)})


def resolve_precision(cfg: EncodeConfig, use_gpu: bool) -> str:
    """The precision the encoder runs at: `auto` is bf16 on a GPU and on a CPU that multiplies bf16
    in hardware (AMX; the CPU of the node this runs on is the one checked), else fp32. int8 is an
    option: faster on CPUs but below cosine 0.99 to fp32 for some texts; docs/encoding.md."""
    # checked here too, in the driver, so a wrong setting fails before any actor starts
    check_precision(cfg.precision, "cuda" if use_gpu else "cpu", allowed=("auto",) + PRECISIONS)
    if cfg.precision == "auto":
        return "bf16" if use_gpu or cpu_multiplies_bf16() else "fp32"
    return cfg.precision


def scan_column(location: str, column: str, batch_rows: int = SCAN_ROWS) -> Iterator[pa.Array]:
    """One column of a Parquet file or folder, batch by batch (never the whole table in memory)."""
    fs, path = storage.resolve(location)
    try:
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
        for batch in dataset.to_batches(columns=[column], batch_size=batch_rows):
            yield batch.column(0)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"cannot read column {column!r} of {location}: {e}") from None


class TextSet:
    """Distinct texts by hash: which are already in the cache, and the new ones to encode."""

    def __init__(self, cached: pa.Array):
        self.cached = cached
        self.seen: set[str] = set()
        self.new_hashes: list[str] = []
        self.new_texts: list[str] = []

    def add(self, texts: pa.Array) -> pa.Array:
        """Hashes of `texts` (null/empty -> " ", as the encoder sees them); new ones are queued."""
        texts = pc.fill_null(texts, " ")
        texts = pc.if_else(pc.equal(texts, ""), " ", texts)
        distinct = pc.unique(texts)
        hashes = pa.array([text_hash(t) for t in distinct.to_pylist()], pa.string())
        fresh = pc.invert(pc.is_in(hashes, value_set=self.cached)) if len(self.cached) else None
        for n, (h, t) in enumerate(zip(hashes.to_pylist(), distinct.to_pylist())):
            if h in self.seen:
                continue
            self.seen.add(h)
            if fresh is None or fresh[n].as_py():
                self.new_hashes.append(h)
                self.new_texts.append(t)
        return pc.take(hashes, pc.index_in(texts, value_set=distinct))


def event_text_hashes(events_location: str, texts: TextSet) -> pa.Array:
    """The distinct hashes of the non-empty event texts, streamed from the events Parquet."""
    before = len(texts.seen)
    found: list[pa.Array] = []
    for column in scan_column(events_location, "text"):
        column = pc.drop_null(column)
        column = column.filter(pc.not_equal(column, ""))
        if len(column):
            found.append(pc.unique(texts.add(column)))
    hashes = pc.unique(pa.chunked_array(found, pa.string())) if found else pa.array([], pa.string())
    log.info("event texts: %d distinct (%d not seen among item texts)", len(hashes), len(texts.seen) - before)
    return hashes


def cache_location(cfg: EncodeConfig, fingerprint: str) -> str:
    """The cache folder for vectors of one model fingerprint."""
    return storage.join(cfg.cache or storage.join(cfg.output, "cache"), fingerprint)


def cached_hashes(location: str) -> pa.Array:
    """Every text hash already in the cache folder (only that column is read)."""
    if not (storage.exists(location) and storage.list_files(location, ".parquet")):
        return pa.array([], pa.string())
    return pa.chunked_array(list(scan_column(location, "text_hash")), pa.string()).combine_chunks()


def write_cache_part(batch: pa.Table, location: str) -> pa.Table:
    """Ray Data task: write one encoded batch as a new Parquet file of the cache folder; returns
    its row count, which is all the driver receives. The file is written under a name readers
    skip (leading "_") and then moved into place, so a run cut short leaves no partial file."""
    fs, path = storage.resolve(location)
    fs.create_dir(path, recursive=True)
    name = uuid.uuid4().hex
    pq.write_table(batch, f"{path}/_{name}.parquet", filesystem=fs)
    fs.move(f"{path}/_{name}.parquet", f"{path}/{name}.parquet")
    return pa.table({"rows": pa.array([batch.num_rows], pa.int64())})


def encode_into_cache(hashes: list[str], texts: list[str], location: str, cfg: EncodeConfig, use_gpu: bool,
                      precision: str, progress: Optional[ProgressFn] = None) -> None:
    """Encode (hash, text) rows on Ray Data and append (text_hash, vector) Parquet to `location`.

    Tokenising runs in Ray Data tasks next to the encoder actors, and Parquet writing after them,
    so I/O and compute overlap; the driver never holds the vectors, only each written part's row
    count, which moves `progress("texts encoded", done, total)`.
    """
    gpus = encoder_actor_resources(cfg, use_gpu)["GPU"]
    threads = None
    if not gpus:
        threads = cfg.torch_threads or cores_per_worker(cfg.num_actors)
    table = pa.table({"text_hash": pa.array(hashes, pa.string()), "text": pa.array(texts, pa.string())})
    rows = max(cfg.batch_size * 16, 1)
    blocks = [table.slice(start, rows) for start in range(0, table.num_rows, rows)]
    encoded = ray.data.from_arrow(blocks).map_batches(
        tokenize_batch, fn_kwargs=dict(model_path=resolve_model_path(cfg.model), max_length=cfg.max_length),
        batch_format="pyarrow", batch_size=None, num_cpus=0.5,
    ).map_batches(
        EncodeBatch,
        fn_constructor_kwargs=dict(model=cfg.model, max_length=cfg.max_length, batch_size=cfg.batch_size,
                                   token_budget=cfg.token_budget, precision=precision, threads=threads),
        batch_size=rows,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_gpus=gpus,
        num_cpus=cfg.num_cpus_per_actor,
        runtime_env=model_worker_runtime_env(),
    )
    written = encoded.map_batches(write_cache_part, fn_kwargs=dict(location=location), batch_size=None,
                                  batch_format="pyarrow", num_cpus=0.25)
    done = 0
    if progress is not None:
        progress("texts encoded", done, len(hashes))
    for counts in written.iter_batches(batch_size=None, batch_format="pyarrow"):
        done += sum(counts.column("rows").to_pylist())
        if progress is not None:
            progress("texts encoded", done, len(hashes))


def write_from_cache(keys: pa.Table, cache: str, location: str) -> int:
    """Write (key, vector) Parquet at `location` for every (key, hash) row of `keys`, streaming
    the cache batch by batch. Returns the rows written; the folder at `location` is replaced."""
    key = keys.column_names[0]
    storage.delete(location)
    if keys.num_rows == 0:
        return 0
    fs, path = storage.resolve(location)
    fs.create_dir(path, recursive=True)
    cache_fs, cache_path = storage.resolve(cache)
    dataset = pads.dataset(cache_path, filesystem=cache_fs, format="parquet")
    remaining, written, writer = keys, 0, None
    try:
        for batch in dataset.to_batches(batch_size=SCAN_ROWS):
            if remaining.num_rows == 0:
                break
            idx = pc.index_in(remaining.column("hash"), value_set=batch.column("text_hash"))
            hit = pc.is_valid(idx)
            rows = remaining.filter(hit)
            if rows.num_rows:
                out = pa.table({key: rows.column(key), "vector": batch.column("vector").take(idx.filter(hit))})
                if writer is None:
                    writer = pq.ParquetWriter(fs.open_output_stream(f"{path}/part-0.parquet"), out.schema)
                writer.write_table(out)
                written += rows.num_rows
            # a text found once is done: a hash the cache holds twice is written once
            remaining = remaining.filter(pc.invert(hit))
    finally:
        if writer is not None:
            writer.close()
    if remaining.num_rows:
        raise DataError(f"the vector cache {cache} lacks {remaining.num_rows} texts it was just given "
                        f"(was it deleted during the run?); run the encode job again")
    return written


def run_encode(cfg: EncodeConfig, use_gpu: bool, progress: Optional[ProgressFn] = None) -> dict[str, Any]:
    """The encode job: read prepared items/events, encode the texts the cache lacks, write the
    items and texts embeddings Parquet from the cache. `progress(what, done, total)` hears of the
    texts encoded."""

    started = time.perf_counter()
    precision = resolve_precision(cfg, use_gpu)
    fingerprint = model_fingerprint(cfg.model, cfg.max_length, precision)
    cache = cache_location(cfg, fingerprint)
    texts = TextSet(cached_hashes(cache))
    items = item_texts(read_prepared_table(cfg.input, "items"))
    keys = {"items": pa.table({"item_id": items.column("item_id"), "hash": texts.add(items.column("text"))})}
    if cfg.include_event_texts:
        hashes = event_text_hashes(storage.join(cfg.input, "events.parquet"), texts)
        keys["texts"] = pa.table({"text_hash": hashes, "hash": hashes})
    distinct = len(texts.seen)
    encoded = len(texts.new_hashes)
    log.info("%d distinct texts: %d in the cache %s, %d to encode (%s)", distinct, distinct - encoded, cache,
             encoded, precision)
    encode_started = time.perf_counter()
    if encoded:
        encode_into_cache(texts.new_hashes, texts.new_texts, cache, cfg, use_gpu, precision, progress)
    encode_seconds = time.perf_counter() - encode_started
    if encoded:
        log.info("encoded %d texts in %.1f s (%.0f texts/s)", encoded, encode_seconds, encoded / max(encode_seconds, 1e-9))
    texts.new_hashes, texts.new_texts = [], []  # free them before the outputs are written
    counts = {name: write_from_cache(table, cache, storage.join(cfg.output, name)) for name, table in keys.items()}
    if not cfg.include_event_texts:
        storage.delete(storage.join(cfg.output, "texts"))
    manifest = {
        "model": cfg.model,
        "max_length": cfg.max_length,
        "precision": precision,
        "dim": int(read_embeddings(cfg.output, "items").column("vector").type.list_size),
        "counts": counts,
        "distinct_texts": distinct,
        "encoded": encoded,
        "cache": cache,
        "encode_seconds": round(encode_seconds, 2),
        "seconds": round(time.perf_counter() - started, 2),
    }
    storage.write_json(manifest, storage.join(cfg.output, "manifest.json"))
    return manifest



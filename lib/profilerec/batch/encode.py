"""The embeddings tables and the Ray Data pipeline that fills them.

Item texts and distinct event texts are looked up in a vector cache keyed by model fingerprint
and text hash; only texts the cache lacks are encoded, each distinct text once, by a Ray Data
pipeline (tokenise tasks -> length-bucketed batches on an actor pool of TextEncoders, one GPU
each in bf16 where the cluster has GPUs -> Parquet appended to the cache). The outputs are
then streamed out of the cache:

    <output>/items/*.parquet   item_id: string, vector: fixed_size_list<float32>[dim]
    <output>/texts/*.parquet   text_hash: string, vector: fixed_size_list<float32>[dim]
    <output>/manifest.json     model, dim, counts, precision (and how it was chosen), encoded/cached
                               counts, seconds: the whole encoding, its start-up, its steady rate
    <cache>/<fingerprint>/*.parquet   text_hash, vector (default cache: <output>/cache)
    <cache>/precision.json     the precision `auto` measured fastest, per model and device

See docs/encoding.md.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import ray
from profilerec.config import EncodeConfig
from profilerec.data import storage
from profilerec.data.datasets import read_prepared_table
from profilerec.data.schema import TITLE_REPEATS
from profilerec.data.vectors import item_texts, read_embeddings, vectors_to_arrow
from profilerec.errors import ConfigError, DataError
from profilerec.model.encoder import (
    PACKING,
    PRECISIONS,
    TextEncoder,
    check_precision,
    device_name,
    device_precisions,
    fastest_precision,
    load_tokenizer,
    measure_precisions,
    model_fingerprint,
    pick_device,
    resolve_model_path,
    text_hash,
    token_ids,
)
from profilerec.runtime.cluster import ProgressFn, encoder_actor_resources, model_worker_runtime_env
from profilerec.runtime.parallel import cores_per_worker

log = logging.getLogger(__name__)

SCAN_ROWS = 1 << 16  # rows per streamed batch when reading the events and the cache
PRECISION_FILE = "precision.json"  # in the cache folder: the measured choice of `precision: auto`
CALIBRATION_ITEMS = 48  # sample items whose texts (whole, title, two title words) time the precisions
SAMPLE_ITEMS = Path(__file__).resolve().parents[1] / "sample_data" / "amazon-industrial-sample" / "items.jsonl"


def tokenize_batch(batch: pa.Table, model_path: str, max_length: int) -> pa.Table:
    """Ray Data task: token ids (list<int32>) of each text, so encoder actors only run the model."""
    ids = token_ids(load_tokenizer(model_path), batch.column("text").to_pylist(), max_length)
    return pa.table({"text_hash": batch.column("text_hash"), "ids": pa.array(ids, pa.list_(pa.int32()))})


class EncodeBatch:
    """Ray Data callable: a TextEncoder held by one pool actor, applied to tokenised batches."""

    def __init__(self, model: str, max_length: int, batch_size: int, token_budget: Optional[int], precision: str,
                 packing: str = "auto", threads: Optional[int] = None):
        import torch

        if threads:
            # Ray sets OMP_NUM_THREADS=1 in workers; the encoder actor owns its share of the cores
            torch.set_num_threads(threads)
        self.encoder = TextEncoder(model, max_length=max_length, batch_size=batch_size, token_budget=token_budget,
                                   precision=precision, packing=packing)
        # Ray Data starts the pool's actors while the first blocks are read and tokenised, so the
        # model load and this warm-up overlap them instead of delaying the first batch
        self.encoder.warm_up()

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column("ids").combine_chunks()
        offsets = ids.offsets.to_numpy()
        values = ids.values.to_numpy()
        rows = [values[offsets[i]:offsets[i + 1]] for i in range(len(ids))]
        vectors = self.encoder.encode_ids(rows)
        # when the encoder finished this block (wall clock: the driver compares it with its own),
        # so start-up and steady rate are the encoder's, not delayed by when a part gets written
        encoded_at = pa.array([time.time()] * len(rows), pa.float64())
        return pa.table({"text_hash": batch.column("text_hash"), "vector": vectors_to_arrow(vectors),
                         "encoded_at": encoded_at})


def calibration_texts(items: int = CALIBRATION_ITEMS) -> list[str]:
    """A fixed set of real texts of very different lengths from the bundled catalog sample: for
    each of the first `items` items its whole text (title, brand, description: often cut at
    max_length), its title, and the title's first two words (as a search would be)."""
    from profilerec.data.schema import item_text

    texts = []
    with open(SAMPLE_ITEMS) as f:
        for line, _ in zip(f, range(items)):
            row = json.loads(line)
            title = row.get("title") or ""
            texts += [item_text(title, row.get("brand"), [], row.get("description")), title,
                      " ".join(title.split()[:2])]
    return [t for t in texts if t.strip()]


def measure_precision_here(cfg: EncodeConfig, threads: Optional[int], known: dict[str, Any]) -> dict[str, Any]:
    """Ray task with an encoder actor's resources: the device's earlier choice from `known`
    (device name -> choice) or, when it has none, the fastest precision measured here."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    device = pick_device()
    name = device_name(device)
    if name in known:
        return {**known[name], "device": name, "chosen_by": "remembered"}
    started = time.perf_counter()
    measured = measure_precisions(cfg.model, calibration_texts(), device_precisions(device.type),
                                  max_length=cfg.max_length, batch_size=cfg.batch_size,
                                  token_budget=cfg.token_budget, packing=cfg.packing)
    return {"precision": fastest_precision(measured), "device": name, "measured": measured,
            "measure_seconds": round(time.perf_counter() - started, 2), "chosen_by": "measured"}


def choose_precision(cfg: EncodeConfig, use_gpu: bool) -> dict[str, Any]:
    """The precision the encoder runs at, and how it was chosen: {"precision"} when set, else (auto)
    the fastest on the encoder actors' device among device_precisions whose every vector is within
    cosine 0.999 of fp32's, measured once per device and model on calibration_texts in a Ray task
    with an actor's resources (the driver may have no GPU) and remembered in the cache's
    precision.json. Also returned: "chosen_by" (setting, measured, remembered) and for auto the
    "device" and what was "measured" there (texts/s, lowest cosine to fp32 per precision)."""
    # checked here, in the driver, so a wrong setting fails before any actor starts
    check_precision(cfg.precision, "cuda" if use_gpu else "cpu", allowed=("auto",) + PRECISIONS)
    if cfg.packing not in PACKING:
        raise ConfigError(f"setting packing: {cfg.packing!r} is not one of {', '.join(PACKING)}")
    if cfg.precision != "auto":
        return {"precision": cfg.precision, "chosen_by": "setting"}
    memo = storage.join(cfg.cache or storage.join(cfg.output, "cache"), PRECISION_FILE)
    choices = storage.read_json(memo) if storage.exists(memo) else {}
    model = model_fingerprint(cfg.model, cfg.max_length, "auto")
    resources = encoder_actor_resources(cfg, use_gpu)
    threads = None if resources["GPU"] else cfg.torch_threads or cores_per_worker(cfg.num_actors)
    task = ray.remote(measure_precision_here).options(num_cpus=resources["CPU"], num_gpus=resources["GPU"],
                                                      runtime_env=model_worker_runtime_env())
    choice = ray.get(task.remote(cfg, threads, choices.get(model, {})))
    if choice["chosen_by"] == "measured":
        log.info("precision auto on %s: %s (measured %s)", choice["device"], choice["precision"], choice["measured"])
        kept = {k: v for k, v in choice.items() if k not in ("device", "chosen_by")}
        choices.setdefault(model, {})[choice["device"]] = kept
        storage.write_json(choices, memo)
    return choice


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
    skip (leading "_") and then moved into place, so a run cut short leaves no partial file.
    An `encoded_at` column (when the encoder finished the rows) is not written but returned."""
    encoded_at = batch.column("encoded_at")[0].as_py() if "encoded_at" in batch.column_names else None
    batch = batch.drop_columns(["encoded_at"]) if encoded_at is not None else batch
    fs, path = storage.resolve(location)
    fs.create_dir(path, recursive=True)
    name = uuid.uuid4().hex
    pq.write_table(batch, f"{path}/_{name}.parquet", filesystem=fs)
    fs.move(f"{path}/_{name}.parquet", f"{path}/{name}.parquet")
    return pa.table({"rows": pa.array([batch.num_rows], pa.int64()), "encoded_at": pa.array([encoded_at], pa.float64())})


def encode_into_cache(hashes: list[str], texts: list[str], location: str, cfg: EncodeConfig, use_gpu: bool,
                      precision: str, progress: Optional[ProgressFn] = None) -> dict[str, Optional[float]]:
    """Encode (hash, text) rows on Ray Data and append (text_hash, vector) Parquet to `location`.

    Tokenising runs in Ray Data tasks next to the encoder actors, and Parquet writing after them,
    so I/O and compute overlap; the driver never holds the vectors, only each written part's row
    count, which moves `progress("texts encoded", done, total)`. Returns `startup_seconds` (from
    here until an encoder finished its first block: Ray Data planning, actor start, model load and
    warm-up, the first block) and `steady_texts_per_second` (the texts of the later blocks over
    the time from the first block's end to the last's; None with a single block).
    """
    started = time.time()  # wall clock, as the encoders stamp their blocks
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
                                   token_budget=cfg.token_budget, precision=precision, packing=cfg.packing,
                                   threads=threads),
        batch_size=rows,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_gpus=gpus,
        num_cpus=cfg.num_cpus_per_actor,
        runtime_env=model_worker_runtime_env(),
    )
    written = encoded.map_batches(write_cache_part, fn_kwargs=dict(location=location), batch_size=None,
                                  batch_format="pyarrow", num_cpus=0.25)
    done, blocks = 0, []
    if progress is not None:
        progress("texts encoded", done, len(hashes))
    for counts in written.iter_batches(batch_size=None, batch_format="pyarrow"):
        rows = counts.column("rows").to_pylist()
        done += sum(rows)
        blocks += zip(counts.column("encoded_at").to_pylist(), rows)
        if progress is not None:
            progress("texts encoded", done, len(hashes))
    blocks.sort()
    if not blocks:
        return {"startup_seconds": None, "steady_texts_per_second": None}
    after = blocks[-1][0] - blocks[0][0]
    steady = sum(n for _, n in blocks[1:]) / after if len(blocks) > 1 and after > 0 else None
    return {"startup_seconds": round(blocks[0][0] - started, 2),
            "steady_texts_per_second": round(steady, 1) if steady is not None else None}


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
    # fixed before the fingerprint: the cache keeps each precision's vectors apart
    choice = choose_precision(cfg, use_gpu)
    precision = choice["precision"]
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
    timing = {"startup_seconds": None, "steady_texts_per_second": None}
    if encoded:
        timing = encode_into_cache(texts.new_hashes, texts.new_texts, cache, cfg, use_gpu, precision, progress)
    encode_seconds = time.perf_counter() - encode_started
    if encoded:
        log.info("encoded %d texts in %.1f s (%.0f texts/s; start-up %s s, then %s texts/s)", encoded, encode_seconds,
                 encoded / max(encode_seconds, 1e-9), timing["startup_seconds"], timing["steady_texts_per_second"])
    texts.new_hashes, texts.new_texts = [], []  # free them before the outputs are written
    counts = {name: write_from_cache(table, cache, storage.join(cfg.output, name)) for name, table in keys.items()}
    if not cfg.include_event_texts:
        storage.delete(storage.join(cfg.output, "texts"))
    manifest = {
        "model": cfg.model,
        "max_length": cfg.max_length,
        "precision": precision,
        "precision_choice": {k: v for k, v in choice.items() if k != "precision"},
        "packing": cfg.packing,
        "title_repeats": TITLE_REPEATS,  # the items' text form (data/schema.py item_text)
        "dim": int(read_embeddings(cfg.output, "items").column("vector").type.list_size),
        "counts": counts,
        "distinct_texts": distinct,
        "encoded": encoded,
        "cache": cache,
        "encode_seconds": round(encode_seconds, 2),
        **timing,
        "seconds": round(time.perf_counter() - started, 2),
    }
    storage.write_json(manifest, storage.join(cfg.output, "manifest.json"))
    return manifest



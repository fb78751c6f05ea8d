"""The embeddings tables and the Ray Data pipeline that fills them.

Item texts and distinct event texts are sharded across an actor pool of TextEncoders (one GPU
each where the cluster has GPUs) with `map_batches`; the output is Parquet:

    <output>/items/*.parquet   item_id: string, vector: fixed_size_list<float32>[dim]
    <output>/texts/*.parquet   text_hash: string, vector: fixed_size_list<float32>[dim]
    <output>/manifest.json     model, dim, counts, seconds
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from profilerec import storage
from profilerec.config import EncodeConfig
from profilerec.encoder import TextEncoder, text_hash
from profilerec.errors import DataError
from profilerec.schema import item_text

log = logging.getLogger(__name__)


class EncodeBatch:
    """Ray Data callable: a TextEncoder held by one pool actor, applied batch by batch."""

    def __init__(self, model: str, max_length: int, batch_size: int, key: str, threads: Optional[int] = None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.encoder = TextEncoder(model, max_length=max_length, batch_size=batch_size)
        self.key = key

    def __call__(self, batch: pa.Table) -> pa.Table:
        vectors = self.encoder.encode(batch.column("text").to_pylist())
        return pa.table({self.key: batch.column(self.key), "vector": vectors_to_arrow(vectors)})


def vectors_to_arrow(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """A float32 [n, d] array as an Arrow fixed-size-list column (readable by any Parquet tool)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])


def vectors_from_arrow(column: Any) -> np.ndarray:
    """Inverse of vectors_to_arrow (accepts a chunked column)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


def item_texts(items: pa.Table) -> pa.Table:
    """(item_id, text) for every item: the text the encoder sees for it."""
    cols = items.to_pydict()
    texts = [
        item_text(cols["title"][i], cols["brand"][i], cols["categories"][i], cols["description"][i])
        for i in range(items.num_rows)
    ]
    return pa.table({"item_id": items.column("item_id"), "text": pa.array(texts, pa.string())})


def event_texts(events: pa.Table) -> pa.Table:
    """(text_hash, text) for each distinct non-empty event text."""
    texts = pc.unique(pc.drop_null(events.column("text"))).to_pylist()
    texts = [t for t in texts if t]
    return pa.table({"text_hash": [text_hash(t) for t in texts], "text": pa.array(texts, pa.string())})


def encode_to_parquet(table: pa.Table, location: str, cfg: EncodeConfig, use_gpu: bool) -> int:
    """Encode a (key, text) table on a Ray Data actor pool and write (key, vector) Parquet.

    Returns the number of vectors written. The folder at `location` is replaced.
    """
    import ray

    from profilerec.cluster import encoder_actor_resources

    key = table.column_names[0]
    if not sys.stdout.isatty():  # logged progress: one summary line per interval, not one per operator
        ray.data.DataContext.get_current().enable_operator_progress_bars = False
    gpus = encoder_actor_resources(cfg, use_gpu)["GPU"]
    threads = None if gpus else max(1, round(cfg.num_cpus_per_actor))
    started = time.perf_counter()
    blocks = max(cfg.num_actors, table.num_rows // (cfg.batch_size * 8) or 1)
    encoded = ray.data.from_arrow(table).repartition(blocks).map_batches(
        EncodeBatch,
        fn_constructor_kwargs=dict(model=cfg.model, max_length=cfg.max_length, batch_size=cfg.batch_size,
                                   key=key, threads=threads),
        batch_size=cfg.batch_size * 8,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_gpus=gpus,
        num_cpus=cfg.num_cpus_per_actor,
    )
    fs, path = storage.resolve(location)
    storage.delete(location)
    encoded.write_parquet(path, filesystem=fs, mode="overwrite")
    seconds = time.perf_counter() - started
    log.info("encoded %d texts into %s in %.1f s (%.0f texts/s)", table.num_rows, location, seconds,
             table.num_rows / max(seconds, 1e-9))
    return table.num_rows


def run_encode(cfg: EncodeConfig, use_gpu: bool) -> dict[str, Any]:
    """The encode job: read prepared items/events, encode their texts, write embeddings Parquet."""
    from profilerec.datasets import read_prepared

    started = time.perf_counter()
    data = read_prepared(cfg.input)
    tables = {"items": item_texts(data.items)}
    if cfg.include_event_texts:
        tables["texts"] = event_texts(data.events)
    counts = {}
    for name, table in tables.items():
        location = storage.join(cfg.output, name)
        if table.num_rows == 0:
            storage.delete(location)
            counts[name] = 0
            continue
        counts[name] = encode_to_parquet(table, location, cfg, use_gpu)
    manifest = {
        "model": cfg.model,
        "max_length": cfg.max_length,
        "dim": int(read_embeddings(cfg.output, "items").column("vector").type.list_size),
        "counts": counts,
        "seconds": round(time.perf_counter() - started, 2),
    }
    storage.write_json(manifest, storage.join(cfg.output, "manifest.json"))
    return manifest


def read_embeddings(location: str, name: str = "items") -> pa.Table:
    """The (key, vector) table `name` ("items" or "texts") of an embeddings folder."""
    path = storage.join(location, name)
    if not storage.exists(path):
        if name == "texts":
            return pa.table({"text_hash": pa.array([], pa.string()), "vector": pa.array([], pa.list_(pa.float32(), 1))})
        raise DataError(f"no {name} embeddings at {path}: run jobs/encode.py first")
    return storage.read_table(path)

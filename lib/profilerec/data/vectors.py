"""The embeddings' file format: vectors as Arrow fixed-size lists, the item texts the encoder sees,
and reading the (key, vector) tables of an embeddings folder (written by batch/encode.py)."""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pyarrow as pa
from profilerec.data import storage
from profilerec.data.schema import item_text
from profilerec.errors import DataError


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


def items_title_repeats(embeddings: str) -> int:
    """How many times the title is in the texts the embeddings folder's items were encoded from
    (its manifest's `title_repeats`; 1 in a folder encoded before it was recorded): what an item
    learned while serving is encoded with, so that its vector is made like the catalog's."""
    return int(storage.read_json(storage.join(embeddings, "manifest.json")).get("title_repeats", 1))


def read_embeddings(location: str, name: str = "items") -> pa.Table:
    """The (key, vector) table `name` ("items" or "texts") of an embeddings folder."""
    if name == "texts" and not storage.exists(storage.join(location, name)):
        return pa.table({"text_hash": pa.array([], pa.string()), "vector": pa.array([], pa.list_(pa.float32(), 1))})
    return storage.read_table(_embeddings_path(location, name))


def item_embedding_chunks(location: str, rows: int) -> tuple[int, Iterator[pa.Table]]:
    """(vector size, the (item_id, vector) tables of `rows` rows each, read as they are consumed)
    of an embeddings folder's item vectors; DataError when it has none."""
    path = _embeddings_path(location, "items")
    dim = storage.read_schema(path).field("vector").type.list_size
    return dim, storage.iter_tables(path, rows, ["item_id", "vector"])


def _embeddings_path(location: str, name: str) -> str:
    """Where an embeddings folder keeps its table `name`; DataError when it has none."""
    path = storage.join(location, name)
    if not storage.exists(path):
        raise DataError(f"no {name} embeddings at {path}: run jobs/encode.py first")
    return path

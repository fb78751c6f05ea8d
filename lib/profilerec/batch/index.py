"""The index job: the nearest-neighbour index (model/ann.py) two-stage recommendations take their
candidates from, over the item vectors the trained scorer compares profiles with (the text
vectors through its projection), or over the text vectors when there is no scorer.

Output (under the job's output location): the index, the item id of each of its rows, a sample of
the vectors it was built from, and manifest.json: its kind and parameters, the number of items, the
build's seconds, and its recall@10 and recall@100 against exact search, measured on queries made
like user vectors (mixes of a few item vectors).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import faiss
import numpy as np
from profilerec.config import IndexConfig
from profilerec.data import storage
from profilerec.model.ann import HnswIndex, build_hnsw, write_index
from profilerec.model.recommend import load_profile_params, load_recommender
from profilerec.model.retrieval import ExactNearest

log = logging.getLogger(__name__)

RECALL_AT = (10, 100)


def run_index(cfg: IndexConfig) -> dict[str, Any]:
    """Build the index over the catalog of `cfg.input`, measure its recall, write it; returns the manifest."""
    items = storage.read_table(storage.join(cfg.input, "items.parquet"))
    recommender = load_recommender(items, cfg.embeddings, load_profile_params(cfg.model), model=cfg.model)
    vectors = recommender.item_matrix()
    log.info("building an HNSW index over %d item vectors of %d dimensions", len(vectors), vectors.shape[1])
    started = time.perf_counter()
    index = build_hnsw(vectors, cfg.connectivity, cfg.expansion_add, cfg.expansion_search, cfg.threads)
    build_seconds = time.perf_counter() - started
    recall = measured_recall(index, vectors, cfg.recall_queries)
    manifest = {
        "kind": "hnsw", "library": f"faiss {faiss.__version__}", "metric": "inner product",
        "vectors": "scorer" if recommender.scorer is not None else "text",
        "items": len(vectors), "dim": int(vectors.shape[1]), "connectivity": cfg.connectivity,
        "expansion_add": cfg.expansion_add, "build_seconds": round(build_seconds, 2),
        "recall_queries": cfg.recall_queries, **{f"recall@{k}": round(r, 4) for k, r in recall.items()},
    }
    return write_index(index, cfg.output, recommender.index.item_ids, vectors, manifest)


def measured_recall(index: HnswIndex, vectors: np.ndarray, queries: int, seed: int = 0) -> dict[int, float]:
    """Recall@k of `index` for each k of RECALL_AT: the share of the exact top k among the k it
    returns, over `queries` user-like queries (unit mixes of one to five random item vectors)."""
    rng = np.random.default_rng(seed)
    mixes = [vectors[rng.integers(0, len(vectors), rng.integers(1, 6))].sum(axis=0) for _ in range(queries)]
    q = np.stack(mixes).astype(np.float32)
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    exact = ExactNearest(vectors)
    recall = {}
    for k in RECALL_AT:
        k_found = min(k, len(vectors))
        # queries a few at a time: the exact products take queries x items floats
        truth = np.concatenate([exact.search(q[i:i + 64], k_found) for i in range(0, len(q), 64)])
        found = index.search(q, k_found)
        recall[k] = float(np.mean([len(set(t) & set(f)) / k_found for t, f in zip(truth, found)]))
    return recall

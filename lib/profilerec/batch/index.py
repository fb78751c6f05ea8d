"""The index job: the nearest-neighbour index (model/ann.py) two-stage recommendations take their
candidates from, over the item vectors the trained scorer compares profiles with (the text
vectors through its projection), or over the text vectors when there is no scorer.

How many clusters a search scans is chosen here, by measurement: the fewest for which the recall@100
of the queries the service will answer reaches `target_recall` against exact search. Those are the
user vectors of profiles replayed from the log (the histories of its validation cases: the test
split stays unread); a log without cases gets mixes of a few item vectors instead, a harder query
(they fall between the catalog's clusters), which costs more probes.

With `serving_state` (the service's state_dir) the index holds the items the service learned while
serving (PUT /v1/items) too, after the catalog's, in the order the service applies them; serving
processes swap a new build in without a restart (Recommender.load_rebuilt_index) and from then on
search exactly only the items changed after it.

Output (under the job's output location): the index, the item id of each of its rows, a sample of
the vectors it was built from, and manifest.json: its kind and parameters, the number of items, the
build's seconds, its recall@10 and recall@100 at the chosen probes, and `learned`: the fingerprint
of the service's items log it holds (0: none).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import faiss
import numpy as np
import pyarrow.compute as pc
from profilerec.config import IndexConfig
from profilerec.data.datasets import prepared_manifest, read_catalog, read_prepared_table
from profilerec.data.learned import ITEMS_LOG, VectorLog
from profilerec.model.ann import IvfIndex, build_ivf, write_index
from profilerec.model.recommend import Recommender, load_profile_params, load_recommender
from profilerec.model.replay import Case, case_states, iter_cases, user_sequences
from profilerec.model.retrieval import ExactNearest

log = logging.getLogger(__name__)

RECALL_AT = (10, 100)
PROBE_CHOICES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def run_index(cfg: IndexConfig) -> dict[str, Any]:
    """Build the index over the catalog of `cfg.input`, choose how many clusters a search scans,
    measure its recall, write it; returns the manifest."""
    recommender = load_recommender(read_catalog(cfg.input), cfg.embeddings, load_profile_params(cfg.model),
                                   model=cfg.model)
    learned = VectorLog(cfg.serving_state, ITEMS_LOG) if cfg.serving_state else None
    if learned is not None:
        # in the order the service applies them, so the rows are the serving processes' rows
        log.info("adding %d items learned while serving", recommender.apply_learned({ITEMS_LOG: learned}))
    vectors = recommender.item_matrix()
    index, manifest = built_index(vectors, cfg, profile_queries(recommender, cfg.input, cfg.recall_queries))
    manifest["vectors"] = "scorer" if recommender.scorer is not None else "text"
    # which of the items log's files the index holds (a serving process searches the rest exactly)
    manifest["learned"] = learned.fingerprint if learned is not None else 0
    return write_index(index, cfg.output, recommender.index.item_ids, vectors, manifest)


def built_index(vectors: np.ndarray, cfg: IndexConfig, queries: Optional[np.ndarray] = None
                ) -> tuple[IvfIndex, dict[str, Any]]:
    """The index over `vectors` with the probes `cfg` asks for (or the fewest reaching its target
    recall on `queries`, by default user_like_queries), and what was measured: build seconds,
    recall@10 and @100."""
    log.info("building an IVF index over %d item vectors of %d dimensions", len(vectors), vectors.shape[1])
    started = time.perf_counter()
    index = build_ivf(vectors, cfg.lists, threads=cfg.threads)
    build_seconds = time.perf_counter() - started
    kind = "profiles replayed from the log"
    if queries is None or not len(queries):
        queries, kind = user_like_queries(vectors, cfg.recall_queries), "mixes of item vectors"
    truth = exact_nearest(vectors, queries, max(RECALL_AT))
    index.probes = cfg.probes or fewest_probes(index, queries, truth, cfg.target_recall)
    manifest = {
        "kind": "ivf-pq-fastscan+rerank", "library": f"faiss {faiss.__version__}", "metric": "inner product",
        "items": len(vectors), "dim": int(vectors.shape[1]), "build_seconds": round(build_seconds, 2),
        "recall_queries": len(queries), "queries": kind,
        **{f"recall@{k}": round(recall(index, queries, truth, k), 4) for k in RECALL_AT},
    }
    return index, manifest


def profile_queries(recommender: Recommender, prepared: str, n: int) -> Optional[np.ndarray]:
    """The user vectors of up to `n` profiles replayed from the log of `prepared`: the histories of
    validation cases spread over the log (of any cases when it has none of that split), as the
    service would hold them; None when the log has no case."""
    cases = read_prepared_table(prepared, "cases")
    valid = cases.filter(pc.equal(cases.column("split"), "valid"))
    cases = valid if valid.num_rows else cases
    if not cases.num_rows:
        return None
    cases = cases.take(np.unique(np.linspace(0, cases.num_rows - 1, min(n, cases.num_rows)).astype(np.int64)))
    events = read_prepared_table(prepared, "events")
    sequences = user_sequences(events.filter(pc.is_in(events.column("user_id"),
                                                      value_set=pc.unique(cases.column("user_id")))))
    replayed = iter_cases(sequences, cases, set(cases.column("split").to_pylist()),
                          prepared_manifest(prepared).get("max_history"))
    return case_user_vectors(recommender, list(replayed))


def case_user_vectors(recommender: Recommender, cases: list[Case]) -> Optional[np.ndarray]:
    """The user vectors of the profiles the cases' histories build (those with an event); None
    when none has one."""
    states = [s for s in case_states(cases, recommender.vector_of, recommender.params, recommender.index.meta)
              if s.recent or s.long_sum is not None]
    return recommender.score_parts(states).user if states else None


def user_like_queries(vectors: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """`n` unit queries made like user vectors: mixes of one to five random item vectors."""
    rng = np.random.default_rng(seed)
    q = np.stack([vectors[rng.integers(0, len(vectors), rng.integers(1, 6))].sum(axis=0) for _ in range(n)])
    return (q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def exact_nearest(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """[queries, k] the exact nearest rows, a few queries at a time (the products take queries x items floats)."""
    exact = ExactNearest(vectors)
    return np.concatenate([exact.search(queries[i:i + 64], k) for i in range(0, len(queries), 64)])


def recall(index: IvfIndex, queries: np.ndarray, truth: np.ndarray, k: int, probes: Optional[int] = None) -> float:
    """Recall@k: the share of the exact top k (the first k of `truth`) among the k the index returns."""
    k = min(k, truth.shape[1])
    found = index.search(queries, k, probes=probes)
    return float(np.mean([len(set(t[:k]) & set(f)) / k for t, f in zip(truth, found)]))


def fewest_probes(index: IvfIndex, queries: np.ndarray, truth: np.ndarray, target: float) -> int:
    """The fewest clusters to scan (of PROBE_CHOICES, or all of them) for recall@100 >= `target`."""
    lists = int(index.index.nlist)
    for probes in (p for p in PROBE_CHOICES if p < lists):
        if recall(index, queries, truth, max(RECALL_AT), probes) >= target:
            return probes
    return lists

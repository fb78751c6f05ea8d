"""Which ANN library and index for million-item catalogs, by measurement: faiss HNSW, faiss IVF-Flat,
the project's own index (model/ann.py: faiss IVF-PQ fast-scan codes with an exact rerank) and
usearch HNSW side by side on catalogs grown from a demo work folder's item embeddings.

    python bench/ann_choice.py --work_dir /tmp/fresh/work --sizes 100000,1000000

The service would ask the index for a few hundred candidates (--k) for a user vector and rerank
them exactly, from serving replicas that share one memory-mapped copy of the index on a node. For
each catalog size (vectors from synthetic_catalog.grown_vectors, queries from query_vectors) and
each candidate it prints:

- build: seconds to build the index with --threads threads, and its file's size. HNSW graphs are
  built with --ef_construction (efConstruction, usearch's expansion_add), by default lower for
  the second size to keep its builds within the run; a sparser graph needs a larger search
  parameter for the same recall;
- param: the smallest search parameter (faiss HNSW efSearch, IVF nprobe, usearch
  expansion_search) on a grid whose recall@100 reaches --target;
- recall@10 / recall@100 at that parameter: the share of the exact top 10 / 100 (numpy inner
  products over the whole catalog) found among the k candidates, i.e. after the service's exact
  rerank; averaged over --queries queries;
- p50 / p99: latency of one query at a time with one thread, k candidates, as a request would ask;
- private MiB of a second process that opens the saved file and runs 100 queries, memory-mapped
  (faiss.read_index with IO_FLAG_MMAP(_IFC), usearch Index.restore(view=True)) and loaded into
  memory: Private_Clean + Private_Dirty from /proc/self/smaps_rollup, after less before opening.
  This process keeps the file mapped meanwhile, as the first replica would: a file page mapped by
  one process only is counted private too, so without a first mapper a mapped index would look
  like a private copy;
- filtered: recall@100 and p50 for a filter passing a random --filter_share of the items (a brand or
  category), against the exact filtered top 100: faiss with an IDSelectorBitmap in its search
  parameters and its own search parameter (the smallest on the grid from the unfiltered one up
  that reaches --target), usearch (no filter argument in its Python API) by over-fetching
  1.2 k / share candidates and dropping those the filter refuses.

Before the tables it checks on a small index what each library allows on a loaded and on a
memory-mapped index (adds, replacing a vector by key, filtered search); faiss aborts the process on
some of these, so they run in subprocesses. hnswlib is not measured: it has no wheel for this
platform.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
from machine import describe
from profilerec.data.vectors import read_embeddings, vectors_from_arrow
from profilerec.model.ann import build_ivf, exact_rerank, rerank_fetch
from synthetic_catalog import grown_vectors, query_vectors
from usearch.index import BatchMatches, Index

# The second process. It imports its library before the first reading so that only the index
# counts; argv: library, path, mode (mmap|load), search parameter, k, queries.npy.
CHILD = r"""
import json, sys, time
import numpy as np
lib, path, mode, param, k, qpath = sys.argv[1:7]
param, k = int(param), int(k)
queries = np.load(qpath)
if lib == "faiss":
    import faiss
    faiss.omp_set_num_threads(1)
else:
    from usearch.index import Index

def rollup():
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1])
    return fields

before = rollup()
started = time.perf_counter()
flags = "-"
if lib == "faiss":
    tries = [("0", 0)]
    if mode == "mmap":
        # IVF refuses the pair (its mapped lists need a plain file reader); HNSW takes it
        tries = [("IO_FLAG_MMAP|IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP | faiss.IO_FLAG_MMAP_IFC),
                 ("IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP_IFC), ("IO_FLAG_MMAP", faiss.IO_FLAG_MMAP)]
    for flags, value in tries:
        try:
            index = faiss.read_index(path, value)
            break
        except RuntimeError:
            continue
    params = (faiss.SearchParametersIVF(nprobe=param) if hasattr(index, "nprobe")
              else faiss.SearchParametersHNSW(efSearch=param))
    opened = time.perf_counter() - started
    for q in queries:
        index.search(q[None, :], k, params=params)
else:
    index = Index.restore(path, view=mode == "mmap")
    index.expansion_search = param
    opened = time.perf_counter() - started
    for q in queries:
        index.search(q, k, threads=1)
after = rollup()
private = lambda r: r["Private_Clean"] + r["Private_Dirty"]
print(json.dumps({"private_mib": (private(after) - private(before)) / 1024,
                  "anonymous_mib": (after["Anonymous"] - before["Anonymous"]) / 1024,
                  "open_s": opened, "flags": flags}))
"""

# Capability probes in a subprocess: a faiss assertion on a mapped index aborts the whole process.
# argv: library, path, mode; prints what happened to an add of two vectors.
ADD_PROBE = r"""
import sys
import numpy as np
lib, path, mode = sys.argv[1:4]
if lib == "faiss":
    import faiss
    flags = {"load": 0, "mmap": faiss.IO_FLAG_MMAP_IFC, "ondisk": faiss.IO_FLAG_MMAP}[mode]
    index = faiss.read_index(path, flags)
    x = np.random.default_rng(0).normal(size=(2, index.d)).astype(np.float32)
    before = index.ntotal
    try:
        index.add(x)
        print(f"yes ({before} -> {index.ntotal})")
    except RuntimeError as e:
        print("no: " + str(e).strip().splitlines()[-1])
else:
    from usearch.index import Index
    index = Index.restore(path, view=mode == "mmap")
    x = np.random.default_rng(0).normal(size=(2, index.ndim)).astype(np.float32)
    before = len(index)
    try:
        index.add(np.array([10**9, 10**9 + 1], dtype=np.uint64), x)
        print(f"yes ({before} -> {len(index)})")
    except (RuntimeError, ValueError) as e:
        print(f"no: {type(e).__name__}: {e}")
"""


@dataclass
class Candidate:
    """One library and index configuration: how to build, save, search and open it."""

    name: str
    lib: str  # "faiss" or "usearch"
    kind: str  # "hnsw", "ivf", "ivf-pq" (model/ann.py's build_ivf and rerank) or "usearch"
    grid: list[int]
    dtype: str = "f32"
    connectivity: int = 32

    def build(self, vectors: np.ndarray, ef_construction: int, threads: int) -> Any:
        """The index over all rows of `vectors`, item i under key i."""
        n, dim = vectors.shape
        if self.kind == "hnsw":
            faiss.omp_set_num_threads(threads)
            index = faiss.IndexHNSWFlat(dim, self.connectivity, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
            index.add(vectors)
            return index
        if self.kind == "ivf-pq":
            return build_ivf(vectors, threads=threads)
        if self.kind == "ivf":
            faiss.omp_set_num_threads(threads)
            nlist = int(round(4 * np.sqrt(n)))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            # faiss's default k-means (up to 256 points per list, 25 rounds) is about 20 times the
            # arithmetic of 40 points per list (faiss warns below 39) and 8 rounds, which place
            # centroids well enough to probe
            index.cp.niter = 8
            sample = np.random.default_rng(0).choice(n, size=min(n, 40 * nlist), replace=False)
            index.train(vectors[np.sort(sample)])
            index.add(vectors)
            return index
        index = Index(ndim=dim, metric="ip", dtype=self.dtype, connectivity=self.connectivity,
                      expansion_add=ef_construction)
        index.add(np.arange(n, dtype=np.uint64), vectors, threads=threads)
        return index

    def save(self, index: Any, path: str) -> None:
        """Write the index to `path`."""
        if self.kind == "ivf-pq":
            faiss.write_index(index.index, path)
        elif self.lib == "faiss":
            faiss.write_index(index, path)
        else:
            index.save(path)

    def search(self, index: Any, queries: np.ndarray, k: int, param: int, threads: int,
               selector: Any = None) -> np.ndarray:
        """[len(queries), k] item keys, -1 where fewer than k were found."""
        if self.kind == "ivf-pq":  # as IvfIndex.search, with the bench's selector
            faiss.omp_set_num_threads(threads)
            params = faiss.SearchParametersIVF(nprobe=param, sel=selector)
            rows = index.index.search(queries, rerank_fetch(k), params=params)[1]
            return exact_rerank(rows, queries, index.rerank, k)
        if self.lib == "faiss":
            faiss.omp_set_num_threads(threads)
            params = (faiss.SearchParametersIVF(nprobe=param, sel=selector) if self.kind == "ivf"
                      else faiss.SearchParametersHNSW(efSearch=param, sel=selector))
            return index.search(queries, k, params=params)[1]
        index.expansion_search = param
        matches = index.search(queries, k, threads=threads)
        keys = np.full((len(queries), k), -1, dtype=np.int64)
        if not isinstance(matches, BatchMatches):  # one query row gets a plain Matches back
            keys[0, :len(matches.keys)] = matches.keys
            return keys
        for i in range(len(queries)):
            found = int(matches.counts[i])
            keys[i, :found] = matches.keys[i, :found]
        return keys


# From k up: faiss HNSW returns fewer than k items when efSearch < k (usearch searches with k anyway).
HNSW_GRID = [300, 400, 600, 800, 1200, 1600, 2400, 3200, 4800]
IVF_GRID = [8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768]
CANDIDATES = [
    Candidate("faiss HNSWFlat M32", "faiss", "hnsw", HNSW_GRID),
    Candidate("faiss IVF-Flat", "faiss", "ivf", IVF_GRID),
    *[Candidate(f"usearch {dtype} c{c}", "usearch", "usearch", HNSW_GRID, dtype, c)
      for dtype, c in [("f32", 16), ("f16", 16), ("f32", 32), ("f16", 32)]],
    Candidate("IVF-PQ4fs + rerank", "faiss", "ivf-pq", IVF_GRID),  # last: capabilities() probes the first three
]


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int, mask: np.ndarray | None = None) -> np.ndarray:
    """[len(queries), k] keys of the exact top-k inner products, best first (rows passing `mask`)."""
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_keys = np.zeros((len(queries), 0), dtype=np.int64)
    step = 131072
    for start in range(0, len(vectors), step):
        chunk = queries @ vectors[start:start + step].T
        if mask is not None:
            chunk[:, ~mask[start:start + step]] = -np.inf
        chunk_keys = np.broadcast_to(np.arange(start, start + chunk.shape[1]), chunk.shape)
        scores = np.concatenate([best_scores, chunk], axis=1)
        keys = np.concatenate([best_keys, chunk_keys], axis=1)
        top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
        best_scores = np.take_along_axis(scores, top, axis=1)
        best_keys = np.take_along_axis(keys, top, axis=1)
    order = np.argsort(-best_scores, axis=1)
    return np.take_along_axis(best_keys, order, axis=1)


def recall(found: np.ndarray, truth: np.ndarray, r: int) -> float:
    """Mean share of each query's exact top r among its found keys (whatever their order)."""
    return float(np.mean([np.isin(truth[i, :r], found[i]).mean() for i in range(len(truth))]))


def latencies_ms(search_one: Any, queries: np.ndarray) -> tuple[float, float]:
    """p50 and p99 in ms of search_one(query) over the queries, one at a time."""
    times = []
    for q in queries:
        started = time.perf_counter()
        search_one(q[None, :])
        times.append(time.perf_counter() - started)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def open_in_child(candidate: Candidate, path: str, mode: str, param: int, k: int, qpath: str) -> dict:
    """What a fresh process that opens `path` (mapped or loaded) and runs the queries holds privately."""
    out = subprocess.run([sys.executable, "-c", CHILD, candidate.lib, path, mode, str(param), str(k), qpath],
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        return {"private_mib": float("nan"), "anonymous_mib": float("nan"), "open_s": float("nan"),
                "flags": f"failed ({out.returncode}): {out.stderr.strip().splitlines()[-1:]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def hold_mapped(path: str) -> np.memmap:
    """The file mapped into this process with every page touched, as a first replica would hold it."""
    held = np.memmap(path, dtype=np.uint8, mode="r")
    int(held[::4096].sum())
    return held


def short(message: str) -> str:
    """The reason in a faiss error or assertion, without its C++ signature and source location."""
    message = message.strip().splitlines()[-1] if message.strip() else "?"
    if "details:" in message:
        head = message.split(" failed")[0].replace("Faiss assertion", "assertion")
        return f"{head} failed: {message.split('details:')[-1].strip()}"
    return message.split(": ")[-1] if " at /" in message else message


def capabilities(tmp: str, dim: int) -> None:
    """Check on a small index what each library allows on a loaded and on a memory-mapped index."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    new = rng.normal(size=dim).astype(np.float32)
    new /= np.linalg.norm(new)
    mask = rng.random(len(x)) < 0.1
    bitmap = np.packbits(mask, bitorder="little")
    rows = []

    def probe(lib: str, path: str, mode: str) -> str:
        out = subprocess.run([sys.executable, "-c", ADD_PROBE, lib, path, mode], capture_output=True, text=True)
        if out.returncode < 0:
            last = [line for line in out.stderr.splitlines() if "assertion" in line.lower() or "what()" in line]
            return f"no: process killed by signal {-out.returncode} ({short((last or ['?'])[-1])})"
        return "no: " + short(out.stdout) if out.stdout.startswith("no:") and " at /" in out.stdout else out.stdout.strip()

    for candidate in CANDIDATES[:3]:
        index = candidate.build(x, 40, 2)
        path = os.path.join(tmp, f"probe-{candidate.kind}")
        candidate.save(index, path)
        label = {"hnsw": "faiss IndexHNSWFlat", "ivf": "faiss IndexIVFFlat", "usearch": "usearch Index"}[candidate.kind]
        rows.append((label, "add to loaded index", probe(candidate.lib, path, "load")))
        if candidate.lib == "faiss":
            rows.append((label, "add to IO_FLAG_MMAP_IFC index", probe(candidate.lib, path, "mmap")))
            if candidate.kind == "ivf":
                rows.append((label, "add to IO_FLAG_MMAP (OnDiskInvertedLists) index", probe(candidate.lib, path, "ondisk")))
        else:
            rows.append((label, "add to Index.restore(view=True)", probe(candidate.lib, path, "mmap")))
        # replacing item 7's vector under the same key
        if candidate.lib == "faiss":
            try:
                index.remove_ids(np.array([7], dtype=np.int64))
                index.add_with_ids(new[None, :], np.array([7], dtype=np.int64))
                top = candidate.search(index, new[None, :], 1, 16, 1)[0, 0]
                replaced = f"yes: remove_ids + add_with_ids; search for the new vector finds id {top}"
            except RuntimeError as e:
                replaced = "no: " + short(str(e))
        else:
            index.remove(7)
            index.add(7, new)
            top = int(index.search(new, 1).keys[0])
            replaced = (f"yes: remove(key) + add(key, vector); get(7) is the new vector: "
                        f"{np.allclose(index.get(7), new, atol=1e-3)}; search finds key {top}")
        rows.append((label, "replace a vector by key", replaced))
        if candidate.lib == "faiss":
            selector = faiss.IDSelectorBitmap(len(x), faiss.swig_ptr(bitmap))
            params = (faiss.SearchParametersIVF(nprobe=16, sel=selector) if candidate.kind == "ivf"
                      else faiss.SearchParametersHNSW(efSearch=64, sel=selector))
            found = index.search(x[:20], 50, params=params)[1]
            ok = bool(mask[found[found >= 0]].all())
            batch = faiss.IDSelectorBatch(np.flatnonzero(mask).astype(np.int64))
            params.sel = batch
            found_batch = index.search(x[:20], 50, params=params)[1]
            ok_batch = bool(mask[found_batch[found_batch >= 0]].all())
            filtered = (f"yes: search(q, k, params=SearchParameters{'IVF' if candidate.kind == 'ivf' else 'HNSW'}(sel=...)); "
                        f"IDSelectorBitmap only passing ids: {ok}, IDSelectorBatch: {ok_batch}")
        else:
            names = [p for p in inspect.signature(Index.search).parameters if p != "self"]
            lower = [p for p in names if "filter" in p or "pred" in p or "mask" in p]
            filtered = f"{'yes: ' + ', '.join(lower) if lower else 'no filter argument'}: Index.search({', '.join(names)})"
        rows.append((label, "filtered search", filtered))
    width = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    print("\nwhat each library allows (checked on a 4000-vector index):")
    for label, what, answer in rows:
        print(f"  {label:<{width[0]}}  {what:<{width[1]}}  {answer}")


def run_size(args: argparse.Namespace, base: np.ndarray, n: int, ef_construction: int, tmp: str) -> None:
    """Build, tune and measure every candidate on a catalog of n grown vectors; print the table."""
    started = time.perf_counter()
    vectors = grown_vectors(base, n, seed=0)
    sample = vectors[np.random.default_rng(2).choice(n, size=min(n, 10000), replace=False)]
    nearest = np.percentile((sample @ base.T).max(axis=1), [10, 50, 90])
    queries = query_vectors(vectors, args.queries, seed=1)
    qpath = os.path.join(tmp, "queries.npy")
    np.save(qpath, queries[:100])
    truth = exact_top(vectors, queries, 100)
    mask = np.random.default_rng(3).random(n) < args.filter_share
    filtered_truth = exact_top(vectors, queries, 100, mask)
    bitmap = np.packbits(mask, bitorder="little")
    print(f"\n=== {n:,} items x {vectors.shape[1]} (grown from {len(base)} real; nearest real item cosine "
          f"p10/p50/p90 {nearest[0]:.2f}/{nearest[1]:.2f}/{nearest[2]:.2f}), {args.queries} queries, k={args.k}, "
          f"efConstruction/expansion_add {ef_construction}, build threads {args.threads}; "
          f"ground truth in {time.perf_counter() - started:.0f} s")
    rows = []
    for candidate in CANDIDATES:
        if args.only and not any(s in candidate.name for s in args.only.split(",")):
            continue
        t0 = time.perf_counter()
        index = candidate.build(vectors, ef_construction, args.threads)
        build_s = time.perf_counter() - t0
        path = os.path.join(tmp, "index")
        candidate.save(index, path)
        size_mib = os.path.getsize(path) / 2**20
        sweep = []
        for param in candidate.grid:
            found = candidate.search(index, queries, args.k, param, args.threads)
            sweep.append((param, recall(found, truth, 100)))
            if sweep[-1][1] >= args.target:
                break
        param = sweep[-1][0]
        found = candidate.search(index, queries, args.k, param, args.threads)
        r10, r100 = recall(found, truth, 10), recall(found, truth, 100)
        p50, p99 = latencies_ms(lambda q: candidate.search(index, q, args.k, param, 1), queries)

        if candidate.lib == "faiss":
            # the selector leaves fewer close items to reach, so filtered search tunes its own parameter
            selector = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bitmap))
            for f_param in [p for p in candidate.grid if p >= param]:
                filtered = candidate.search(index, queries, args.k, f_param, args.threads, selector)
                if recall(filtered, filtered_truth, 100) >= args.target:
                    break
            f_p50, _ = latencies_ms(lambda q: candidate.search(index, q, args.k, f_param, 1, selector), queries)
        else:
            fetch = int(np.ceil(args.k / args.filter_share * 1.2))
            f_param = max(param, fetch)

            def over_fetch(q: np.ndarray, threads: int) -> np.ndarray:
                keys = candidate.search(index, q, fetch, f_param, threads)
                out = np.full((len(q), args.k), -1, dtype=np.int64)
                for i, row in enumerate(keys):
                    kept = row[(row >= 0) & mask[np.maximum(row, 0)]][:args.k]
                    out[i, :len(kept)] = kept
                return out

            filtered = over_fetch(queries, args.threads)
            f_p50, _ = latencies_ms(lambda q: over_fetch(q, 1), queries)
        f_r100 = recall(filtered, filtered_truth, 100)
        index = None  # the build's memory back before the next candidate's
        held = hold_mapped(path)
        mapped = open_in_child(candidate, path, "mmap", param, args.k, qpath)
        loaded = open_in_child(candidate, path, "load", param, args.k, qpath)
        del held
        os.remove(path)
        rows.append((candidate.name, build_s, size_mib, param, r10, r100, p50, p99, mapped, loaded, f_param, f_r100, f_p50))
        print(f"  {candidate.name}: built in {build_s:.0f} s; recall@100 by parameter "
              + ", ".join(f"{p}: {r:.3f}" for p, r in sweep)
              + f"; mapped with {mapped['flags']}; anonymous MiB of the second process mapped "
              f"{mapped['anonymous_mib']:.0f}, loaded {loaded['anonymous_mib']:.0f}", flush=True)

    header = (f"{'candidate':<20} {'build s':>7} {'file MiB':>8} {'param':>5} {'rec@10':>6} {'rec@100':>7} "
              f"{'p50 ms':>6} {'p99 ms':>6} {'mmap priv':>9} {'load priv':>9} {'mmap open s':>11} {'load open s':>11} "
              f"{'filt param':>10} {'filt rec@100':>12} {'filt p50':>8}")
    print(f"\n{n:,} items: param = efSearch (faiss HNSW), nprobe (IVF), expansion_search (usearch); "
          f"priv = MiB private to a second process after opening and 100 queries; "
          f"filt = a filter passing {args.filter_share:.0%} of items (param: faiss's own parameter for it, "
          f"usearch's expansion_search and count of its over-fetch)")
    print(header)
    for name, build_s, size_mib, param, r10, r100, p50, p99, mapped, loaded, f_param, f_r100, f_p50 in rows:
        print(f"{name:<20} {build_s:>7.0f} {size_mib:>8.0f} {param:>5} {r10:>6.3f} {r100:>7.3f} {p50:>6.2f} {p99:>6.2f} "
              f"{mapped['private_mib']:>9.0f} {loaded['private_mib']:>9.0f} {mapped['open_s']:>11.2f} "
              f"{loaded['open_s']:>11.2f} {f_param:>10} {f_r100:>12.3f} {f_p50:>8.2f}")
    print(f"({n:,} items done in {time.perf_counter() - started:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="/tmp/fresh/work", help="a work folder built by `profilerec demo`")
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--ef_construction", default="80,40",
                        help="HNSW efConstruction (usearch expansion_add): one value, or one per size")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--k", type=int, default=300, help="candidates a request asks for")
    parser.add_argument("--target", type=float, default=0.95, help="recall@100 the search parameter must reach")
    parser.add_argument("--threads", type=int, default=2, help="build threads")
    parser.add_argument("--filter_share", type=float, default=0.1)
    parser.add_argument("--only", default="", help="comma-separated parts of candidate names to run")
    args = parser.parse_args()

    print(f"machine: {describe()}")
    print(f"faiss {faiss.__version__}, usearch {__import__('usearch').__version__}, numpy {np.__version__}")
    table = read_embeddings(f"{args.work_dir}/embeddings/base", "items")
    base = vectors_from_arrow(table.column("vector"))
    sizes = [int(s) for s in args.sizes.split(",")]
    efs = [int(s) for s in args.ef_construction.split(",")]
    efs = efs * len(sizes) if len(efs) == 1 else efs
    with tempfile.TemporaryDirectory(prefix="ann_choice-") as tmp:
        capabilities(tmp, base.shape[1])
        for n, ef in zip(sizes, efs):
            run_size(args, base, n, ef, tmp)


if __name__ == "__main__":
    main()

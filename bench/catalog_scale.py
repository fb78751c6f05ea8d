"""Cost against catalog size: what grows when the catalog does, side by side at each size.

    python bench/catalog_scale.py --work_dir work --sizes 10000,100000,1000000   # after `profilerec demo`

For each size a catalog is grown from the work folder's real item vectors (synthetic_catalog.py:
each item mostly one real item, mixed with another, plus noise; it takes that real item's brand,
categories and title), and a log of --users users over it: the work folder's real user
sequences, every real item replaced by one of the items grown from it, so the catalog's
transitions keep the real ones' shape. The model is the work folder's trained scorer and its
second stage over the grown catalog (their weights do not depend on the catalog: no ID
embeddings), the item priors are counted over the synthetic log.

Each stage runs in its own process, so its peak resident memory is its own:

- index: the index build of `profilerec index` (build seconds, the probes it chooses, recall@10/@100
  against exact search at them);
- recommend: one profile at a time on one thread, as a serving replica scores a request, by
  scoring every item (exact) and two-stage; p50/p99, and the share of the exact top-10 that the
  two-stage top-10 has; also with a brand filter;
- train-full, train-sampled: seconds per step of the scorer (batch 128) with the full and the
  sampled softmax;
- evaluate: the full ranking of --cases cases (ranked in chunks bounded by the catalog's size),
  and the two-stage ranking of the same cases, seconds;
- serve: the service over HTTP, measured by bench/serve_bench.py (open loop at 100 requests/s,
  alternating with a no-op Serve deployment, the floor) on a work folder laid out as
  `profilerec demo` leaves it over the grown catalog (the real prepare, profiles and index jobs;
  retrieval.mode auto: two-stage from 100k items); the recommendation p50/p99, their ratios to the
  floor's, and the resident memory of each serving process at the end.

Last, the ratios of the largest catalog's figures to the smallest's, and the catalog goals at the
largest size, each with whether it holds: service p50 at most 1.5x its p50 at the smallest size
and 2x the floor's, p99 at most 3x the floor's; two-stage top-10 sharing at least 0.95 with the
exact top-10; a sampled training step at most 1.5x the smallest size's, in at most 4 GiB; at most
1 GiB of anonymous memory in an Ingress replica (its own: the item vectors it maps are the node's).

Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

import numpy as np
import pyarrow as pa
from machine import describe  # bench/machine.py (the script's folder is on sys.path)
from serve_bench import MEMORY_LINE
from synthetic_catalog import grown_with_parents

STAGES = ("index", "recommend", "train-full", "train-sampled", "evaluate", "serve")
THREADS = {"recommend": 1}  # a serving replica scores a request on one thread
STEPS = 16  # training steps of batch 128 timed in the train stages


def grow_catalog(work_dir: str, size: int, users: int, folder: str, seed: int = 0) -> None:
    """The catalog of `size` items and the log of `users` users, written to `folder`."""
    from profilerec.data import storage
    from profilerec.data.datasets import read_prepared
    from profilerec.data.vectors import read_embeddings, vectors_from_arrow

    data = read_prepared(storage.join(work_dir, "prepared"))
    table = read_embeddings(storage.join(work_dir, "embeddings", "base"), "items")
    real_ids = table.column("item_id").to_pylist()
    vectors, parents = grown_with_parents(vectors_from_arrow(table.column("vector")), size, seed)
    meta = {row["item_id"]: row for row in data.items.to_pylist()}
    items = [{**meta[real_ids[p]], "item_id": f"g{i}", "title": f"{meta[real_ids[p]]['title'] or ''} #{i}"}
             for i, p in enumerate(parents)]
    os.makedirs(folder, exist_ok=True)
    np.save(os.path.join(folder, "vectors.npy"), vectors)
    storage.write_table(pa.Table.from_pylist(items, schema=data.items.schema), os.path.join(folder, "items.parquet"))
    # each real item's grown children, to draw from when a real sequence names it
    order = np.argsort(parents, kind="stable")
    starts = np.searchsorted(parents[order], np.arange(len(real_ids) + 1))
    row_of_real = {item_id: r for r, item_id in enumerate(real_ids)}
    real = {}
    for user, item in zip(data.events.column("user_id").to_pylist(), data.events.column("item_id").to_pylist()):
        if item in row_of_real:
            real.setdefault(user, []).append(row_of_real[item])
    sequences = [s for s in real.values() if len(s) >= 2]
    rng = np.random.default_rng(seed)
    rows = {"event_id": [], "user_id": [], "item_id": [], "type": [], "ts": []}
    for u in range(users):
        for n, r in enumerate(sequences[u % len(sequences)]):
            children = order[starts[r]:starts[r + 1]]
            if not len(children):
                continue
            rows["event_id"].append(f"u{u}:{n}")
            rows["user_id"].append(f"u{u}")
            rows["item_id"].append(f"g{children[rng.integers(len(children))]}")
            rows["type"].append("purchase")
            rows["ts"].append(1_600_000_000.0 + 86_400.0 * n)
    storage.write_table(pa.table(rows), os.path.join(folder, "events.parquet"))


def load_catalog(work_dir: str, folder: str) -> tuple[Any, dict]:
    """The Recommender over a grown catalog (the work folder's scorer and its second stage, priors of
    the synthetic log) and the log's user sequences."""
    from profilerec.data import storage
    from profilerec.data.schema import Event
    from profilerec.model.index import ItemIndex
    from profilerec.model.priors import item_priors
    from profilerec.model.recommend import Recommender, load_profile_params, scorer_folder
    from profilerec.model.scorer import load_scorer
    from profilerec.model.second_stage import load_second_stage

    items = storage.read_table(os.path.join(folder, "items.parquet"))
    index = ItemIndex(items.column("item_id").to_pylist(), np.load(os.path.join(folder, "vectors.npy")),
                      items.column("brand").to_pylist(), items.column("categories").to_pylist(),
                      items.column("title").to_pylist())
    events = storage.read_table(os.path.join(folder, "events.parquet")).to_pydict()
    sequences: dict[str, list] = {}
    for event_id, user, item, kind, ts in zip(*(events[k] for k in ("event_id", "user_id", "item_id", "type", "ts"))):
        sequences.setdefault(user, []).append(Event(event_id=event_id, user_id=user, item_id=item, type=kind, ts=ts))
    model = storage.join(work_dir, "model")
    priors = item_priors(sequences, index)
    scorer = load_scorer(scorer_folder(model), index.item_ids, index.vectors, priors)
    return Recommender(index, load_profile_params(model), priors=priors, scorer=scorer,
                       second_stage=load_second_stage(scorer_folder(model))), sequences


def last_item_cases(sequences: dict, n: int) -> list:
    """Each user's last item as a target, after at most 10 earlier events (the Amazon protocol's
    history), for the first `n` users."""
    from profilerec.model.replay import Case

    return [Case(user, "test", seq[-1].item_id, seq[max(0, len(seq) - 11):-1])
            for user, seq in list(sequences.items())[:n]]


def serve_work_folder(work_dir: str, folder: str) -> str:
    """A work folder over the grown catalog in `folder`, laid out as `profilerec demo` leaves it
    (prepared, embeddings/base, model, profiles, index), made by the jobs themselves."""
    import shutil

    from profilerec.batch.index import run_index
    from profilerec.batch.profiles import run_profiles
    from profilerec.config import IndexConfig, PrepareConfig, ProfilesConfig
    from profilerec.data import storage
    from profilerec.data.datasets import prepare
    from profilerec.data.vectors import vectors_to_arrow

    work = os.path.join(folder, "work")
    shutil.rmtree(work, ignore_errors=True)
    prepared, embeddings, model = (os.path.join(work, p) for p in ("prepared", "embeddings/base", "model"))
    prepare(PrepareConfig(source="generic", input=folder, events_file="events.parquet", items_file="items.parquet",
                          output=prepared))
    items = storage.read_table(os.path.join(folder, "items.parquet")).column("item_id")
    vectors = vectors_to_arrow(np.load(os.path.join(folder, "vectors.npy")))
    storage.write_table(pa.table({"item_id": items, "vector": vectors}),
                        os.path.join(embeddings, "items", "part-0.parquet"))
    # the encoder that made the real vectors encodes the items and texts the service learns
    shutil.copy(os.path.join(work_dir, "embeddings", "base", "manifest.json"),
                os.path.join(embeddings, "manifest.json"))
    shutil.copytree(os.path.join(work_dir, "model"), model)
    run_profiles(ProfilesConfig(input=prepared, embeddings=embeddings, model=model,
                                output=os.path.join(work, "profiles")))
    built = os.path.join(folder, "index")  # the index stage's, over the same vectors in the same order
    if os.path.exists(os.path.join(built, "manifest.json")):
        shutil.copytree(built, os.path.join(work, "index"))
    else:
        run_index(IndexConfig(input=prepared, embeddings=embeddings, model=model, output=os.path.join(work, "index")))
    return work


def served(work: str, seconds: float, ingress_replicas: int) -> dict[str, Any]:
    """bench/serve_bench.py's figures on `work`: recommendation and floor p50/p99, and the resident
    memory of every serving process while it ran."""
    bench = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve_bench.py")
    done = subprocess.run([sys.executable, bench, "--work_dir", work, "--seconds", str(seconds),
                           "--ingress_replicas", str(ingress_replicas)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"serve_bench failed:\n{done.stderr[-3000:]}")
    out: dict[str, Any] = {}
    for line in done.stdout.splitlines():
        for key, prefix in (("floor", "1. no-op"), ("recommend", "2. recommendations")):
            if line.startswith(prefix):
                p50, p99 = (float(line.split(f"{q} ")[1].split()[0]) for q in ("p50", "p99"))
                out[f"{key} p50 ms"], out[f"{key} p99 ms"] = p50, p99
        if line.startswith(("CPU per request", "recommendation reads")):  # where a request's time goes
            key, value = line.split(":", 1)
            out[key] = value.strip()
        if line.startswith(MEMORY_LINE):
            for part in line[len(MEMORY_LINE):].split(", "):
                kind, sizes = part.rsplit(" ", 1)
                out[f"{kind} MiB resident/private/anonymous"] = sizes
    out["p50 / floor"] = out["recommend p50 ms"] / out["floor p50 ms"]
    out["p99 / floor"] = out["recommend p99 ms"] / out["floor p99 ms"]
    return out


def run_stage(stage: str, work_dir: str, folder: str, cases: int, seconds: float = 30.0,
              ingress_replicas: int = 1) -> dict[str, Any]:
    """One stage on the catalog in `folder` (in this process); returns its figures."""
    import torch
    from profilerec.model.ann import read_index, write_index
    from profilerec.model.ranking import case_ranks, two_stage_ranks
    from profilerec.model.replay import case_states
    from profilerec.model.retrieval import Retrieval

    if stage == "serve":
        return served(serve_work_folder(work_dir, folder), seconds, ingress_replicas)
    torch.set_num_threads(THREADS.get(stage, 2))
    recommender, sequences = load_catalog(work_dir, folder)
    index_folder = os.path.join(folder, "index")
    out: dict[str, Any] = {}
    if stage == "index":
        from profilerec.batch.index import built_index, case_user_vectors
        from profilerec.config import IndexConfig

        matrix = recommender.item_matrix()
        # the queries the index job measures recall on: profiles replayed from the log
        queries = case_user_vectors(recommender, last_item_cases(sequences, 500))
        index, manifest = built_index(matrix, IndexConfig(recall_queries=500, threads=2), queries)
        out.update({k: manifest[k] for k in ("build_seconds", "recall@10", "recall@100")})
        out.update(lists=int(index.index.nlist), probes=index.probes)
        write_index(index, index_folder, recommender.index.item_ids, matrix, manifest)
    elif stage == "recommend":
        import faiss

        faiss.omp_set_num_threads(1)
        retrieval = Retrieval(read_index(index_folder, recommender.index.item_ids, recommender.item_matrix()))
        states = case_states(last_item_cases(sequences, 300), recommender.vector_of, recommender.params,
                             recommender.index.meta)
        brand = next(b for b in recommender.index.details.base["brand"].to_pylist() if b)
        for name, request in (("", {}), (" brand", {"brand": brand})):
            answers = {}
            for mode, with_retrieval in (("exact", None), ("two-stage", retrieval)):
                recommender.retrieval = with_retrieval
                recommender.recommend(states[0], k=10, **request)  # first-use caches
                times, answers[mode] = [], []
                for state in states:
                    started = time.perf_counter()
                    answers[mode].append({i["item_id"] for i in recommender.recommend(state, k=10, **request)})
                    times.append(time.perf_counter() - started)
                out[f"{mode}{name} p50 ms"] = 1000 * float(np.percentile(times, 50))
                out[f"{mode}{name} p99 ms"] = 1000 * float(np.percentile(times, 99))
            out[f"top-10 agreement{name}"] = float(np.mean([len(a & b) / max(len(a), 1) for a, b in
                                                             zip(answers["exact"], answers["two-stage"])]))
    elif stage in ("train-full", "train-sampled"):
        from profilerec.model.scorer import ProfileScorer
        from profilerec.training.scorer import case_tensors, train_epoch

        scorer = recommender.scorer
        loss = stage.split("-")[1]
        # a full-softmax step over a large catalog takes seconds: fewer of them tell as much
        steps = STEPS if loss == "sampled" or len(recommender.index) < 200_000 else 3
        data = case_tensors(recommender, last_item_cases(sequences, 128 * (steps + 1)), scorer.params)
        model = ProfileScorer(recommender.index.vectors, recommender.priors, recommender.params.window, scorer.params)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        generator = torch.Generator().manual_seed(0)
        warm_up, timed = (type(data)(*data.take(torch.arange(a, min(b, len(data))))) for a, b in
                          ((0, 128), (128, 128 * (steps + 1))))
        train_epoch(model, optimizer, warm_up, 128, generator, loss=loss)  # torch's one-time set-up
        started = time.perf_counter()
        train_epoch(model, optimizer, timed, 128, generator, loss=loss)
        out["s/step"] = (time.perf_counter() - started) / -(-len(timed) // 128)
        out["steps"] = -(-len(timed) // 128)
    elif stage == "evaluate":
        eval_cases = last_item_cases(sequences, cases)
        started = time.perf_counter()
        case_ranks(recommender, eval_cases)
        out["exact s"] = time.perf_counter() - started
        recommender.retrieval = Retrieval(read_index(index_folder, recommender.index.item_ids,
                                                     recommender.item_matrix()))
        started = time.perf_counter()
        two_stage_ranks(recommender, eval_cases)
        out["two-stage s"] = time.perf_counter() - started
    out["peak RSS MiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="work", help="a work folder built by `profilerec demo`")
    parser.add_argument("--sizes", default="10000,100000,1000000", help="catalog sizes, comma-separated")
    parser.add_argument("--users", type=int, default=20_000, help="users of the synthetic log")
    parser.add_argument("--cases", type=int, default=1000, help="cases the evaluate stage ranks")
    parser.add_argument("--stages", default=",".join(STAGES), help="stages to run, comma-separated")
    parser.add_argument("--serve_seconds", type=float, default=30.0, help="serve_bench.py's --seconds")
    parser.add_argument("--ingress_replicas", type=int, default=1,
                        help="serve_bench.py's --ingress_replicas (serve/config.yaml autoscales 1-4)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # one stage in this process (the children)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(run_stage(args.stage, args.work_dir, args.folder, args.cases, args.serve_seconds,
                                   args.ingress_replicas)))
        return
    print(f"machine: {describe()}")
    results: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="catalog-scale-") as scratch:
        for size in (int(s) for s in args.sizes.split(",")):
            folder = os.path.join(scratch, str(size))
            started = time.perf_counter()
            grow_catalog(args.work_dir, size, args.users, folder)
            print(f"\n{size:,} items: catalog and a log of {args.users:,} users grown in "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
            results[size] = {}
            for stage in args.stages.split(","):
                # the service's processes set their own threads, as they do under any `ray start`
                threads = {} if stage == "serve" else {"OMP_NUM_THREADS": str(THREADS.get(stage, 2))}
                env = {**os.environ, **threads}
                done = subprocess.run([sys.executable, __file__, "--stage", stage, "--folder", folder,
                                       "--work_dir", args.work_dir, "--cases", str(args.cases),
                                       "--serve_seconds", str(args.serve_seconds),
                                       "--ingress_replicas", str(args.ingress_replicas)],
                                      env=env, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    print(f"  {stage}: failed\n{done.stderr[-2000:]}", flush=True)
                    continue
                figures = json.loads(done.stdout.strip().splitlines()[-1])
                results[size][stage] = figures
                print(f"  {stage:14s} " + ", ".join(f"{k} {v:,.3f}" if isinstance(v, float) else f"{k} {v}"
                                                    for k, v in figures.items()), flush=True)
    sizes = sorted(results)
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        print(f"\n{large:,} items against {small:,} (ratio of the larger catalog's figure to the smaller's):")
        for stage, key in (("serve", "recommend p50 ms"), ("serve", "recommend p99 ms"),
                           ("recommend", "two-stage p50 ms"), ("recommend", "exact p50 ms"),
                           ("train-sampled", "s/step"), ("train-full", "s/step"), ("evaluate", "exact s"),
                           ("evaluate", "two-stage s")):
            a, b = results[small].get(stage, {}).get(key), results[large].get(stage, {}).get(key)
            if a and b:
                print(f"  {stage:14s} {key:18s} {b / a:6.2f}x")
    if sizes:
        print_goals(results, sizes[0], sizes[-1])


def print_goals(results: dict[int, dict[str, Any]], small: int, large: int) -> None:
    """The catalog goals (the docstring's figures, docs/benchmarks.md) against this run's at the
    largest size, each with whether it holds; a goal whose stages did not run is left out."""
    def at(size: int, stage: str, key: str) -> Any:
        return results[size].get(stage, {}).get(key)

    def grown(stage: str, key: str) -> Optional[float]:
        a, b = at(small, stage, key), at(large, stage, key)
        return b / a if a and b and small != large else None

    memory = at(large, "serve", "Ingress MiB resident/private/anonymous")
    rss = at(large, "train-sampled", "peak RSS MiB")
    goals = [  # (what, figure or None, at most (True) or at least, limit)
        (f"service p50 at {large:,} / at {small:,} items", grown("serve", "recommend p50 ms"), True, 1.5),
        ("service p50 / the floor's p50", at(large, "serve", "p50 / floor"), True, 2.0),
        ("service p99 / the floor's p99", at(large, "serve", "p99 / floor"), True, 3.0),
        ("two-stage top-10 in common with exact", at(large, "recommend", "top-10 agreement"), False, 0.95),
        (f"sampled training step at {large:,} / at {small:,}", grown("train-sampled", "s/step"), True, 1.5),
        ("sampled training: peak RSS GiB", rss / 1024 if rss else None, True, 4.0),
        ("largest Ingress: anonymous memory GiB", int(memory.split("/")[2]) / 1024 if memory else None, True, 1.0),
    ]
    print(f"\ngoals at {large:,} items:")
    for what, figure, at_most, limit in goals:
        if figure is not None:
            holds = figure <= limit if at_most else figure >= limit
            print(f"  {what:50s} {figure:6.3f}  goal {'<=' if at_most else '>='} {limit:g}: "
                  f"{'holds' if holds else 'MISSED'}")


if __name__ == "__main__":
    main()

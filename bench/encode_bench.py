"""Texts/s of the encode job (jobs/encode: Ray Data, Parquet in and out) against
sentence-transformers' SentenceTransformer.encode, same model, same texts, same machine, one run.

    python bench/encode_bench.py --texts 10000           # side by side, distinct texts
    python bench/encode_bench.py --log-events 1000000    # memory: a generated log streamed through

Texts are realistic: the bundled Amazon Industrial sample's item texts (title, brand, categories,
description) plus generated event texts built from the same catalog: search queries of 1-6 title
words and reviews of 1-4 description sentences. Both sides see the same texts with the same
truncation (max_length tokens); the reference is fp32 sentence-transformers, and the cosine of
every one of our vectors to its reference vector is reported.

With --repeat R every event text occurs R times in the log, as event texts repeat in real logs:
the job encodes each distinct text once, sentence-transformers encodes every occurrence (both
rates count log texts; the distinct-text rate is printed as well).

--log-events N writes a log of N events (30% with a text, drawn Zipf-like from pools so texts
repeat as events do) and runs `python jobs/encode.py` on it in a subprocess, sampling the
resident memory of the job and every process it started (Ray's raylet, GCS, workers) every
0.2 s; it prints the peak, and with --sizes the same for several sizes to show how it grows.

Goal: the job at 2x sentence-transformers' texts/s on distinct texts; the script also counts the
vectors below cosine 0.99 to the fp32 reference. Results: docs/encoding.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
from machine import describe  # bench/machine.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "lib" / "profilerec" / "sample_data" / "amazon-industrial-sample"


class TextMaker:
    """Realistic item and event texts from the bundled catalog sample."""

    def __init__(self, seed: int = 0):
        from profilerec.data.schema import item_text

        self.rng = np.random.default_rng(seed)
        rows = [json.loads(line) for line in open(SAMPLE / "items.jsonl")]
        self.items = [item_text(r.get("title"), r.get("brand"), [r["categories"]] if r.get("categories") else [],
                                r.get("description")) for r in rows]
        words = [w.strip(",.()").lower() for r in rows for w in (r.get("title") or "").split()]
        self.words = [w for w in words if len(w) > 2 and not w.isdigit()]
        self.sentences = [s.strip() + "." for r in rows for s in (r.get("description") or "").split(". ")
                          if 20 < len(s) < 300]
        self.openers = ["Works great.", "Not what I expected.", "Good value for the money.", "Arrived quickly.",
                        "Would buy again.", "Broke after a week.", "Exactly as described.", "Solid build quality."]

    def query(self) -> str:
        return " ".join(self.rng.choice(self.words, size=int(self.rng.integers(1, 7))))

    def review(self) -> str:
        picked = self.rng.choice(self.sentences, size=int(self.rng.integers(1, 5)))
        return " ".join([str(self.rng.choice(self.openers)), *picked])

    def event_texts(self, n: int) -> list[str]:
        """n distinct event texts: 60% queries, 40% reviews."""
        out: dict[str, None] = {}
        while len(out) < n:
            out.setdefault(self.query() if self.rng.random() < 0.6 else self.review())
        return list(out)


def sample_prepared(folder: str) -> None:
    """The bundled sample through the prepare job (items, events without texts, cases)."""
    from profilerec.config import PrepareConfig
    from profilerec.data.datasets import prepare

    prepare(PrepareConfig(source="amazon", input=str(SAMPLE), output=folder))


def write_with_texts(base: str, folder: str, texts: list[str], repeat: int) -> None:
    """`base` prepared data plus one search/review event per text occurrence (each text `repeat` times)."""
    from profilerec.data.datasets import PreparedData, read_prepared, write_prepared
    from profilerec.data.schema import EVENTS_SCHEMA

    data = read_prepared(base)
    n = len(texts) * repeat
    occurrences = [t for _ in range(repeat) for t in texts]
    extra = pa.table({
        "event_id": [f"g{i}" for i in range(n)], "user_id": [f"gu{i % 997}" for i in range(n)],
        "item_id": pa.nulls(n, pa.string()), "type": ["search"] * n,
        "ts": pa.array(np.full(n, 1_600_000_000_000, dtype="int64") + np.arange(n), pa.timestamp("ms", tz="UTC")),
        "text": occurrences, "value": pa.nulls(n, pa.float64()), "context": pa.nulls(n, pa.string()),
    }, schema=EVENTS_SCHEMA)
    events = pa.concat_tables([data.events, extra])
    write_prepared(PreparedData(events, data.items, data.cases, data.max_history), folder)


def side_by_side(args: argparse.Namespace) -> None:
    import ray
    from profilerec.batch.encode import resolve_precision, run_encode
    from profilerec.config import EncodeConfig
    from profilerec.data.datasets import read_prepared
    from profilerec.data.vectors import item_texts, read_embeddings, vectors_from_arrow
    from profilerec.model.encoder import resolve_model_path, text_hash
    from sentence_transformers import SentenceTransformer

    work = tempfile.mkdtemp(prefix="encode-bench-")
    try:
        sample_prepared(f"{work}/sample")
        maker = TextMaker()
        events = maker.event_texts(max(args.texts - len(maker.items), 0))
        write_with_texts(f"{work}/sample", f"{work}/prepared", events, args.repeat)
        items = item_texts(read_prepared(f"{work}/prepared").items)
        item_list = items.column("text").to_pylist()
        log_texts = item_list + [t for _ in range(args.repeat) for t in events]
        distinct = len(set(item_list) | set(events))
        print(f"machine: {describe()}")
        print(f"texts: {len(item_list)} item texts + {len(events)} distinct event texts x {args.repeat} "
              f"= {len(log_texts)} log texts ({distinct} distinct); max_length {args.max_length}")

        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
        cfg = EncodeConfig(input=f"{work}/prepared", output=f"{work}/emb", max_length=args.max_length,
                           batch_size=args.batch_size, token_budget=args.token_budget, precision=args.precision,
                           num_actors=args.num_actors, torch_threads=args.torch_threads,
                           num_cpus_per_actor=1.0 / args.num_actors, cache=f"{work}/cache")
        precision = resolve_precision(cfg, use_gpu=False)
        started = time.perf_counter()
        manifest = run_encode(cfg, use_gpu=False)  # the function jobs/encode.py calls; cold cache
        ours_s = time.perf_counter() - started
        ray.shutdown()

        st = SentenceTransformer(resolve_model_path(cfg.model), device="cpu")
        st.max_seq_length = args.max_length  # the same truncation as ours (the model card says 256)
        import torch

        torch.set_num_threads(len(os.sched_getaffinity(0)))
        started = time.perf_counter()
        reference = st.encode(log_texts, batch_size=args.st_batch_size, normalize_embeddings=True,
                              convert_to_numpy=True)
        st_s = time.perf_counter() - started

        ours_items = read_embeddings(cfg.output, "items")
        ours_texts = read_embeddings(cfg.output, "texts")
        by_item = dict(zip(ours_items.column("item_id").to_pylist(), vectors_from_arrow(ours_items.column("vector"))))
        by_hash = dict(zip(ours_texts.column("text_hash").to_pylist(), vectors_from_arrow(ours_texts.column("vector"))))
        ours = np.stack([by_item[i] for i in items.column("item_id").to_pylist()]
                        + [by_hash[text_hash(t)] for t in events])
        cosine = (ours * reference[: len(ours)]).sum(axis=1)

        ours_rate, st_rate = len(log_texts) / ours_s, len(log_texts) / st_s
        print(f"ours  (jobs/encode path, Ray Data + Parquet, {precision}, {manifest['encoded']} texts encoded): "
              f"{ours_s:.1f} s = {ours_rate:.1f} log texts/s ({manifest['encoded'] / ours_s:.1f} distinct texts/s; "
              f"the encoding step alone (Ray Data start-up included) "
              f"{manifest['encoded'] / max(manifest['encode_seconds'], 1e-9):.1f} texts/s)")
        print(f"sentence-transformers {st_s:.1f} s = {st_rate:.1f} texts/s (fp32, batch {args.st_batch_size})")
        print(f"ratio ours / sentence-transformers: {ours_rate / st_rate:.2f}x")
        print(f"cosine ours vs fp32 sentence-transformers: min {cosine.min():.5f} mean {cosine.mean():.5f} "
              f"({int((cosine < 0.99).sum())} of {len(cosine)} below 0.99)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_log(folder: str, n_events: int, seed: int = 0, text_pool: Optional[int] = None) -> dict:
    """A prepared folder with the sample's items and a generated log of n_events, 30% with text.

    Query texts come from a pool of n/40 drawn Zipf-like (popular queries repeat), review texts
    from a pool of n/25 (most occur a few times): about 1/20 of the events carry a distinct text.
    `text_pool` N instead caps the pools at 2N/5 queries and 3N/5 reviews (texts repeat more; the
    distinct count is printed).
    """
    from profilerec.data.datasets import PreparedData, read_prepared, write_prepared
    from profilerec.data.schema import EVENTS_SCHEMA

    sample_prepared(f"{folder}-sample")
    data = read_prepared(f"{folder}-sample")
    maker = TextMaker(seed)
    rng = np.random.default_rng(seed)
    n_queries, n_reviews = (text_pool * 2 // 5, text_pool * 3 // 5) if text_pool else (n_events // 40, n_events // 25)
    queries = maker.event_texts(max(n_queries, 10))
    reviews = [maker.review() for _ in range(max(n_reviews, 10))]
    item_ids = np.array(data.items.column("item_id").to_pylist())
    kind = rng.random(n_events)
    q_pick = np.minimum(rng.zipf(1.3, n_events) - 1, len(queries) - 1)
    r_pick = rng.integers(0, len(reviews), n_events)
    text = np.where(kind < 0.2, np.array(queries, dtype=object)[q_pick],
                    np.where(kind < 0.3, np.array(reviews, dtype=object)[r_pick], None))
    types = np.where(kind < 0.2, "search", np.where(kind < 0.3, "review", "view"))
    users = np.sort(rng.integers(0, max(n_events // 20, 1), n_events))
    events = pa.table({
        "event_id": [f"g{i}" for i in range(n_events)], "user_id": [f"u{u}" for u in users],
        "item_id": np.where(types == "search", None, item_ids[rng.integers(0, len(item_ids), n_events)]).tolist(),
        "type": types.tolist(),
        "ts": pa.array(1_600_000_000_000 + np.arange(n_events, dtype="int64") * 1000, pa.timestamp("ms", tz="UTC")),
        "text": text.tolist(), "value": pa.nulls(n_events, pa.float64()), "context": pa.nulls(n_events, pa.string()),
    }, schema=EVENTS_SCHEMA)
    empty_cases = data.cases.slice(0, 0)
    write_prepared(PreparedData(events, data.items, empty_cases, None), folder)
    texts = [t for t in text.tolist() if t]
    return {"events": n_events, "event_texts": len(texts), "distinct_event_texts": len(set(texts))}


def tree_rss(pid: int) -> tuple[int, int]:
    """(RSS of pid, RSS of pid and all its descendants), bytes, from /proc (Linux)."""
    parents, rss = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            parents[int(entry)] = int(fields[1])
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(children)
        frontier.extend(children)
    return rss.get(pid, 0), sum(rss.get(p, 0) for p in tree)


def memory_run(args: argparse.Namespace, n_events: int) -> None:
    work = tempfile.mkdtemp(prefix="encode-log-")
    try:
        started = time.perf_counter()
        info = write_log(f"{work}/prepared", n_events, text_pool=args.text_pool)
        print(f"log of {n_events:,} events written in {time.perf_counter() - started:.0f} s: "
              f"{info['event_texts']:,} event texts, {info['distinct_event_texts']:,} distinct", flush=True)
        cmd = [sys.executable, str(ROOT / "jobs" / "encode.py"), "--input", f"{work}/prepared", "--output",
               f"{work}/emb", "--precision", args.precision]
        if args.ray_cpus:
            cmd += ["--ray.num_cpus", str(args.ray_cpus)]
        peak = {"own": 0, "total": 0}
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                own, total = tree_rss(proc.pid)
                peak["own"], peak["total"] = max(peak["own"], own), max(peak["total"], total)
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        output = proc.communicate()[0]
        done.set()
        sampler.join()
        seconds = time.perf_counter() - started
        if proc.returncode:
            print(output[-3000:])
            raise SystemExit(f"encode job failed with exit status {proc.returncode}")
        manifest = json.loads(Path(f"{work}/emb/manifest.json").read_text())
        print(f"{n_events:,} events: job {seconds:.0f} s (Ray start included), {manifest['encoded']:,} distinct texts "
              f"encoded in {manifest['encode_seconds']:.0f} s = {manifest['encoded'] / max(manifest['encode_seconds'], 1e-9):.0f} texts/s, "
              f"{info['event_texts'] / seconds:.0f} log texts/s over the whole job; peak RSS: job process "
              f"{peak['own'] / 2**20:.0f} MiB, job + Ray processes {peak['total'] / 2**20:.0f} MiB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    from profilerec.config import EncodeConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=10000,
                        help="distinct texts (item texts included); with fewer, the job's fixed start-up "
                             "(encoder actor start, imports, model load) weighs on the rate: docs/encoding.md")
    parser.add_argument("--repeat", type=int, default=1, help="occurrences of each event text in the log")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--token-budget", type=int, default=EncodeConfig.token_budget)
    parser.add_argument("--num-actors", type=int, default=1, help="encoder actors (they share the cores)")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch threads per actor (default: cores / actors)")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--st-batch-size", type=int, default=32, help="sentence-transformers' default is 32")
    parser.add_argument("--ray-cpus", type=int, default=None, help="logical CPUs of the local Ray")
    parser.add_argument("--log-events", type=int, nargs="*", default=None,
                        help="memory mode: generated logs of these sizes through jobs/encode.py")
    parser.add_argument("--text-pool", type=int, default=None,
                        help="memory mode: at most this many distinct event texts (default: about events / 20)")
    args = parser.parse_args()
    if args.log_events:
        print(f"machine: {describe()}", flush=True)
        for n in args.log_events:
            memory_run(args, n)
    else:
        side_by_side(args)


if __name__ == "__main__":
    main()

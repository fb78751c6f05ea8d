"""Texts/s of the encode job (jobs/encode: Ray Data, Parquet in and out) against
sentence-transformers' SentenceTransformer.encode, same model, same texts, same device, one run.

    python bench/encode_bench.py --texts 10000           # side by side, distinct texts
    python bench/encode_bench.py --in-process            # TextEncoder alone: precisions x packing off/on
    python bench/encode_bench.py --log-events 1000000    # memory: a generated log streamed through

Both sides run on the job's device (--device auto: the GPU when torch sees one; the header names
it): the job with use_gpu on a GPU, sentence-transformers on the same device at its own best
configuration (on a GPU every --st-batch-sizes x --st-precisions is timed on --st-sweep-texts
texts and the fastest whose vectors stay within cosine 0.99 of fp32 runs on all; tokenising is
included, as SentenceTransformer.encode tokenises). The job's line is followed by its fixed cost
(choosing the precision on a first run, start-up to the first encoded part) and its steady rate
from the manifest, and the fraction of the arithmetic limit: the model's FLOPs (2 x the weights
outside the embeddings per token, plus attention) over the seconds, against --peak-tflops (by
default the datasheet figure of an H100, H200 or A100 at the job's precision; none on a CPU).

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


# dense (no sparsity) matrix peaks in TFLOP/s from NVIDIA's datasheets, by the precision the model
# runs at; the more specific name first (an H100 PCIe is slower than an H100 SXM)
PEAK_TFLOPS = [
    ("H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0}),
    ("H200 NVL", {"fp32": 60.0, "tf32": 418.0, "bf16": 835.0, "fp16": 835.0}),
    ("H200", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),
    ("H100", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
]
ST_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def bench_device(choice: str) -> str:
    """cuda or cpu: `choice`, or for auto the GPU when torch sees one."""
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU here")
    return ("cuda" if torch.cuda.is_available() else "cpu") if choice == "auto" else choice


def model_flops(model_path: str, lengths: list[int]) -> float:
    """Forward FLOPs of the encoder over texts of these token lengths: per token 2 x the
    parameters outside the embedding tables (every weight one multiply-add), plus per layer the
    attention's two [n x n x hidden] products (QK^T, then the weights times V) of each text."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(model_path)
    model = AutoModel.from_config(config)
    weights = sum(p.numel() for p in model.encoder.parameters())
    n = np.asarray(lengths, dtype=np.float64)
    return float(2 * weights * n.sum() + config.num_hidden_layers * 4 * config.hidden_size * (n ** 2).sum())


def peak_tflops(given: Optional[float], device: str, precision: str) -> Optional[float]:
    """The arithmetic peak the fraction is of: --peak-tflops, else the datasheet figure of a known
    GPU at `precision` (int8 and unknown GPUs and CPUs: none, so no fraction is printed)."""
    import torch

    if given:
        return given
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name(0)
    peaks = next((peaks for key, peaks in PEAK_TFLOPS if key in name), {})
    return peaks.get(precision)


def st_encode(model, texts: list[str], batch_size: int) -> tuple[np.ndarray, float]:
    """sentence-transformers' vectors of `texts` (tokenising included) and the seconds they took."""
    import torch

    started = time.perf_counter()
    vectors = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return vectors.astype(np.float32), time.perf_counter() - started


def sentence_transformers_best(args: argparse.Namespace, device: str, model_path: str,
                               texts: list[str]) -> dict:
    """sentence-transformers at its best configuration on `device`: every --st-batch-sizes x
    --st-precisions (half types on CUDA only) timed on the first --st-sweep-texts texts, the
    fastest whose every vector is within cosine 0.99 of fp32's then timed on all `texts`; the
    fp32 vectors of all `texts` come back too, the reference for the cosine of ours."""
    import torch
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model_path, device=device)
    st.max_seq_length = args.max_length  # the same truncation as ours (the model card says 256)
    if device == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    batches = args.st_batch_sizes or ([32, 128, 256, 512] if device == "cuda" else [32])
    precisions = args.st_precisions or (["fp32", "fp16", "bf16"] if device == "cuda" else ["fp32"])
    precisions = ["fp32"] + [p for p in precisions if p != "fp32" and (device == "cuda" or p == "bf16")]
    sweep = texts[: args.st_sweep_texts]
    configs = [(p, b) for p in precisions for b in batches]
    rates, sweep_reference = {}, None
    for precision in precisions:
        st.to(getattr(torch, ST_DTYPES[precision]))
        st_encode(st, sweep[:256], batches[0])  # warm-up: CUDA context, kernels, allocator
        for batch in batches:
            if len(configs) == 1:
                break  # nothing to choose between: the full run below is the measurement
            vectors, seconds = st_encode(st, sweep, batch)
            sweep_reference = vectors if sweep_reference is None else sweep_reference
            cosine = float((vectors * sweep_reference).sum(axis=1).min())
            rates[(precision, batch)] = (len(sweep) / seconds, cosine)
            print(f"  sentence-transformers {precision} batch {batch}: {len(sweep) / seconds:.1f} texts/s on "
                  f"{len(sweep)} texts, min cosine to fp32 {cosine:.5f}", flush=True)
    allowed = {c: r for c, r in rates.items() if r[1] >= 0.99} or {configs[0]: (0.0, 1.0)}
    precision, batch = max(allowed, key=lambda c: allowed[c][0])
    st.to(getattr(torch, ST_DTYPES[precision]))
    vectors, seconds = st_encode(st, texts, batch)
    reference = vectors
    if precision != "fp32":
        st.to(torch.float32)
        fp32_batch = max((c for c in rates if c[0] == "fp32"), key=lambda c: rates[c][0])[1]
        reference, _ = st_encode(st, texts, fp32_batch)
    return {"precision": precision, "batch": batch, "seconds": seconds, "reference": reference}


def side_by_side(args: argparse.Namespace) -> None:
    import ray
    from profilerec.batch.encode import run_encode
    from profilerec.config import EncodeConfig
    from profilerec.data.datasets import read_prepared
    from profilerec.data.vectors import item_texts, read_embeddings, vectors_from_arrow
    from profilerec.model.encoder import load_tokenizer, resolve_model_path, text_hash, token_ids

    device = bench_device(args.device)
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
        print(f"device: {device} (the job's encoder actors and sentence-transformers alike)")
        print(f"texts: {len(item_list)} item texts + {len(events)} distinct event texts x {args.repeat} "
              f"= {len(log_texts)} log texts ({distinct} distinct); max_length {args.max_length}", flush=True)

        ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
        cfg = EncodeConfig(input=f"{work}/prepared", output=f"{work}/emb", max_length=args.max_length,
                           batch_size=args.batch_size, token_budget=args.token_budget, precision=args.precision,
                           packing=args.packing, num_actors=args.num_actors, torch_threads=args.torch_threads,
                           num_cpus_per_actor=1.0 / args.num_actors, cache=f"{work}/cache")
        started = time.perf_counter()
        manifest = run_encode(cfg, use_gpu=device == "cuda")  # the function jobs/encode.py calls; cold cache
        ours_s = time.perf_counter() - started
        ray.shutdown()

        model_path = resolve_model_path(cfg.model)
        st = sentence_transformers_best(args, device, model_path, log_texts)
        reference = st["reference"]

        ours_items = read_embeddings(cfg.output, "items")
        ours_texts = read_embeddings(cfg.output, "texts")
        by_item = dict(zip(ours_items.column("item_id").to_pylist(), vectors_from_arrow(ours_items.column("vector"))))
        by_hash = dict(zip(ours_texts.column("text_hash").to_pylist(), vectors_from_arrow(ours_texts.column("vector"))))
        ours = np.stack([by_item[i] for i in items.column("item_id").to_pylist()]
                        + [by_hash[text_hash(t)] for t in events])
        cosine = (ours * reference[: len(ours)]).sum(axis=1)

        precision = manifest["precision"]
        choice = manifest["precision_choice"]
        measuring = choice.get("measure_seconds", 0.0) if choice.get("chosen_by") == "measured" else 0.0
        ours_rate, st_rate = len(log_texts) / ours_s, len(log_texts) / st["seconds"]
        print(f"precision {precision} ({choice.get('chosen_by')}"
              + (f" on {choice['device']}: {choice['measured']}, {measuring:.1f} s" if "measured" in choice else "")
              + f"); packing {args.packing}")
        print(f"ours  (jobs/encode path, Ray Data + Parquet, {precision}, {manifest['encoded']} texts encoded): "
              f"{ours_s:.1f} s = {ours_rate:.1f} log texts/s ({manifest['encoded'] / ours_s:.1f} distinct texts/s; "
              f"the encoding step alone (Ray Data start-up included) "
              f"{manifest['encoded'] / max(manifest['encode_seconds'], 1e-9):.1f} texts/s)")
        print(f"  fixed cost: {measuring:.1f} s choosing the precision (first run on a device only), start-up until "
              f"the encoder finished its first block {manifest['startup_seconds']} s; steady state "
              f"{manifest['steady_texts_per_second']} texts/s")
        lengths = [len(r) for r in token_ids(load_tokenizer(model_path), item_list + events, args.max_length)]
        flops = model_flops(model_path, lengths)
        peak = peak_tflops(args.peak_tflops, device, precision)
        steady = manifest["steady_texts_per_second"]
        print(f"  arithmetic: {flops / len(lengths) / 1e6:.1f} MFLOP per text ({flops / sum(lengths) / 1e6:.1f} "
              f"per token, {np.mean(lengths):.0f} tokens per text)"
              + (f"; {flops / ours_s / 1e12 / peak:.2%} of {peak:g} TFLOP/s over the whole job"
                 + (f", {steady * flops / len(lengths) / 1e12 / peak:.2%} at the steady rate" if steady else "")
                 if peak else "; no --peak-tflops for this device, so no fraction of the limit"))
        print(f"sentence-transformers {st['seconds']:.1f} s = {st_rate:.1f} texts/s ({st['precision']}, batch "
              f"{st['batch']}: its best configuration here, tokenising included)")
        print(f"ratio ours / sentence-transformers: {ours_rate / st_rate:.2f}x")
        print(f"cosine ours vs fp32 sentence-transformers: min {cosine.min():.5f} mean {cosine.mean():.5f} "
              f"({int((cosine < 0.99).sum())} of {len(cosine)} below 0.99)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def in_process(args: argparse.Namespace) -> None:
    """TextEncoder in this process on the bench's texts, every --precisions x packing off/on,
    alternating for --rounds rounds: the first pass over the texts (cold shapes) and the best
    later pass, in texts/s, and the lowest cosine to fp32 unpacked."""
    import torch
    from profilerec.model.encoder import TextEncoder

    device = bench_device(args.device)
    maker = TextMaker()
    texts = maker.items + maker.event_texts(max(args.texts - len(maker.items), 0))
    print(f"machine: {describe()}")
    print(f"device: {device}; {len(texts)} distinct texts, max_length {args.max_length}, token budget "
          f"{args.token_budget or 'by device'}; TextEncoder in one process", flush=True)
    if device == "cpu":
        torch.set_num_threads(args.torch_threads or len(os.sched_getaffinity(0)))
    precisions = args.precisions or (["fp32", "tf32", "bf16", "fp16"] if device == "cuda" else ["fp32", "bf16"])
    encoders = {(p, k): TextEncoder(device=device, max_length=args.max_length, batch_size=args.batch_size,
                                    precision=p, token_budget=args.token_budget, packing=k)
                for p in precisions for k in ("off", "on")}
    rows = next(iter(encoders.values())).token_ids(texts)
    reference, first, best = None, {}, {}
    for round_ in range(args.rounds + 1):
        for key, encoder in encoders.items():
            started = time.perf_counter()
            vectors = encoder.encode_ids(rows)
            rate = len(rows) / (time.perf_counter() - started)
            if round_ == 0:
                first[key] = rate
                reference = vectors if reference is None else reference
                best[key] = (0.0, float((vectors * reference).sum(axis=1).min()))
            else:
                best[key] = (max(best[key][0], rate), best[key][1])
    for (precision, packing), (rate, cosine) in best.items():
        attention = f", attention {encoders[(precision, packing)].attention}" if packing == "on" else ""
        print(f"  {precision:>4} packing {packing:<3}{attention:<20} first pass {first[(precision, packing)]:8.1f} "
              f"texts/s, best of {args.rounds} later {rate:8.1f} texts/s, min cosine to fp32 unpacked {cosine:.6f}")


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
    parser.add_argument("--token-budget", type=int, default=EncodeConfig.token_budget,
                        help="tokens per model call (default: by device)")
    parser.add_argument("--num-actors", type=int, default=1, help="encoder actors (they share the cores)")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch threads per actor (default: cores / actors)")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--packing", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where the job's encoder and sentence-transformers run (auto: the GPU when there is one)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's arithmetic peak at the job's precision (default: datasheet figure for "
                             "H100/H200/A100; none on CPUs)")
    parser.add_argument("--st-batch-sizes", type=int, nargs="+", default=None,
                        help="sentence-transformers batch sizes tried (default: 32 on CPU; 32 128 256 512 on GPU)")
    parser.add_argument("--st-precisions", nargs="+", default=None, choices=["fp32", "fp16", "bf16"],
                        help="sentence-transformers precisions tried (default: fp32 on CPU; fp32 fp16 bf16 on GPU)")
    parser.add_argument("--st-sweep-texts", type=int, default=20000,
                        help="texts each sentence-transformers configuration is timed on before its best runs on all")
    parser.add_argument("--in-process", action="store_true",
                        help="TextEncoder in this process instead: every --precisions with packing off and on")
    parser.add_argument("--precisions", nargs="+", default=None,
                        help="--in-process: precisions (default: fp32 bf16 on CPU; fp32 tf32 bf16 fp16 on GPU)")
    parser.add_argument("--rounds", type=int, default=3, help="--in-process: timed passes after the first")
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
    elif args.in_process:
        in_process(args)
    else:
        side_by_side(args)


if __name__ == "__main__":
    main()

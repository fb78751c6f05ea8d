"""Scale of the batch jobs: wall time and peak memory of the profile-building and evaluation jobs
on a generated log of N users x 10 events, and how both grow with N.

    flock /tmp/cpu.lock python bench/batch_scale.py --users 100000 300000 1000000

For each N a prepared folder is generated once (cached under --work): a catalogue of --items
items with random unit embeddings (written where the encode job writes them), brands and
categories, and N users with 10 events each (view/click/cart/purchase, item popularity skewed
like real logs, half of each user's items near an item of their own taste, minutes to days
apart), split by the library's leave-last-positive-out protocol. Then the library functions of
jobs/profiles.py (batch_profiles.run_profiles) and jobs/evaluate.py (evaluation.run_evaluate,
test split, with the popularity baseline) run on it, each in a fresh child process. Neither job
uses Ray: each streams the log in chunks of whole users and spreads the chunks over local worker
processes (--workers; default one per core), so the peak memory reported is the RSS of the job's
whole process tree (job + workers, summed, sampled every 0.1 s). Growth ratios are printed
against the smallest N; every result is also appended to <work>/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time

import numpy as np

EVENTS_PER_USER = 10
TYPES = np.array(["view", "click", "cart", "purchase"])
TYPE_P = [0.55, 0.25, 0.1, 0.1]


def machine() -> str:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.node()}: {len(os.sched_getaffinity(0))} cores ({cpu or platform.machine()}), {mem:.0f} GiB, no GPU"


def generate(folder: str, users: int, items: int, dim: int, seed: int = 0) -> dict:
    """Write a prepared log of `users` x 10 events and the item embeddings under `folder`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from profilerec import storage
    from profilerec.datasets import write_prepared
    from profilerec.datasets.common import PreparedData
    from profilerec.datasets.protocol import leave_last_positive_out, positive_mask
    from profilerec.embeddings import vectors_to_arrow
    from profilerec.schema import EVENTS_SCHEMA, InvalidRows

    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    item_ids = pc.binary_join_element_wise("I", pc.utf8_lpad(pa.array(np.arange(items)).cast(pa.string()), 7, "0"), "")
    catalogue = pa.table({
        "item_id": item_ids,
        "title": pc.binary_join_element_wise("Industrial part ", pa.array(np.arange(items)).cast(pa.string()), ""),
        "description": pa.nulls(items, pa.string()),
        "brand": pa.array([f"brand-{n % 700}" for n in range(items)]),
        "categories": pa.array([[f"cat-{n % 40}", f"sub-{n % 311}"] for n in range(items)]),
        "extra": pa.nulls(items, pa.string()),
    })
    vectors = rng.normal(size=(items, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    storage.write_table(pa.table({"item_id": item_ids, "vector": vectors_to_arrow(vectors)}),
                        storage.join(folder, "embeddings", "items", "part-0.parquet"))

    n = users * EVENTS_PER_USER
    user = np.repeat(np.arange(users), EVENTS_PER_USER)
    # popularity: a Zipf-like head over a random permutation of the catalogue; taste: items near
    # the user's own anchor item (neighbouring ids share brand and category cycles less than
    # vectors, but the point is realistic repetition and transitions, not realistic semantics)
    weights = 1.0 / (np.arange(items) + 10.0) ** 1.1
    popular = rng.permutation(items)[rng.choice(items, size=n, p=weights / weights.sum())]
    anchor = np.repeat(rng.integers(0, items, size=users), EVENTS_PER_USER)
    near = (anchor + rng.integers(-50, 51, size=n)) % items
    item = np.where(rng.random(n) < 0.5, popular, near)
    start = np.repeat(1.7e9 + rng.uniform(0, 90 * 86400, size=users), EVENTS_PER_USER)
    gaps = rng.exponential(6 * 3600, size=(users, EVENTS_PER_USER)).cumsum(axis=1).ravel()
    user_ids = pc.binary_join_element_wise("U", pc.utf8_lpad(pa.array(user).cast(pa.string()), 8, "0"), "")
    events = pa.table({
        "event_id": pc.binary_join_element_wise("e", pa.array(np.arange(n)).cast(pa.string()), ""),
        "user_id": user_ids,
        "item_id": item_ids.take(pa.array(item)),
        "type": pa.array(TYPES[rng.choice(len(TYPES), size=n, p=TYPE_P)]),
        "ts": pa.array(((start + gaps) * 1000).astype(np.int64)).cast(pa.timestamp("ms", tz="UTC")),
        "text": pa.nulls(n, pa.string()),
        "value": pa.nulls(n, pa.float64()),
        "context": pa.nulls(n, pa.string()),
    }, schema=EVENTS_SCHEMA)
    cases = leave_last_positive_out(events, positive_mask(events, 4.0))
    data = PreparedData(events, catalogue, cases, None, InvalidRows(), ["generated by bench/batch_scale.py"],
                        "generated", f"batch_scale users={users} items={items} seed={seed}")
    write_prepared(data, storage.join(folder, "prepared"))
    return {"events": n, "cases": cases.num_rows, "seconds": round(time.perf_counter() - started, 1)}


def child(job: str, folder: str, workers: int | None) -> None:
    """Run one job on a generated folder and print its summary as JSON (the child process)."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    if job == "generate":
        args = json.loads(os.environ["BATCH_SCALE_GENERATE"])
        summary = generate(folder, **args)
    elif job == "profiles":
        from profilerec.batch_profiles import run_profiles
        from profilerec.config import ProfilesConfig

        summary = run_profiles(ProfilesConfig(input=f"{folder}/prepared", embeddings=f"{folder}/embeddings",
                                              model=f"{folder}/no-model", output=f"{folder}/profiles",
                                              workers=workers))
    else:
        from profilerec.config import EvaluateConfig
        from profilerec.evaluation import run_evaluate

        report = run_evaluate(EvaluateConfig(input=f"{folder}/prepared", embeddings=f"{folder}/embeddings",
                                             model=f"{folder}/no-model", output=f"{folder}/report",
                                             workers=workers))
        summary = {"cases": report["cases"], "items": report["items"], "NDCG@10": report["methods"]["profilerec"]["NDCG@10"]}
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    print("RESULT " + json.dumps(summary, default=str), flush=True)


def tree_rss(pid: int) -> int:
    """Resident bytes of process `pid` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
        except OSError:
            pass
    return total


def run_child(job: str, folder: str, env: dict | None = None, workers: int | None = None) -> dict:
    """Run `job` in a fresh interpreter; its result plus the peak RSS of its process tree (the
    job and any worker processes it starts, summed, sampled every 0.1 s) and of the job process
    alone (wait4's ru_maxrss, exact)."""
    cmd = [sys.executable, __file__, "--child", job, "--work", folder] + (["--workers", str(workers)] if workers else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env={**os.environ, **(env or {})}, text=True)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            peak[0] = max(peak[0], tree_rss(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.stdout.read()
    done.set()
    sampler.join()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{job} on {folder} failed (exit {proc.returncode}):\n{out}")
    result = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    result["peak_rss_mib"] = round(max(peak[0], usage.ru_maxrss * 1024) / 2**20)
    result["job_process_rss_mib"] = round(usage.ru_maxrss / 1024)  # Linux: kilobytes
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--jobs", nargs="+", default=["profiles", "evaluate"], choices=["profiles", "evaluate"])
    parser.add_argument("--work", default="/tmp/profilerec-batch-scale", help="generated logs are cached here")
    parser.add_argument("--workers", type=int, help="processes per job (default: the jobs' default, one per core)")
    parser.add_argument("--growth", action="store_true", help="run nothing: the growth table of the results so far")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.work, args.workers)
        return

    print(f"machine: {machine()}")
    print(f"log: N users x {EVENTS_PER_USER} events, {args.items:,} items with {args.dim}-dim embeddings; "
          f"each job in its own process (no Ray: both jobs run in-process, chunks of the log spread over "
          f"local worker processes), peak RSS = the job's process tree, summed")
    rows: dict[int, dict[str, dict]] = {}
    for users in [] if args.growth else args.users:
        folder = os.path.join(args.work, f"u{users}-i{args.items}-d{args.dim}")
        if not os.path.exists(os.path.join(folder, "prepared", "manifest.json")):
            gen = run_child("generate", folder, {"BATCH_SCALE_GENERATE": json.dumps(
                {"users": users, "items": args.items, "dim": args.dim})})
            print(f"  generated {users:,} users: {gen['events']:,} events, {gen['cases']:,} cases in "
                  f"{gen['seconds']} s -> {folder}", flush=True)
        rows[users] = {}
        for job in args.jobs:
            result = run_child(job, folder, workers=args.workers)
            rows[users][job] = result
            extra = {k: v for k, v in result.items() if k not in ("wall_s", "peak_rss_mib", "output", "seconds")}
            with open(os.path.join(args.work, "results.jsonl"), "a") as f:
                f.write(json.dumps({**result, "users": users, "items": args.items, "dim": args.dim, "job": job,
                                    "workers_setting": args.workers, "machine": machine()}) + "\n")
            print(f"  {users:>9,} users  {job:<9} wall {result['wall_s']:8.1f} s   peak RSS {result['peak_rss_mib']:7,} MiB"
                  f"   {extra}", flush=True)
    # growth over every size measured so far with these settings on this machine (this run and
    # earlier runs: a 1M-user run may need a lock turn of its own)
    latest: dict[tuple[int, str], dict] = {}
    with open(os.path.join(args.work, "results.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if (r["items"], r["dim"], r["workers_setting"], r["machine"]) == (args.items, args.dim, args.workers, machine()):
                latest[r["users"], r["job"]] = r
    for job in args.jobs:
        sizes = sorted(u for u, j in latest if j == job)
        if len(sizes) < 2:
            continue
        base = latest[sizes[0], job]
        print(f"\n{job}: growth against {sizes[0]:,} users (linear = the user ratio; "
              f"* = measured in an earlier run of this script)")
        for users in sizes:
            r = latest[users, job]
            mark = "" if users in rows and job in rows[users] else " *"
            print(f"  {users:>9,} users (x{users / sizes[0]:>4.1f}): wall {r['wall_s']:8.1f} s (x{r['wall_s'] / base['wall_s']:.2f}), "
                  f"peak RSS {r['peak_rss_mib']:7,} MiB (x{r['peak_rss_mib'] / base['peak_rss_mib']:.2f}){mark}")

if __name__ == "__main__":
    main()

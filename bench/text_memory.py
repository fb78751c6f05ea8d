"""Memory a process spends on the event-text vectors it must look up (each profile shard does).

    python bench/text_memory.py --texts 1000000

Writes N random text vectors (384-d, as the encode job writes them, in files of 64k rows) to a
temporary folder, then loads them in two fresh processes, side by side:

- reference: a dict of text_hash -> numpy vector, what shards held before text_vectors.py;
- ours:      text_vectors.load_text_vectors: the node's memory-mapped copy plus sorted hashes.

For each it prints the anonymous memory added (private to the process: what N shards on a node
pay N times) and the file-backed memory (the page cache, shared by the node's processes), per
text, and the time of one lookup. The first load of ours also writes the node copy; its time is
printed apart from a second load. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from machine import describe  # bench/machine.py (the script's folder is on sys.path)


def memory_bytes() -> dict[str, int]:
    """RssAnon and RssFile of this process (Linux /proc)."""
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                found[line.split(":")[0]] = int(line.split()[1]) * 1024
    return found


def measure(kind: str, folder: str, cache: str) -> dict[str, float]:
    """Load the folder one way and look up every 97th text; runs in its own process."""
    from profilerec.data.storage import iter_tables
    from profilerec.data.vectors import read_embeddings, vectors_from_arrow
    from profilerec.model.text_vectors import load_text_vectors

    probe = [h for t in iter_tables(folder, 65_536, columns=["text_hash"]) for h in t.column("text_hash").to_pylist()[::97]]
    before = memory_bytes()
    started = time.perf_counter()
    if kind == "reference":
        table = read_embeddings(os.path.dirname(folder), os.path.basename(folder))
        store = dict(zip(table.column("text_hash").to_pylist(), vectors_from_arrow(table.column("vector"))))
        del table
    else:
        store = load_text_vectors(folder, cache_dir=cache)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    found = sum(store.get(h) is not None for h in probe)
    lookup_us = (time.perf_counter() - started) / len(probe) * 1e6
    after = memory_bytes()
    return {"load_s": load_s, "lookup_us": lookup_us, "found": found, "probed": len(probe),
            "anon": after["RssAnon"] - before["RssAnon"], "file": after["RssFile"] - before["RssFile"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--measure", choices=["reference", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.folder, args.cache)))
        return

    import pyarrow as pa
    from profilerec.data.storage import write_table
    from profilerec.data.vectors import vectors_to_arrow

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder, cache = os.path.join(tmp, "texts"), os.path.join(tmp, "node")
        os.makedirs(folder)
        for start in range(0, args.texts, 65_536):
            n = min(65_536, args.texts - start)
            vectors = rng.normal(size=(n, args.dim)).astype(np.float32)
            hashes = [f"{x:024x}" for x in rng.integers(0, 2**62, size=n)]
            write_table(pa.table({"text_hash": hashes, "vector": vectors_to_arrow(vectors)}),
                        os.path.join(folder, f"part-{start // 65_536:05d}.parquet"))

        def run(kind: str) -> dict[str, float]:
            out = subprocess.run([sys.executable, __file__, "--measure", kind, "--folder", folder, "--cache", cache],
                                 check=True, capture_output=True, text=True).stdout
            return json.loads(out.strip().splitlines()[-1])

        results = {"reference (dict of arrays)": run("reference"), "ours, first load (writes the node copy)": run("ours"),
                   "ours, next process on the node": run("ours")}
    print(f"machine: {describe()}\n{args.texts:,} texts of {args.dim} float32")
    for name, r in results.items():
        print(f"{name:<42} private {r['anon'] / args.texts:8.1f} B/text  shared page cache {r['file'] / args.texts:8.1f} B/text"
              f"  load {r['load_s']:6.1f} s  lookup {r['lookup_us']:5.1f} us  found {r['found']}/{r['probed']}")
    ref, ours = results["reference (dict of arrays)"], results["ours, next process on the node"]
    print(f"private memory per text, ours vs reference: {ours['anon'] / max(ref['anon'], 1):.3f}x")


if __name__ == "__main__":
    main()

"""Memory per user held by a profile shard, with N simulated users at full capacity.

    python bench/profile_memory.py --users 1000000

Every simulated user has a full profile with the default settings: both interest vectors, a full
window of recent events, the maximum number of counters and a full window of event-id hashes
(the worst case; real users with few events take less). The states are real: built by
profile.py from simulated events over a random catalog, then packed into a real ProfileShard
exactly as the service holds them. Prints the resident memory added per user next to the
packed size, and the time to unpack, update and repack one user. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
from machine import describe  # bench/machine.py (the script's folder is on sys.path)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def main() -> None:
    from profilerec.data.schema import Event
    from profilerec.model.index import ItemIndex
    from profilerec.model.profile import ProfileParams, build_profile
    from profilerec.model.recommend import Recommender
    from profilerec.service.packed import event_hash
    from profilerec.service.shard import ProfileShard
    from profilerec.service.shard_store import ShardStore

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--templates", type=int, default=500, help="distinct simulated histories")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    params = ProfileParams()
    vectors = rng.normal(size=(args.items, args.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    item_ids = [f"item-{n}" for n in range(args.items)]
    brands = [f"brand-{n % 700}" for n in range(args.items)]
    categories = [[f"cat-{n % 40}", f"sub-{n % 311}"] for n in range(args.items)]
    index = ItemIndex(item_ids, vectors, brands, categories, [f"Item {n}" for n in range(args.items)])
    with tempfile.TemporaryDirectory() as tmp:
        shard = ProfileShard(0, Recommender(index, params), ShardStore(tmp, 0))
        types = ["view", "click", "cart", "purchase"]
        templates = []
        for t in range(args.templates):
            rows = rng.integers(0, args.items, size=3 * params.window)
            events = [Event(f"t{t}-{n}", "u", types[n % 4], 1.7e9 + 600.0 * n, item_id=item_ids[r])
                      for n, r in enumerate(rows)]
            templates.append(build_profile("u", events, lambda e: index.vector(e.item_id), params, index.meta))
        before = rss_bytes()
        started = time.perf_counter()
        for u in range(args.users):
            hashes = rng.integers(0, 2**63, size=shard.dedup_window, dtype=np.uint64)
            state = templates[u % args.templates]
            shard.users[f"user-{u:08d}"] = shard.codec.pack(state, hashes)
        fill_s = time.perf_counter() - started
        added = rss_bytes() - before
        packed = sum(map(len, shard.users.values())) / args.users
        # one live update of a full user: unpack, apply the event, repack (what apply() does)
        events = [Event(f"live-{n}", f"user-{n:08d}", "click", 1.8e9, item_id=item_ids[n]) for n in range(2000)]
        started = time.perf_counter()
        for event in events:
            shard._apply_one(event)
        update_us = (time.perf_counter() - started) / len(events) * 1e6
        assert event_hash("live-0") in shard._unpack("user-00000000")[1]
    print(f"machine: {describe()}")
    print(f"users held: {args.users:,} (full profiles: window {params.window}, {params.max_counters} counters, "
          f"{shard.dedup_window} event-id hashes, {args.dim}-dim {params.vector_dtype} vectors)")
    print(f"resident memory added: {added / 2**20:,.0f} MiB = {added / args.users:,.0f} bytes per user")
    print(f"packed state: {packed:,.0f} bytes per user; the rest is the dict entry and the user id string")
    print(f"filled in {fill_s:.1f} s; one live update of a full user (unpack, apply, repack): {update_us:.0f} us")


if __name__ == "__main__":
    main()

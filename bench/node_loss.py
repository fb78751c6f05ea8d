"""Node loss with the service's state in a bucket: a two-node Ray cluster on this machine, the
profile shards placed on the second node, the state folder on an S3 API server (moto, on
localhost); the second node is removed while events flow. The shards restart on the remaining
node from the bucket's snapshots and logs.

    python bench/node_loss.py --work_dir work      # a work folder built by `profilerec demo`

One client sends event batches in order, retrying a 503 (after its Retry-After), a 500 or a
connection error with the same event ids, and keeps its own record of the accepted events. At the
end every user's profile, as the shard actors hold it, is compared with a batch rebuild from that
record. Prints the time from the loss to the first accepted write sent after it, and, with --json, one
JSON line with every figure (tests/test_node_loss.py runs it that way).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import tempfile
import threading
import time
from collections import Counter, defaultdict
from typing import Any

import pyarrow.fs as pafs
import ray
import requests
from moto.server import ThreadedMotoServer
from profilerec.config import PipelineConfig, ServeConfig
from profilerec.data.datasets import read_prepared
from profilerec.data.schema import Event
from profilerec.model.profile import build_profile, states_from_table, states_to_table
from profilerec.service.api import build_app, serving_config
from profilerec.service.shard_actors import get_or_create_shards, load_serving_recommender
from ray import serve
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

APP = "node-loss"
BUCKET = "profilerec-node-loss"
TOKEN = "node-loss-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_bucket() -> tuple[ThreadedMotoServer, str]:
    """A moto S3 server on localhost with an empty bucket; returns it and the state folder's URI."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # every process of the cluster (started below, from this one) inherits these
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                      allow_bucket_creation=True).create_dir(BUCKET)
    return server, f"s3://{BUCKET}/state?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"


class Sender:
    """Event batches sent in order on a thread, each retried until accepted."""

    def __init__(self, base: str, users: list[str], items: list[str], batch: int):
        self.base, self.users, self.items, self.batch = base, users, items, batch
        self.accepted: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.batches: list[tuple[float, float]] = []  # monotonic (sent, accepted) of each batch
        self.statuses: Counter = Counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        number = 0
        while not self.stop.is_set():
            events = []
            for k in range(self.batch):
                user = self.users[(number + k) % len(self.users)]
                events.append({"event_id": f"{user}-{number + k}", "user_id": user, "type": "click",
                               "item_id": self.items[(number + 7 * k) % len(self.items)], "ts": time.time()})
            sent = time.monotonic()
            self.post(events)
            for e in sorted(events, key=lambda e: (e["user_id"], e["ts"])):  # the shard's order in a batch
                self.accepted[e["user_id"]].append(e)
            self.batches.append((sent, time.monotonic()))
            number += self.batch
            time.sleep(0.05)

    def post(self, events: list[dict[str, Any]]) -> None:
        while True:
            try:
                r = requests.post(f"{self.base}/v1/events", json={"events": events},
                                  headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
                self.statuses[r.status_code] += 1
                if r.status_code == 200:
                    return
                wait = float(r.headers.get("Retry-After", 0.5))
            except requests.RequestException:
                self.statuses["connection error"] += 1
                wait = 0.5
            time.sleep(wait)


def shard_nodes(cfg: ServeConfig) -> list[str]:
    """The node id each shard actor runs on now."""
    handles = get_or_create_shards(cfg, APP)
    return [address["node_id"] for address in ray.get([h.read_address.remote() for h in handles], timeout=300)]


def lost_and_mismatched(cfg: ServeConfig, accepted: dict[str, list[dict[str, Any]]]) -> tuple[int, int]:
    """(accepted events missing from the shards, profiles that differ from a batch rebuild)."""
    recommender = load_serving_recommender(cfg)
    held = {}
    for handle in get_or_create_shards(cfg, APP):
        held.update({s.user_id: s for s in states_from_table(ray.get(handle.state_table.remote()))})
    lost = mismatched = 0
    for user, events in accepted.items():
        expected = build_profile(user, [Event(**e) for e in events], recommender.vector_of, recommender.params,
                                 recommender.index.meta)
        got = held.get(user)
        lost += max(0, expected.n_events - (got.n_events if got else 0))
        if got is None or states_to_table([got]).to_pylist() != states_to_table([expected]).to_pylist():
            mismatched += 1
    return lost, mismatched


def run(cfg: ServeConfig, before_s: float, after_s: float, users: int, batch: int) -> dict[str, Any]:
    """Start the cluster and the service, remove the shards' node while events flow; the figures."""
    moto, state = start_bucket()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    doomed = cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        port = free_port()
        # one proxy: the two nodes share this machine's ports
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        with tempfile.NamedTemporaryFile("w", suffix=".token", delete=False) as f:
            f.write(TOKEN)
        cfg = serving_config(dataclasses.replace(cfg, state_dir=state, token_file=f.name, num_shards=2))
        get_or_create_shards(cfg, APP, NodeAffinitySchedulingStrategy(doomed.node_id, soft=True))
        placed = shard_nodes(cfg)
        serve.run(build_app(cfg), name=APP, route_prefix="/")
        items = read_prepared(cfg.prepared).items.column("item_id").to_pylist()
        sender = Sender(f"http://127.0.0.1:{port}", [f"nl-user-{n}" for n in range(users)], items, batch)
        sender.thread.start()
        time.sleep(before_s)
        lost_at = time.monotonic()
        cluster.remove_node(doomed, allow_graceful=False)
        time.sleep(after_s)
        sender.stop.set()
        sender.thread.join()
        # a batch sent before the loss may have been logged before it too: count from those sent after
        after = [accepted for sent, accepted in sender.batches if sent > lost_at]
        moved = shard_nodes(cfg)
        lost, mismatched = lost_and_mismatched(cfg, sender.accepted)
        return {"shards_on_removed_node": sum(n == doomed.node_id for n in placed),
                "shards_on_removed_node_after": sum(n == doomed.node_id for n in moved),
                "accepted_events": sum(map(len, sender.accepted.values())),
                "batches_after_loss": len(after),
                "first_write_after_loss_s": round(after[0] - lost_at, 2) if after else None,
                "statuses": {str(k): v for k, v in sender.statuses.items()},
                "lost": lost, "mismatched_profiles": mismatched}
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
        moto.stop()


def main() -> None:
    from profilerec.cli.pipeline import stage_configs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="work", help="a work folder built by `profilerec demo`")
    parser.add_argument("--prepared", help="instead of --work_dir: the four folders the service reads")
    parser.add_argument("--embeddings")
    parser.add_argument("--model")
    parser.add_argument("--profiles")
    parser.add_argument("--before_s", type=float, default=20.0, help="events flow this long before the loss")
    parser.add_argument("--after_s", type=float, default=60.0, help="and this long after it")
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="print one JSON line with the figures")
    args = parser.parse_args()
    cfg = stage_configs(PipelineConfig(work_dir=args.work_dir)).serve
    if args.prepared:
        cfg = ServeConfig(prepared=args.prepared, embeddings=args.embeddings, model=args.model, profiles=args.profiles)
    result = run(cfg, args.before_s, args.after_s, args.users, args.batch)
    if args.json:
        print(json.dumps(result))
        return
    print(f"shards on the removed node: {result['shards_on_removed_node']} before, "
          f"{result['shards_on_removed_node_after']} after; "
          f"first accepted write {result['first_write_after_loss_s']} s "
          f"after the loss; answers {result['statuses']}")
    print(f"{result['lost']} accepted events lost of {result['accepted_events']}, "
          f"{result['mismatched_profiles']} profiles differ from a batch rebuild")


if __name__ == "__main__":
    main()

"""Soak + chaos: minutes of mixed open-loop load on the live service while a killer ends a random
profile shard actor, Ingress replica or Encoder replica every 20-40 s; then a check that every
accepted event is in exactly one profile exactly once.

    python bench/chaos.py --work_dir work --minutes 10     # a work folder built by `profilerec demo`

Traffic stays on localhost. The load, on a fixed schedule (open loop: latency is measured from the
scheduled send time, so waiting counts):

- event batches at --event_rate events/s, sent by --lanes lanes that each own a disjoint set of
  users and send their batches in order (a lane's next batch waits for the previous answer), so
  every user's events reach the service in a known order and a batch rebuild can be exact;
- recommendation and profile reads at --read_rate/s of users with accepted events;
- a PUT /v1/items every 15 s, and a DELETE of one of --doomed users (given events at the start)
  spread over the run.

Clients retry a 503 (after its Retry-After) and a connection error with the same request, as the
API tells them to; every other answer but a 2xx is counted as unexpected (and writes are retried
all the same, so the final check still holds). A calm phase without kills comes first, for the
latencies to compare with.

At the end: every user's profile, as the shard actors hold it, against a batch rebuild from the
client's own record of accepted events (profile.build_profile); deleted users absent from every
shard and from every file of the state folder; the resident memory of every Ray process sampled
through the run (growth over the last half of the run, at most its last 5 minutes, after warm-up).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

import aiohttp
import numpy as np
import ray
from machine import describe  # bench/machine.py (the script's folder is on sys.path)
from processes import ray_processes, rss_kib
from profilerec.config import PipelineConfig, ServeConfig
from profilerec.data import storage
from profilerec.data.datasets import read_prepared
from profilerec.data.schema import Event
from profilerec.model.profile import build_profile, states_from_table, states_to_table
from profilerec.service.api import build_app
from profilerec.service.auth import api_token
from profilerec.service.shard import shard_of
from profilerec.service.shard_actors import NAMESPACE, load_serving_recommender, shard_actor_name
from ray import serve

APP = "chaos"
REPLICA_KINDS = ("Ingress", "Encoder")
# the service's own 500s are JSON with a "detail"; a 500 without it is Serve's proxy answering for a
# request in flight on an Ingress replica that died (ray/serve/_private/http_util.py): no setting
# of Serve 2.60 turns that into a 503
SERVICE_ERROR_PREFIX = '{"detail"'


@dataclass
class Settings:
    """One chaos run (see the module docstring)."""

    seconds: float = 600.0
    calm_seconds: float = 120.0
    event_rate: float = 300.0
    batch: int = 20
    lanes: int = 30
    users: int = 400
    doomed: int = 20
    read_rate: float = 60.0
    kill_every: tuple[float, float] = (20.0, 40.0)
    ingress_replicas: int = 2
    seed: int = 0


@dataclass
class Ledger:
    """What the clients saw: accepted events per user in the order they were sent, answers."""

    accepted: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    deleted: set[str] = field(default_factory=set)
    statuses: Counter = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    connection_errors: int = 0
    cut_by_replica_death: int = 0  # Serve's proxy answers 500 for a request whose replica died under it
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    kills: list[tuple[float, str, str]] = field(default_factory=list)  # (seconds since start, kind, actor name)
    calls: list[tuple[str, float, float]] = field(default_factory=list)  # (kind, sent, answered) since start
    rss: dict[int, list[tuple[float, str, int]]] = field(default_factory=lambda: defaultdict(list))


class Client:
    """HTTP calls that follow the API's retry rules and record every answer in the ledger."""

    def __init__(self, session: aiohttp.ClientSession, base: str, token: str, ledger: Ledger):
        self.session, self.base, self.ledger = session, base, ledger
        self.auth = {"Authorization": f"Bearer {token}"}
        self.start = time.monotonic()  # the run's clock: kills, calls and memory samples count from here

    async def call(self, method: str, path: str, body: Any = None, retry: bool = True) -> Optional[Any]:
        """The JSON answer of the first 2xx; None for a read that got anything else."""
        while True:
            try:
                async with self.session.request(method, self.base + path, json=body, headers=self.auth,
                                                timeout=aiohttp.ClientTimeout(total=120)) as response:
                    self.ledger.statuses[response.status] += 1
                    text = await response.text()
                    if response.status < 300:
                        return await response.json() if text else None
                    retry_after = response.headers.get("Retry-After")
                    if response.status == 503 and retry_after is not None:
                        await asyncio.sleep(float(retry_after))
                        continue
                    if response.status == 500 and not text.startswith(SERVICE_ERROR_PREFIX):
                        self.ledger.cut_by_replica_death += 1
                    else:
                        self.ledger.unexpected.append(f"{method} {path.split('?')[0]}: {response.status} {text[:200]}")
            except (aiohttp.ClientError, asyncio.TimeoutError):
                self.ledger.connection_errors += 1
            if not retry:
                return None
            await asyncio.sleep(0.5)


def event(user: str, number: int, item: str) -> dict[str, Any]:
    return {"event_id": f"{user}-e{number}", "user_id": user, "item_id": item,
            "type": ("view", "click", "cart", "purchase")[number % 4], "ts": time.time()}


async def lane(client: Client, users: list[str], items: list[str], rate: float, size: int, until: float,
               rng: random.Random) -> None:
    """Event batches for `users` at `rate` batches/s, each sent once the previous one is accepted."""
    start, sent = time.monotonic(), 0
    numbers: Counter = Counter()
    while True:
        scheduled = start + sent / rate
        if scheduled >= until:
            return
        await asyncio.sleep(max(0.0, scheduled - time.monotonic()))
        batch = []
        for user in rng.choices(users, k=size):
            batch.append(event(user, numbers[user], rng.choice(items)))
            numbers[user] += 1
        sent_at = time.monotonic()
        await client.call("POST", "/v1/events", {"events": batch})
        client.ledger.latencies["events"].append(time.monotonic() - scheduled)
        client.ledger.calls.append(("write", sent_at - client.start, time.monotonic() - client.start))
        # the shard applies a batch in (user, time) order: the rebuild does the same
        for e in sorted(batch, key=lambda e: (e["user_id"], e["ts"])):
            client.ledger.accepted[e["user_id"]].append(e)
        sent += 1


async def reads(client: Client, users: list[str], rate: float, until: float, phase: str, rng: random.Random) -> None:
    """Recommendation and profile reads, open loop, of users with accepted events."""
    start, sent, pending = time.monotonic(), 0, set()

    async def one(scheduled: float, path: str, kind: str) -> None:
        sent_at = time.monotonic()
        await client.call("GET", path, retry=False)
        client.ledger.latencies[f"{kind} ({phase})"].append(time.monotonic() - scheduled)
        client.ledger.calls.append(("read", sent_at - client.start, time.monotonic() - client.start))

    while True:
        scheduled = start + sent / rate
        if scheduled >= until:
            break
        await asyncio.sleep(max(0.0, scheduled - time.monotonic()))
        known = [u for u in users if client.ledger.accepted.get(u)]
        if known:
            user = rng.choice(known)
            path, kind = ((f"/v1/users/{user}/recommendations?k=10", "recommendations") if sent % 2 == 0
                          else (f"/v1/users/{user}/profile", "profile"))
            pending.add(asyncio.ensure_future(one(scheduled, path, kind)))
        sent += 1
    await asyncio.gather(*pending)


async def deletes(client: Client, doomed: list[str], start: float, until: float) -> None:
    """Forget the doomed users one by one, spread over the run."""
    for i, user in enumerate(doomed):
        await asyncio.sleep(max(0.0, start + (i + 0.5) * (until - start) / len(doomed) - time.monotonic()))
        await client.call("DELETE", f"/v1/users/{user}")
        client.ledger.deleted.add(user)


async def items(client: Client, until: float) -> None:
    """A new item every 15 s (encoded by the Encoder deployment, which the killer also ends)."""
    number = 0
    while time.monotonic() + 15 < until:
        await asyncio.sleep(15)
        await client.call("PUT", "/v1/items", {"items": [{"item_id": f"chaos-item-{number}",
                                                           "title": f"chaos test item number {number}"}]})
        number += 1


def victims(app: str) -> dict[str, list[tuple[str, str]]]:
    """(name, namespace) of the running shard actors and Serve replicas of `app`, by kind."""
    found: dict[str, list[tuple[str, str]]] = {"shard": [], **{kind: [] for kind in REPLICA_KINDS}}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name, namespace = actor["name"], actor["namespace"]
        if namespace == NAMESPACE and name.startswith(f"{app}-shard-"):
            found["shard"].append((name, namespace))
        for kind in REPLICA_KINDS:
            if namespace == "serve" and f"{app}#{kind}#" in name:
                found[kind].append((name, namespace))
    return found


async def killer(ledger: Ledger, app: str, every: tuple[float, float], start: float, until: float,
                 rng: random.Random) -> None:
    """End a random shard actor or Serve replica every `every` seconds (Ray and Serve restart them)."""
    while True:
        await asyncio.sleep(rng.uniform(*every))
        if time.monotonic() >= until:
            return
        kind = rng.choice(["shard", *REPLICA_KINDS])
        running = victims(app)[kind]
        if not running:
            continue
        name, namespace = rng.choice(running)
        try:
            # a shard actor is restarted by Ray (max_restarts=-1); a replica is replaced by Serve
            ray.kill(ray.get_actor(name, namespace=namespace), no_restart=kind != "shard")
            ledger.kills.append((time.monotonic() - start, kind, name))
        except ValueError:  # gone meanwhile
            pass


async def sample_memory(ledger: Ledger, start: float, until: float, every: float = 5.0) -> None:
    while time.monotonic() < until:
        for pid, title in ray_processes().items():
            kib = rss_kib(pid)
            if kib is not None:
                ledger.rss[pid].append((time.monotonic() - start, title, kib))
        await asyncio.sleep(every)


def memory_growth(ledger: Ledger, window_start: float) -> list[tuple[float, str, int, int]]:
    """(growth, title, first KiB, last KiB) from `window_start` to the last sampling round, of
    each process that lived through that whole window, largest growth first."""
    last_round = max((samples[-1][0] for samples in ledger.rss.values()), default=0.0)
    growth = []
    for samples in ledger.rss.values():
        inside = [s for s in samples if s[0] >= window_start]
        # a round lists every process in a moment: alive at the last one means sampled within it
        if len(inside) < 2 or samples[0][0] > window_start or samples[-1][0] < last_round - 1:
            continue
        first, last = inside[0][2], inside[-1][2]
        growth.append(((last - first) / first, inside[0][1], first, last))
    return sorted(growth, reverse=True)


async def run_load(base: str, token: str, item_ids: list[str], s: Settings) -> Ledger:
    """The calm phase, then the chaos phase (see the module docstring)."""
    ledger, rng = Ledger(), random.Random(s.seed)
    users = [f"chaos-u{n}" for n in range(s.users)]
    doomed = [f"chaos-doomed-{n}" for n in range(s.doomed)]
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector) as session:
        client = Client(session, base, token, ledger)
        for user in doomed:  # their events first: the deletes come during the chaos
            events = [event(user, n, rng.choice(item_ids)) for n in range(3)]
            await client.call("POST", "/v1/events", {"events": events})
        start = client.start = time.monotonic()
        calm_end, end = start + s.calm_seconds, start + s.calm_seconds + s.seconds
        per_lane = [users[i::s.lanes] for i in range(s.lanes)]
        batch_rate = s.event_rate / s.batch / s.lanes
        await asyncio.gather(
            *(lane(client, group, item_ids, batch_rate, s.batch, end, random.Random(s.seed + i))
              for i, group in enumerate(per_lane)),
            reads(client, users, s.read_rate, calm_end, "calm", rng),
            _after(calm_end, reads(client, users, s.read_rate, end, "chaos", random.Random(s.seed + 99))),
            _after(calm_end, deletes(client, doomed, calm_end, end)),
            _after(calm_end, items(client, end)),
            _after(calm_end, killer(ledger, APP, s.kill_every, start, end, random.Random(s.seed + 7))),
            sample_memory(ledger, start, end),
        )
    return ledger


async def _after(when: float, coroutine: Any) -> Any:
    await asyncio.sleep(max(0.0, when - time.monotonic()))
    return await coroutine


def recovery_after_kills(ledger: Ledger, within_s: float = 5.0) -> dict[str, dict[str, list[float]]]:
    """For each kind of kill, the longest a write and a read sent within `within_s` of a kill of
    that kind took to be answered: what a client saw of the restart."""
    waits: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"write": [], "read": []})
    for at, kind, _ in ledger.kills:
        for call in ("write", "read"):
            took = [done - sent for c, sent, done in ledger.calls if c == call and at <= sent <= at + within_s]
            if took:
                waits[kind][call].append(max(took))
    return dict(waits)


def live_states(cfg: ServeConfig) -> dict[str, list]:
    """user -> the shards (as numbers) holding them and each shard's state, from the actors."""
    held = defaultdict(list)
    for shard in range(cfg.num_shards):
        actor = ray.get_actor(shard_actor_name(APP, shard, cfg.num_shards), namespace=NAMESPACE)
        for state in states_from_table(ray.get(actor.state_table.remote())):
            held[state.user_id].append((shard, state))
    return held


def check(cfg: ServeConfig, ledger: Ledger) -> dict[str, Any]:
    """Compare the shards' profiles with a batch rebuild from the ledger (see the module docstring)."""
    recommender = load_serving_recommender(cfg)
    held = live_states(cfg)
    lost = twice = wrong_shard = mismatched = 0
    for user, events in ledger.accepted.items():
        if user in ledger.deleted:
            continue
        expected = build_profile(user, [Event(**e) for e in events], recommender.vector_of, recommender.params,
                                 recommender.index.meta)
        places = held.get(user, [])
        if [shard for shard, _ in places] != [shard_of(user, cfg.num_shards)]:
            wrong_shard += 1
        got = places[0][1].n_events if places else 0
        lost += max(0, expected.n_events - got)
        twice += max(0, got - expected.n_events)
        if not places or states_to_table([places[0][1]]).to_pylist() != states_to_table([expected]).to_pylist():
            mismatched += 1
    still_held = [u for u in ledger.deleted if u in held]
    in_files = set()
    _, root = storage.resolve(cfg.state_dir)
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                data = f.read()
            in_files.update(u for u in ledger.deleted if u.encode() in data)
    return {"users": len(ledger.accepted) - len(ledger.deleted),
            "accepted_events": sum(map(len, ledger.accepted.values())),
            "lost": lost, "applied_twice": twice, "wrong_shard": wrong_shard, "mismatched_profiles": mismatched,
            "deleted": len(ledger.deleted), "deleted_still_held": len(still_held),
            "deleted_still_in_files": len(in_files)}


def run_chaos(cfg: ServeConfig, s: Settings, serve_url: str) -> dict[str, Any]:
    """Deploy the service on `cfg` behind the running Serve proxy at `serve_url`, run the load
    with the killer, check; returns the report."""
    # two ingress replicas, as a deployment that must stay up through a replica's death runs
    serve.run(build_app(cfg, num_replicas=s.ingress_replicas), name=APP, route_prefix=f"/{APP}")
    item_ids = read_prepared(cfg.prepared).items.column("item_id").to_pylist()
    ledger = asyncio.run(run_load(f"{serve_url}/{APP}", api_token(cfg), item_ids, s))
    report = check(cfg, ledger)
    window_end = s.calm_seconds + s.seconds
    window_start = max(s.calm_seconds + s.seconds / 2, window_end - 300)
    growth = memory_growth(ledger, window_start)
    report.update(
        unexpected=len(ledger.unexpected), unexpected_examples=ledger.unexpected[:5],
        connection_errors=ledger.connection_errors, cut_by_replica_death=ledger.cut_by_replica_death,
        statuses=dict(ledger.statuses), kills=ledger.kills,
        memory_window_s=(round(window_start), round(window_end)),
        max_memory_growth=growth[0] if growth else None, recovery_s=recovery_after_kills(ledger),
        latency_ms={kind: {"p50": 1000 * float(np.percentile(v, 50)), "p99": 1000 * float(np.percentile(v, 99)),
                           "n": len(v)} for kind, v in sorted(ledger.latencies.items()) if v})
    serve.delete(APP)
    return report


def print_report(report: dict[str, Any], s: Settings) -> None:
    print(f"\nmachine: {describe()}")
    print(f"{s.seconds / 60:g} min of chaos after {s.calm_seconds / 60:g} min calm: events {s.event_rate:g}/s in "
          f"batches of {s.batch}, reads {s.read_rate:g}/s; {len(report['kills'])} kills: "
          + ", ".join(f"{kind} {n}" for kind, n in Counter(k for _, k, _ in report["kills"]).items()))
    for kind, lat in report["latency_ms"].items():
        print(f"  {kind:28s} p50 {lat['p50']:8.1f} ms   p99 {lat['p99']:8.1f} ms   ({lat['n']} requests)")
    for kind, waits in report["recovery_s"].items():
        print(f"  after a {kind} kill, the slowest call sent within 5 s took: "
              + "; ".join(f"{call}s median {np.median(w):.1f} s, max {max(w):.1f} s" for call, w in waits.items() if w))
    print(f"answers: {report['statuses']}, connection errors retried: {report['connection_errors']}, "
          f"requests cut by an Ingress replica's death (Serve's proxy answers 500; retried): "
          f"{report['cut_by_replica_death']}")
    for example in report["unexpected_examples"]:
        print(f"  unexpected: {example}")
    if report["max_memory_growth"]:
        g, title, first, last = report["max_memory_growth"]
        print(f"memory: largest growth over {report['memory_window_s'][0]}-{report['memory_window_s'][1]} s: "
              f"{100 * g:+.1f}% ({title}: {first // 1024} -> {last // 1024} MiB; goal < 5%)")
    print(f"{report['users']} users, {report['accepted_events']} accepted events: "
          f"{report['mismatched_profiles']} profiles "
          f"differ from the rebuild, {report['wrong_shard']} users on a wrong or second shard, "
          f"{report['applied_twice']} events applied twice; deleted users still held: {report['deleted_still_held']}, "
          f"still in state files: {report['deleted_still_in_files']}")
    print(f"{report['lost']} accepted events lost, {report['unexpected']} unexpected responses")


def main() -> None:
    from profilerec.cli.pipeline import stage_configs
    from profilerec.config import RayConfig
    from profilerec.runtime.cluster import init_ray

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="work", help="a work folder built by `profilerec demo`")
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the chaos phase")
    parser.add_argument("--calm_minutes", type=float, default=2.0, help="length of the calm phase before it")
    parser.add_argument("--num_shards", type=int, default=2)
    parser.add_argument("--port", type=int, default=8124)
    args = parser.parse_args()
    work = storage.absolute(args.work_dir)
    cfg = dataclasses.replace(stage_configs(PipelineConfig(work_dir=work)).serve, num_shards=args.num_shards,
                              state_dir=storage.join(work, "chaos_serve_state"))
    storage.delete(cfg.state_dir)  # a fresh service state for every run
    init_ray(RayConfig())
    s = Settings(seconds=60 * args.minutes, calm_seconds=60 * args.calm_minutes)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    print_report(run_chaos(cfg, s, f"http://127.0.0.1:{args.port}"), s)


if __name__ == "__main__":
    main()

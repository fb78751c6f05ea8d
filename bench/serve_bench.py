"""Open-loop load on the live service, side by side with a no-op Serve deployment (the floor).

    python bench/serve_bench.py --work_dir work          # a work folder built by `profilerec demo`

Both applications run on one local Ray instance behind the same Serve HTTP proxy, without an
access log line per request (as serve/config.yaml deploys them); `--ingress_replicas N` runs the
service's ingress as N replicas (the floor keeps one):

- noop:       a FastAPI ingress answering GET /v1/users/{user_id}/recommendations with a constant;
- profilerec: the real service (serve/app.py) on the work folder, with durability on (every
              accepted event fsync'd to the write-ahead log before the answer).

Requests are sent on a fixed schedule (open loop: a slow answer does not delay the next send)
and each latency is measured from its scheduled send time, so queueing is counted. Phases:

  1. noop recommendations at --rate requests/s                       (the floor)
  2. profilerec recommendations at --rate requests/s, warm users
  2b. with --compare_socket: the same on a second profilerec application with board_users=0,
     whose ingress sends every read to the shard's socket (the service before profile_board.py)
  3. profilerec event batches of --batch events at --event_rate events/s
  4. mixed: recommendations at --rate/2 and event batches at --event_rate/2, at once

Phases 1 and 2 (and 2b) alternate in --rounds slices of --seconds/--rounds each, and each pools its
slices: a VM's speed can drift over a run by more than the gap being measured (docs/benchmarks.md),
and alternating puts both sides under the same drift.

Prints p50/p95/p99 latency, achieved throughput and errors per phase, then the ratios of
phases 2 (and 2b) to phase 1 (pooled, and the p50 ratio of each round), and the CPU each kind
of Ray process spent per request in each of them (from /proc, Linux only): on a small machine
latency follows the CPU a request costs; then how many recommendation reads the ingress scored
itself from a shard's board (profile_board.py) and how many went to the shard; and what the rest
of the machine did meanwhile (CPU stolen by the hypervisor, the load generator, other processes),
so that a run disturbed from outside shows as such. The load generator runs on the same machine
and takes CPU from the server.

Goals it checks (printed beside the ratios): recommendations at p50 at most 1.5x and p99 at most 3x
the floor's; at least 1000 events/s accepted with durability on. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp
import numpy as np
from machine import describe  # bench/machine.py (the script's folder is on sys.path)
from processes import anonymous_kib, private_kib, process_kind, ray_processes, rss_kib


@dataclass
class PhaseResult:
    name: str
    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    units: int = 0  # requests, or events for event phases
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # CPU spent by Ray process kind
    host_seconds: dict[str, float] = field(default_factory=dict)  # the rest of the machine: see add_host_spent
    round_p50_ms: list[float] = field(default_factory=list)  # p50 of each slice, when run in rounds

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(np.array(self.latencies) * 1000, q)) if self.latencies else float("nan")

    def line(self, unit: str) -> str:
        lat = self.latencies
        p50, p95, p99 = (self.percentile_ms(q) for q in (50, 95, 99))
        return (f"{self.name:<44} p50 {p50:7.2f} ms  p95 {p95:7.2f} ms  p99 {p99:7.2f} ms  "
                f"{self.units / self.seconds:8.1f} {unit}/s  ok {len(lat)}  errors {self.errors or 0}")


async def open_loop(session: aiohttp.ClientSession, rate: float, seconds: float,
                    make_request: Callable[[int], tuple[str, str, Any]], result: PhaseResult, per_ok: int = 1) -> None:
    """Send make_request(i) at t0 + i / rate for `seconds`; record latency from the scheduled time."""
    start = time.perf_counter() + 0.05
    tasks = []

    async def one(i: int, scheduled: float) -> None:
        method, url, body = make_request(i)
        try:
            async with session.request(method, url, json=body) as response:
                await response.read()
                if response.status == 200:
                    result.latencies.append(time.perf_counter() - scheduled)
                    result.units += per_ok
                else:
                    result.errors[str(response.status)] = result.errors.get(str(response.status), 0) + 1
        except aiohttp.ClientError as e:
            result.errors[type(e).__name__] = result.errors.get(type(e).__name__, 0) + 1

    for i in range(int(rate * seconds)):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, scheduled)))
    await asyncio.gather(*tasks)
    result.seconds += time.perf_counter() - start


def ray_cpu_seconds() -> dict[int, tuple[str, float]]:
    """pid -> (process title, CPU seconds so far) of every Ray worker process on this machine
    (Linux /proc; empty elsewhere). Titles lose the method part: `ray::ShardActor.apply` -> `ShardActor`."""
    found = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in (p for p in os.listdir("/proc") if p.isdigit()) if os.path.isdir("/proc") else ():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().split(b"\0")[0].decode("utf-8", "replace")
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if title.startswith("ray::"):
            found[int(pid)] = (title[len("ray::"):].split(".")[0].strip(), (int(fields[11]) + int(fields[12])) / tick)
    return found


def add_cpu_spent(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                  spent: dict[str, float]) -> None:
    """Add the CPU seconds each kind of Ray process spent between two ray_cpu_seconds() to `spent`."""
    for pid, (title, seconds) in after.items():
        spent[title] = spent.get(title, 0.0) + seconds - before.get(pid, (title, 0.0))[1]


def host_cpu_seconds() -> dict[str, float]:
    """CPU seconds so far, summed over the cores (Linux /proc/stat; empty elsewhere): busy in any
    process, stolen by the hypervisor (another VM had the core), and spent by this process."""
    if not os.path.exists("/proc/stat"):
        return {}
    with open("/proc/stat") as f:
        user, nice, system, _, _, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    tick, own = os.sysconf("SC_CLK_TCK"), os.times()
    return {"busy": (user + nice + system + irq + softirq) / tick, "stolen": steal / tick,
            "load generator": own.user + own.system}


def add_host_spent(before: dict[str, float], after: dict[str, float], ray_workers: float,
                   spent: dict[str, float]) -> None:
    """Add to `spent` what the machine did between two host_cpu_seconds() besides the Ray workers'
    `ray_workers` CPU seconds: stolen time, the load generator, and everything else (Ray's daemons,
    other programs). A side measured while these were high ran on a slower machine."""
    if not before:
        return
    delta = {key: after[key] - before[key] for key in before}
    for key, value in (("stolen", delta["stolen"]), ("load generator", delta["load generator"]),
                       ("other", delta["busy"] - ray_workers - delta["load generator"])):
        spent[key] = spent.get(key, 0.0) + value


def noop_app():
    """The floor: the same HTTP route shape, answered with a constant."""
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()

    @serve.deployment(name="Noop", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
    @serve.ingress(api)
    class Noop:
        @api.get("/v1/users/{user_id}/recommendations")
        async def recommendations(self, user_id: str, k: int = 10):
            return {"user_id": user_id, "items": []}

    return Noop.bind()


async def run_phases(args: argparse.Namespace, base: str, token: str, items: list[str]
                     ) -> tuple[list[tuple[PhaseResult, str]], list[PhaseResult], dict[str, int]]:
    """Every phase's result (with its unit), the alternating recommendation phases (the floor
    first), and how the ingress answered recommendation reads (board / shard)."""
    users = [f"bench-user-{n}" for n in range(args.users)]
    headers = {"Authorization": f"Bearer {token}"}
    connector = aiohttp.TCPConnector(limit=0)
    results = []
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        run_id = f"{time.time():.0f}"

        def events_body(i: int, tag: str, prefix: str = "") -> tuple[str, str, Any]:
            events = [{"event_id": f"{run_id}-{tag}-{i}-{j}", "user_id": users[(i * args.batch + j) % len(users)],
                       "item_id": items[(i * 31 + j * 7) % len(items)], "type": "click"} for j in range(args.batch)]
            return "POST", f"{base}{prefix}/v1/events", {"events": events}

        session.headers.update(headers)
        # warm-up: every bench user gets a few events, both apps answer a few requests
        warm_batches = 3 * len(users) // args.batch + 1  # about three events per user
        apps = ["", "/socket"] if args.compare_socket else [""]
        for prefix in apps:
            await open_loop(session, 20, warm_batches / 20, lambda i, p=prefix: events_body(i, "warm", p),
                            PhaseResult("warm-up", 0))
        for prefix in ["/noop"] + apps:
            await open_loop(session, 50, 1, lambda i, p=prefix: ("GET", f"{base}{p}/v1/users/{users[i % len(users)]}/recommendations?k=10", None),
                            PhaseResult("warm-up", 0))

        def recs(prefix: str) -> Callable[[int], tuple[str, str, Any]]:
            return lambda i: ("GET", f"{base}{prefix}/v1/users/{users[(i * 7) % len(users)]}/recommendations?k=10", None)

        noop = PhaseResult(f"1. no-op Serve deployment, {args.rate:g} req/s", 0)
        ours = PhaseResult(f"2. recommendations, {args.rate:g} req/s", 0)
        sides = [(noop, "/noop"), (ours, "")]
        if args.compare_socket:
            sides.append((PhaseResult("2b. same, every read to the shard (no board)", 0), "/socket"))
        for _ in range(args.rounds):
            for result, prefix in sides:
                before, host_before, seen = ray_cpu_seconds(), host_cpu_seconds(), len(result.latencies)
                ray_before = sum(result.cpu_seconds.values())
                await open_loop(session, args.rate, args.seconds / args.rounds, recs(prefix), result)
                add_cpu_spent(before, ray_cpu_seconds(), result.cpu_seconds)
                add_host_spent(host_before, host_cpu_seconds(), sum(result.cpu_seconds.values()) - ray_before,
                               result.host_seconds)
                result.round_p50_ms.append(float(np.percentile(result.latencies[seen:], 50)) * 1000)
        results += [(result, "req") for result, _ in sides]
        batches = args.event_rate / args.batch
        events = PhaseResult(f"3. events, {args.event_rate:g}/s in batches of {args.batch}", 0)
        await open_loop(session, batches, args.seconds, lambda i: events_body(i, "load"), events, per_ok=args.batch)
        results.append((events, "events"))
        mixed_recs = PhaseResult(f"4. mixed: recommendations, {args.rate / 2:g} req/s", 0)
        mixed_events = PhaseResult(f"4. mixed: events, {args.event_rate / 2:g}/s", 0)
        await asyncio.gather(
            open_loop(session, args.rate / 2, args.seconds, recs(""), mixed_recs),
            open_loop(session, batches / 2, args.seconds, lambda i: events_body(i, "mixed"), mixed_events,
                      per_ok=args.batch))
        results += [(mixed_recs, "req"), (mixed_events, "events")]
        async with session.get(f"{base}/healthz") as response:
            reads = (await response.json())["replica_reads"]
    return results, [result for result, _ in sides], reads


MEMORY_LINE = "memory of the serving processes, MiB resident/private/anonymous (the largest of each kind): "


def serving_memory() -> dict[str, tuple[int, int, int]]:
    """kind -> (resident, private, anonymous) MiB of the largest process of each kind of the
    service (processes.py says what each counts)."""
    largest: dict[str, tuple[int, int, int]] = {}
    for pid, title in ray_processes().items():
        sizes = (rss_kib(pid), private_kib(pid), anonymous_kib(pid))
        if None not in sizes:
            kind = process_kind(title)
            largest[kind] = max(largest.get(kind, (0, 0, 0)), tuple(size // 1024 for size in sizes))
    return dict(sorted(largest.items()))


def main() -> None:
    from profilerec.cli.pipeline import stage_configs
    from profilerec.config import PipelineConfig, RayConfig
    from profilerec.data import storage
    from profilerec.data.datasets import read_prepared
    from profilerec.runtime.cluster import init_ray
    from profilerec.service.api import build_app
    from profilerec.service.auth import api_token
    from ray import serve

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="work", help="a work folder built by `profilerec demo`")
    parser.add_argument("--rate", type=float, default=100.0, help="recommendation requests per second")
    parser.add_argument("--event_rate", type=float, default=1000.0, help="events per second")
    parser.add_argument("--batch", type=int, default=100, help="events per POST /v1/events")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=4, help="slices phases 1 and 2 alternate in")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--num_shards", type=int, default=2)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--ingress_replicas", type=int, default=1,
                        help="replicas of the service's ingress (serve/config.yaml autoscales 1-4)")
    parser.add_argument("--ingress_max_ongoing", type=int, default=None,
                        help="max_ongoing_requests of each ingress replica (default: the deployment's)")
    parser.add_argument("--compare_socket", action="store_true",
                        help="also run the service with board_users=0 (every read through the shard's socket) "
                             "as phase 2b, alternating with phases 1 and 2")
    args = parser.parse_args()

    work = storage.absolute(args.work_dir)
    # the demo's locations for the model and data; a separate, fresh state for the benchmark
    cfg = dataclasses.replace(stage_configs(PipelineConfig(work_dir=work)).serve, num_shards=args.num_shards,
                              state_dir=storage.join(work, "bench_serve_state"))
    storage.delete(cfg.state_dir)  # a fresh service state for every run
    # a second application's actors, or more replicas, need logical CPUs to be placed; the cores stay
    # what they are
    more = args.compare_socket or args.ingress_replicas > 1
    init_ray(RayConfig(num_cpus=2 * (os.cpu_count() or 2) if more else None))
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    # as serve/config.yaml deploys it: no access log line per request, in both applications
    quiet = {"enable_access_log": False}
    serve.run(noop_app(), name="noop", route_prefix="/noop", logging_config=quiet)
    ingress = {"num_replicas": args.ingress_replicas}
    if args.ingress_max_ongoing:
        ingress["max_ongoing_requests"] = args.ingress_max_ongoing
    serve.run(build_app(cfg, **ingress), name="profilerec-bench", route_prefix="/", logging_config=quiet)
    if args.compare_socket:
        socket_cfg = dataclasses.replace(cfg, board_users=0, state_dir=storage.join(work, "bench_serve_state_socket"),
                                         token_file=storage.join(cfg.state_dir, "api_token"))
        storage.delete(socket_cfg.state_dir)
        serve.run(build_app(socket_cfg, **ingress), name="profilerec-bench-socket",
                  route_prefix="/socket", logging_config=quiet)
    items = read_prepared(cfg.prepared).items.column("item_id").to_pylist()
    results, sides, reads = asyncio.run(run_phases(args, f"http://127.0.0.1:{args.port}", api_token(cfg), items))

    print(f"\nmachine: {describe()}\nRay Serve on localhost, "
          f"{args.ingress_replicas} ingress replica(s), {args.num_shards} profile shards, {len(items)} items, durability on (fsync per batch)")
    for result, unit in results:
        print(result.line(unit))
    noop = sides[0]
    print()
    for ours in sides[1:]:
        print(f"{ours.name[:3]} vs no-op floor at {args.rate:g} req/s: "
              f"p50 {ours.percentile_ms(50) / noop.percentile_ms(50):.2f}x (goal <= 1.5x), "
              f"p99 {ours.percentile_ms(99) / noop.percentile_ms(99):.2f}x (goal <= 3x); p50 ratio by round: "
              + ", ".join(f"{a / b:.2f}x" for a, b in zip(ours.round_p50_ms, noop.round_p50_ms)))
    for result in sides:
        per_request = {title: 1000 * s / max(result.units, 1)
                       for title, s in sorted(result.cpu_seconds.items(), key=lambda kv: -kv[1])}
        print(f"CPU per request, Ray processes ({result.name.split(' ')[0]} phase): "
              + ", ".join(f"{title} {ms:.2f} ms" for title, ms in per_request.items() if ms >= 0.05)
              + f"; total {sum(per_request.values()):.2f} ms")
    for result in sides:
        if result.host_seconds:
            cores = {key: s / result.seconds for key, s in result.host_seconds.items()}
            print(f"rest of the machine ({result.name.split(' ')[0]} phase), in cores: stolen by the hypervisor "
                  f"{cores['stolen']:.2f}, load generator {cores['load generator']:.2f}, everything but Ray "
                  f"workers {cores['other']:.2f} (Ray's daemons included)")
    print(f"recommendation reads the ingress scored from a shard's board: {reads['board']}, "
          f"that went to the shard: {reads['shard']}")
    events = results[len(sides)][0]  # the phase right after the alternating ones
    print(f"events accepted: {events.units / events.seconds:.0f}/s with durability on (goal >= 1000/s)")
    print(MEMORY_LINE + ", ".join(f"{kind} {'/'.join(map(str, sizes))}" for kind, sizes in serving_memory().items()))
    serve.delete("profilerec-bench")
    if args.compare_socket:
        serve.delete("profilerec-bench-socket")
    serve.delete("noop")


if __name__ == "__main__":
    main()

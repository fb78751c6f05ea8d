"""What one read costs between two processes: a Ray actor call vs the shard read socket.

    python bench/read_hop_bench.py [--rate 100] [--requests 2000]

An async "ingress" actor sends no-op reads at a fixed rate (open loop) to a "shard" actor, side
by side in one run: (a) as Ray actor calls, the way writes reach a shard, and (b) over the Unix
socket of read_channel.py, the way the service reads. Both answer the same trivial dict, so the
figures are the transport alone. They are why an ingress replica never takes the Ray hop to read a
shard on its own node (docs/serving.md, "The read path"). Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import numpy as np
import ray
from machine import describe  # bench/machine.py (the script's folder is on sys.path)
from profilerec.service.read_channel import ReadClient, serve_reads, socket_path


@ray.remote(num_cpus=0.25)
class Shard:
    """A shard stand-in answering `echo` both ways."""

    def __init__(self) -> None:
        self.server = None

    async def echo(self, n: int) -> dict:
        return {"n": n}

    async def read_address(self) -> str:
        if self.server is None:
            self.server = await serve_reads(socket_path("read-hop-bench"), {"echo": lambda n: {"n": n}})
        return self.server.sockets[0].getsockname()


@ray.remote(num_cpus=0.5)
class Ingress:
    """Sends reads at a fixed rate and measures each from its scheduled send time."""

    def __init__(self, shard: "ray.actor.ActorHandle", path: str) -> None:
        self.shard, self.client = shard, ReadClient(path)

    async def run(self, transport: str, requests: int, rate: float) -> list[float]:
        latencies: list[float] = []

        async def one(n: int, due: float) -> None:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            if transport == "ray":
                await self.shard.echo.remote(n)
            else:
                await self.client.call("echo", n=n)
            latencies.append(time.perf_counter() - due)

        start = time.perf_counter() + 0.1
        await asyncio.gather(*(one(n, start + n / rate) for n in range(requests)))
        return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    shard = Shard.remote()
    ingress = Ingress.remote(shard, ray.get(shard.read_address.remote()))
    print(f"machine: {describe()}\n{args.requests} no-op reads at {args.rate:.0f}/s each way")
    ray.get(ingress.run.remote("socket", 100, args.rate))  # warm-up, both ways
    ray.get(ingress.run.remote("ray", 100, args.rate))
    p50 = {}
    for transport in ("ray", "socket"):
        ms = np.array(ray.get(ingress.run.remote(transport, args.requests, args.rate))) * 1000
        p50[transport] = float(np.percentile(ms, 50))
        print(f"{transport:<7} p50 {p50[transport]:6.2f} ms  p95 {np.percentile(ms, 95):6.2f} ms  "
              f"p99 {np.percentile(ms, 99):6.2f} ms")
    print(f"Ray actor call / read socket, p50: {p50['ray'] / p50['socket']:.1f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()

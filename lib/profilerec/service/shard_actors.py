"""What the service loads and the shard actors it runs (the Ray Serve wiring is in serve/app.py).

Profile shards are named, detached Ray actors created by the application, one per shard, with
`max_restarts=-1`: when one dies, Ray restarts it and it rebuilds its users from its snapshot and
write-ahead log (shard_store.py). Calls to a restarting shard wait for it (`max_task_retries=-1`; safe,
every write is keyed by event id). Their names carry the application name and the shard count,
so a redeploy with the same settings finds the same actors, with their users in memory.

Two changes are handled when an ingress replica starts (`open_shards`):

- a changed shard count: the LayoutKeeper actor (one per application, one call at a time)
  retires the old shards (durably: they snapshot and refuse writes and deletes with ShardRetired,
  answered 503 + Retry-After, also after a restart), moves every user to the new layout
  (shard.repartition), records it in `<state_dir>/layout.json`, then stops the old actors and
  deletes the old layout. A move interrupted by a crash is redone from the start by the next
  replica; one abandoned by reverting the shard count leaves a half-written new layout, which is
  deleted, and retired shards, which take writes again;
- other changed settings (a new model, new embeddings): the shard snapshots, is stopped, and is
  started again with the new settings, recovering its users from the snapshot.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import time
from typing import Any, Optional, Sequence

import ray
from profilerec.config import ServeConfig, from_dict, to_dict
from profilerec.data import node_files, storage
from profilerec.data.datasets import read_catalog
from profilerec.data.learned import ITEMS_LOG, TEXTS_LOG, VectorLog
from profilerec.data.schema import Event
from profilerec.errors import ValidationError
from profilerec.model.encoder import text_hash
from profilerec.model.priors import read_priors
from profilerec.model.recommend import Recommender, load_profile_params, load_recommender
from profilerec.service.profile_board import BoardWriter
from profilerec.service.read_channel import serve_reads, socket_path
from profilerec.service.shard import ProfileShard, layout_root, layouts, max_state_bytes, repartition
from profilerec.service.shard_store import ShardStore
from profilerec.service.telemetry import ShardMetrics
from profilerec.threads import use_one_thread

log = logging.getLogger(__name__)

NAMESPACE = "profilerec"
LAYOUT_FILE = "layout.json"


def load_serving_recommender(cfg: ServeConfig, learned: Optional[dict[str, VectorLog]] = None) -> Recommender:
    """The item index, text vectors, profile params, item priors and scorer the service scores
    with, including the items and event texts learned while serving (the files of the `learned`
    logs not applied yet; see serving_logs)."""

    use_one_thread()  # a request is scored on one thread: requests, replicas and shards share the cores
    recommender = load_recommender(read_catalog(cfg.prepared), cfg.embeddings, load_profile_params(cfg.model), model=cfg.model)
    if cfg.profiles:
        recommender.set_priors(read_priors(cfg.profiles, recommender.index))
    recommender.apply_learned(learned or serving_logs(cfg))
    recommender.use_retrieval(cfg.retrieval)  # after: the index may hold some of the items learned
    if recommender.scorer is not None:
        # the scorer's item rows now, not on the first request (seconds at a million items)
        recommender.scorer.frozen()
    # the catalog's ids and their row table live as long as the process: out of the garbage
    # collector's full passes, which would otherwise walk millions of them while requests wait
    gc.freeze()
    return recommender


def watch_index(recommender: Recommender, every_s: float) -> threading.Event:
    """Every `every_s` seconds (0: never), look for a rebuilt index at the recommender's index
    folder and load it for the recommender to swap in (Recommender.load_rebuilt_index), on a
    thread of its own: loading a million items' index takes seconds no request should wait for.
    Returns the event that stops the watching when set."""
    stop = threading.Event()
    retrieval = recommender.retrieval
    if every_s <= 0 or retrieval is None or not retrieval.source:
        return stop

    def watch() -> None:
        refused = ""
        while not stop.wait(every_s):
            try:
                recommender.load_rebuilt_index()
            except Exception as error:  # noqa: BLE001 - a thread of its own: say why, keep the index in use
                if str(error) != refused:
                    log.warning("keeping the index in use, not the one now at %s: %s", retrieval.source, error)
                    refused = str(error)

    threading.Thread(target=watch, name="index-watch", daemon=True).start()
    return stop


def serving_logs(cfg: ServeConfig) -> dict[str, VectorLog]:
    """The durable logs of items and event texts learned while serving (learned.py)."""
    return {name: VectorLog(cfg.state_dir, name) for name in (ITEMS_LOG, TEXTS_LOG)}


class ShardActor:
    """A ProfileShard inside a Ray actor (wrapped with ray.remote by the service).

    An asyncio actor whose methods never await: each runs whole, one after the other, and the
    read socket (read_address) is served on the same event loop between them."""

    def __init__(self, shard: int, config: dict[str, Any], name: str):

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.config = config
        self.cfg = from_dict(ServeConfig, config)
        self.learned = serving_logs(self.cfg)
        # items and texts learned while serving come first: the log being recovered may use them
        recommender = load_serving_recommender(self.cfg, self.learned)
        self.board: Optional[BoardWriter] = None
        if self.cfg.board_users > 0:
            location = node_files.process_file(name, ".board")
            try:
                self.board = BoardWriter(location, self.cfg.board_users, max_state_bytes(recommender))
                self.board.set_fingerprint(self.learned[ITEMS_LOG].fingerprint)
            except OSError as error:
                log.warning("profile shard %d runs without a board, so every read of its users goes to it: "
                            "could not create %s (%s); free space there or lower board_users", shard, location, error)
        store = ShardStore(layout_root(self.cfg.state_dir, self.cfg.num_shards), shard)
        self.shard = ProfileShard(shard, recommender, store, snapshot_every=self.cfg.snapshot_every, board=self.board,
                                  tombstone_ttl_s=self.cfg.tombstone_ttl_s)
        watch_index(recommender, self.cfg.retrieval.reload_s)
        self.metrics = ShardMetrics(shard)
        self.name = name
        self.reads: Optional[asyncio.Future] = None  # the read socket's server, from the first read_address

    async def apply(self, events: Sequence[Event]) -> dict[str, int]:
        started = time.perf_counter()
        index, texts = self.shard.recommender.index, self.shard.recommender.text_vectors
        if any((e.item_id is not None and e.item_id not in index) or (e.text and text_hash(e.text) not in texts)
               for e in events):
            self._sync_learned()  # items or texts learned through another ingress replica a moment ago
            unknown = next((e.item_id for e in events if e.item_id is not None and e.item_id not in index), None)
            if unknown is not None:
                raise ValidationError("item_id", f"unknown item {unknown!r}")
        result = self.shard.apply(events)
        self.metrics.batch_applied(result, time.perf_counter() - started, len(self.shard.users))
        return result

    async def recommend(self, user_id: str, k: int, exclude_seen: bool, brand: Optional[str],
                  category: Optional[str]) -> dict[str, Any]:
        return self.shard.recommend(user_id, k, exclude_seen, brand, category)

    async def describe(self, user_id: str) -> Optional[dict[str, Any]]:
        return self.shard.describe(user_id)

    async def state_table(self):
        return self.shard.snapshot_table()

    async def forget(self, user_id: str) -> bool:
        return self.shard.forget(user_id)

    async def stats(self) -> dict[str, Any]:
        return self.shard.stats()

    async def sync_learned(self) -> int:
        """Apply the items and texts learned since the last call; returns how many."""
        return self._sync_learned()

    def _sync_learned(self) -> int:
        applied = self.shard.recommender.apply_learned(self.learned)
        if self.board is not None:  # before any state naming the new items' rows is put on it
            self.board.set_fingerprint(self.learned[ITEMS_LOG].fingerprint)
        return applied

    async def read_address(self) -> dict[str, Optional[str]]:
        """Where this actor answers reads without a Ray call: its node, its socket (read_channel.py)
        and its board (profile_board.py; None when off)."""

        if self.reads is None:  # a future, so that callers arriving together share one server
            operations = {"recommend": self.shard.recommend, "describe": self.shard.describe}
            self.reads = asyncio.ensure_future(serve_reads(socket_path(self.name), operations))
        server = await self.reads
        return {"node_id": ray.get_runtime_context().get_node_id(), "path": server.sockets[0].getsockname(),
                "board": self.board.path if self.board is not None else None}

    async def settings(self) -> dict[str, Any]:
        """The ServeConfig this shard runs with (as a dict)."""
        return self.config

    async def retire(self) -> None:
        """Snapshot everything and refuse writes from now on, restarts included (reads still work)."""
        if not self.shard.retired:
            self.shard.retire()

    async def snapshot(self) -> None:
        """Write the shard's whole state now (recovery then replays no log)."""
        self.shard.snapshot()

    async def resume(self) -> None:
        """Take writes again after an abandoned move."""
        self.shard.resume()

    async def ping(self) -> int:
        return os.getpid()


class LayoutKeeper:
    """Brings the durable shard layout and the running shards in line with the configured
    settings before an ingress uses them; one call at a time, so replicas starting together
    cannot race (see the module docstring)."""

    def ensure(self, config: dict[str, Any], app_name: str) -> dict[str, Any]:
        """Re-partition for a changed shard count, remove every other layout (the old one of a
        finished move, or the half-written new one of a move abandoned by reverting the count),
        let the current layout's shards take writes, restart shards whose settings changed;
        returns the current layout."""

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        cfg = from_dict(ServeConfig, config)
        location = storage.join(cfg.state_dir, LAYOUT_FILE)
        current = storage.read_json(location)["num_shards"] if storage.exists(location) else cfg.num_shards
        if current != cfg.num_shards:
            log.info("re-partitioning the profiles from %d to %d shards", current, cfg.num_shards)
            started = time.perf_counter()
            # durable: an old shard restarted from here on still refuses writes
            ray.get([handle.retire.remote() for _, handle in find_shards(app_name, current)])
            moved = repartition(cfg.state_dir, current, cfg.num_shards, load_serving_recommender(cfg))
            log.info("moved %d users from %d to %d shards in %.1f s", moved, current, cfg.num_shards,
                     time.perf_counter() - started)
        layout = {"num_shards": cfg.num_shards}
        storage.write_json(layout, location, durable=True)
        for n in layouts(cfg.state_dir):
            if n != cfg.num_shards:
                for name, _ in find_shards(app_name, n):
                    stop_actor(name)
                storage.delete(layout_root(cfg.state_dir, n))
        running = dict(find_shards(app_name, cfg.num_shards))
        for shard in range(cfg.num_shards):  # retired by a move that was then abandoned
            name = shard_actor_name(app_name, shard, cfg.num_shards)
            if name in running:
                ray.get(running[name].resume.remote())
            else:
                ShardStore(layout_root(cfg.state_dir, cfg.num_shards), shard).clear_retired()
        for name, handle in running.items():
            if ray.get(handle.settings.remote()) != config:
                log.info("settings changed: restarting profile shard actor %s with the new ones", name)
                ray.get(handle.snapshot.remote())  # a quicker recovery; the log alone would do
                stop_actor(name)
        return layout


def shard_actor_name(app_name: str, shard: int, num_shards: int) -> str:
    """Stable name of a shard actor: a redeploy with the same shard count finds it again."""
    return f"{app_name}-shard-{shard}-of-{num_shards}"


def find_shards(app_name: str, num_shards: int) -> list[tuple[str, Any]]:
    """(name, handle) of the running shard actors of a `num_shards` layout (missing ones skipped)."""

    found = []
    for shard in range(num_shards):
        name = shard_actor_name(app_name, shard, num_shards)
        try:
            found.append((name, ray.get_actor(name, namespace=NAMESPACE)))
        except ValueError:
            pass
    return found


def stop_actor(name: str, timeout_s: float = 60.0) -> None:
    """Kill the named detached actor for good and wait until its name is free again."""

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            handle = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return
        ray.kill(handle, no_restart=True)
        time.sleep(0.2)
    raise TimeoutError(f"actor {name} did not stop within {timeout_s:.0f} s")


def stop_application_actors(app_name: str) -> list[str]:
    """Stop every shard actor (of any layout) and the LayoutKeeper of application `app_name`;
    returns their names. They are detached, so deleting the Serve application leaves them running:
    stop them before replacing the state folder they write to (a restore)."""

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == NAMESPACE and (a["name"].startswith(f"{app_name}-shard-")
                                                 or a["name"] == f"{app_name}-layout")]
    for name in names:
        stop_actor(name)
    return names


def open_shards(cfg: ServeConfig, app_name: str) -> list[Any]:
    """Handles of this application's shard actors, once the LayoutKeeper has brought the durable
    layout and the running shards in line with `cfg`."""

    keeper = ray.remote(LayoutKeeper).options(
        name=f"{app_name}-layout", namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, max_task_retries=-1, num_cpus=0, max_concurrency=1).remote()
    ray.get(keeper.ensure.remote(to_dict(cfg), app_name))
    return get_or_create_shards(cfg, app_name)


def get_or_create_shards(cfg: ServeConfig, app_name: str, scheduling_strategy: Any = None) -> list[Any]:
    """Handles of this application's shard actors, creating the missing ones (placed by
    `scheduling_strategy` when given, e.g. a soft node affinity: Ray restarts an actor with the
    same strategy, so a soft one lets a shard move when its node is gone)."""
    actor_cls = ray.remote(ShardActor)
    handles = []
    for shard in range(cfg.num_shards):
        name = shard_actor_name(app_name, shard, cfg.num_shards)
        handles.append(
            actor_cls.options(
                name=name,
                namespace=NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                max_restarts=-1,
                # at-least-once retries are safe: every update is keyed by event id
                max_task_retries=-1,
                num_cpus=cfg.shard_num_cpus,
                scheduling_strategy=scheduling_strategy,
            ).remote(shard, to_dict(cfg), name)
        )
    return handles

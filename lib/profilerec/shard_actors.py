"""What the service loads and the shard actors it runs (the Ray Serve wiring is in serve/app.py).

Profile shards are named, detached Ray actors created by the application, one per shard, with
`max_restarts=-1`: when one dies, Ray restarts it and it rebuilds its users from its snapshot and
write-ahead log (store.py). Their names carry the application name and the shard count, so a
redeploy with the same settings finds the same actors, and a changed shard count starts a new set
that re-partitions the durable state.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional, Sequence

import numpy as np

from profilerec import storage
from profilerec.config import ServeConfig, to_dict
from profilerec.profile import ProfileParams
from profilerec.recommend import Recommender, load_profile_params, load_recommender
from profilerec.schema import Event
from profilerec.shard import ProfileShard
from profilerec.store import ShardStore

log = logging.getLogger(__name__)

NAMESPACE = "profilerec"


def load_serving_recommender(cfg: ServeConfig) -> Recommender:
    """The item index, text vectors, profile params, item priors and scorer the service scores with."""
    from profilerec.priors import read_priors

    items = storage.read_table(storage.join(cfg.prepared, "items.parquet"))
    recommender = load_recommender(items, cfg.embeddings, load_profile_params(cfg.model), model=cfg.model)
    if cfg.profiles:
        recommender.set_priors(read_priors(cfg.profiles, recommender.index))
    return recommender


class ShardActor:
    """A ProfileShard inside a Ray actor (wrapped with ray.remote by the service)."""

    def __init__(self, shard: int, config: dict[str, Any]):
        from profilerec.config import from_dict

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.cfg = from_dict(ServeConfig, config)
        recommender = load_serving_recommender(self.cfg)
        store = ShardStore(storage.join(self.cfg.state_dir, f"shards-{self.cfg.num_shards}"), shard)
        self.shard = ProfileShard(shard, recommender, store, snapshot_every=self.cfg.snapshot_every)

    def apply(self, events: Sequence[Event]) -> dict[str, int]:
        return self.shard.apply(events)

    def recommend(self, user_id: str, k: int, exclude_seen: bool, brand: Optional[str],
                  category: Optional[str]) -> dict[str, Any]:
        return self.shard.recommend(user_id, k, exclude_seen, brand, category)

    def describe(self, user_id: str) -> Optional[dict[str, Any]]:
        return self.shard.describe(user_id)

    def state_table(self):
        return self.shard.snapshot_table()

    def forget(self, user_id: str) -> bool:
        return self.shard.forget(user_id)

    def stats(self) -> dict[str, Any]:
        return self.shard.stats()

    def ping(self) -> int:
        return os.getpid()


def shard_actor_name(app_name: str, shard: int, num_shards: int) -> str:
    """Stable name of a shard actor: a redeploy with the same shard count finds it again."""
    return f"{app_name}-shard-{shard}-of-{num_shards}"


def get_or_create_shards(cfg: ServeConfig, app_name: str) -> list[Any]:
    """Handles of this application's shard actors, creating the missing ones."""
    import ray

    actor_cls = ray.remote(ShardActor)
    handles = []
    for shard in range(cfg.num_shards):
        handles.append(
            actor_cls.options(
                name=shard_actor_name(app_name, shard, cfg.num_shards),
                namespace=NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                max_restarts=-1,
                # at-least-once retries are safe: every update is keyed by event id
                max_task_retries=-1,
                num_cpus=cfg.shard_num_cpus,
            ).remote(shard, to_dict(cfg))
        )
    return handles

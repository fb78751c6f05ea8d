"""The batch build of every user's profile from the whole log (the same update the service runs).

Output (under the job's output location):
    states.parquet      one row per user: the profile state (profile.states_to_table)
    popularity.parquet  item_id, count: the cold-start prior the service ranks new users by
    transitions.parquet item_id, next_item_id, count: what users touched next, for the scorer
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterator

import pyarrow as pa
from profilerec.config import ProfilesConfig
from profilerec.data import storage
from profilerec.data.datasets import iter_user_events, read_catalog
from profilerec.model.priors import PriorCounter, table_rows, write_priors
from profilerec.model.profile import ProfileParams, build_profile, states_table_schema, states_to_table
from profilerec.model.recommend import load_profile_params, load_recommender
from profilerec.model.replay import user_sequences
from profilerec.runtime.parallel import default_workers, map_chunks, worker_state

log = logging.getLogger(__name__)


def run_profiles(cfg: ProfilesConfig) -> dict[str, Any]:
    """Build all profiles from the prepared log; write states and the item priors. The log streams
    through in chunks of whole users (datasets.iter_user_events), built on `cfg.workers` processes
    and written chunk by chunk, so memory holds a few chunks whatever the size of the log."""

    started = time.perf_counter()
    params = load_profile_params(cfg.model)
    recommender = load_recommender(read_catalog(cfg.input), cfg.embeddings, params, model=cfg.model)
    counter = PriorCounter(len(recommender.index), recommender.transition_span)
    workers = default_workers(cfg.workers)
    counted = {"events": 0}

    def chunks() -> Iterator[pa.Table]:
        for chunk in iter_user_events(cfg.input):
            counter.add(*table_rows(chunk, recommender.index))  # the priors are cheap: counted here
            counted["events"] += chunk.num_rows
            yield chunk

    users = 0
    with storage.table_writer(storage.join(cfg.output, "states.parquet"), states_table_schema()) as writer:
        for states in map_chunks(_chunk_states, chunks(), workers, _load_recommender, (cfg, params)):
            writer.write_table(states)
            users += states.num_rows
            log.info("profiles of %d users built", users)
    write_priors(counter.priors(), recommender.index, cfg.output)
    events = counted["events"]
    summary = {"users": users, "events": events, "output": cfg.output, "workers": workers,
               "seconds": round(time.perf_counter() - started, 2)}
    log.info("built %d profiles from %d events in %.1f s on %d process(es)", users, events, summary["seconds"], workers)
    return summary


def _load_recommender(cfg: ProfilesConfig, params: ProfileParams) -> None:
    # each worker reads the catalog itself: cheaper than a pickled copy of it from the driver
    worker_state()["recommender"] = load_recommender(read_catalog(cfg.input), cfg.embeddings, params,
                                                     model=cfg.model)


def _chunk_states(events: pa.Table) -> pa.Table:
    """The profile states of the users of one chunk of the log (whole users)."""
    recommender = worker_state()["recommender"]
    return states_to_table([build_profile(user_id, seq, recommender.vector_of, recommender.params,
                                          recommender.index.meta)
                            for user_id, seq in user_sequences(events).items()])

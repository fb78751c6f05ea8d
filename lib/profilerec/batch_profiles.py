"""The batch build of every user's profile from the whole log (the same update the service runs).

Output (under the job's output location):
    states.parquet      one row per user: the profile state (profile.states_to_table)
    popularity.parquet  item_id, count: the cold-start prior the service ranks new users by
    transitions.parquet item_id, next_item_id, count: what users touched next, for the scorer
"""

from __future__ import annotations

import logging
import time
from typing import Any

from profilerec import storage
from profilerec.config import ProfilesConfig
from profilerec.priors import PriorCounter, table_rows, write_priors
from profilerec.profile import build_profile, states_table_schema, states_to_table
from profilerec.recommend import load_profile_params, load_recommender
from profilerec.replay import user_sequences

log = logging.getLogger(__name__)


def run_profiles(cfg: ProfilesConfig) -> dict[str, Any]:
    """Build all profiles from the prepared log; write states and the item priors. The log streams
    through in chunks of whole users (datasets.iter_user_events) and the states are written chunk by
    chunk, so memory holds one chunk of events and profiles whatever the size of the log."""
    from profilerec.datasets import iter_user_events, read_prepared

    started = time.perf_counter()
    data = read_prepared(cfg.input, events=False)
    recommender = load_recommender(data.items, cfg.embeddings, load_profile_params(cfg.model), model=cfg.model)
    counter = PriorCounter(len(recommender.index), recommender.transition_span)
    users = events = 0
    with storage.table_writer(storage.join(cfg.output, "states.parquet"), states_table_schema()) as writer:
        for chunk in iter_user_events(cfg.input):
            states = [build_profile(user_id, seq, recommender.vector_of, recommender.params, recommender.index.meta)
                      for user_id, seq in user_sequences(chunk).items()]
            writer.write_table(states_to_table(states))
            counter.add(*table_rows(chunk, recommender.index))
            users += len(states)
            events += chunk.num_rows
            log.info("profiles of %d users (%d events) built", users, events)
    write_priors(counter.priors(), recommender.index, cfg.output)
    summary = {"users": users, "events": events, "output": cfg.output,
               "seconds": round(time.perf_counter() - started, 2)}
    log.info("built %d profiles from %d events in %.1f s", users, events, summary["seconds"])
    return summary

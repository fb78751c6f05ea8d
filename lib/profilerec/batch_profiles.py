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
from profilerec.priors import item_priors, write_priors
from profilerec.profile import build_profile, states_to_table
from profilerec.recommend import load_profile_params, load_recommender
from profilerec.replay import user_sequences

log = logging.getLogger(__name__)


def run_profiles(cfg: ProfilesConfig) -> dict[str, Any]:
    """Build all profiles from the prepared log; write states and the item priors."""
    from profilerec.datasets import read_prepared

    started = time.perf_counter()
    data = read_prepared(cfg.input)
    recommender = load_recommender(data.items, cfg.embeddings, load_profile_params(cfg.model), model=cfg.model)
    sequences = user_sequences(data.events)
    states = [
        build_profile(user_id, events, recommender.vector_of, recommender.params, recommender.index.meta)
        for user_id, events in sequences.items()
    ]
    storage.write_table(states_to_table(states), storage.join(cfg.output, "states.parquet"))
    write_priors(item_priors(sequences, recommender.index, span=recommender.transition_span), recommender.index,
                 cfg.output)
    summary = {"users": len(states), "events": data.events.num_rows, "output": cfg.output,
               "seconds": round(time.perf_counter() - started, 2)}
    log.info("built %d profiles from %d events in %.1f s", len(states), data.events.num_rows, summary["seconds"])
    return summary

"""THE user profile: its state, its incremental per-event update, and the features scoring reads.

Training, the batch profile job, evaluation and the service all call this module, so the
profile that is trained on is exactly the profile that is served.

Per user the state is small and fixed-size, and one event updates it in O(d + window):

- two interest vectors, long-term and short-term: exponentially time-decayed, event-weighted
  averages of the embeddings of what the user touched. Each keeps a decayed sum S and a decayed
  total weight Z, so that v = S / Z and one event does
      S <- a*S + w*e,   Z <- a*Z + |w|      (equivalently v <- alpha*v + (1-alpha)*e)
  where a = 0.5 ** (dt / half_life_seconds) * 0.5 ** (1 / half_life_events) forgets with time and
  with the number of events, and w is the event-type weight (a low rating is negative: it pushes
  the profile away from the item);
- a bounded window of the most recent item events (id, type, time, weight) for the attention
  model over recent behaviour;
- decayed counters of the brands and categories touched, for explanations.

Late events (older than the last one applied) are applied with a time gap of zero: they count
as if they arrived now, which keeps every update O(d) and order-independent of clock skew.

The update is plain arithmetic on the embedding, so the same function runs on numpy arrays
(serving, batch jobs) and on torch tensors with gradients (fine-tuning the encoder).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import pyarrow as pa
from profilerec.data.schema import Event


@dataclass(frozen=True)
class ProfileParams:
    """Hyperparameters of the profile math (saved with every model, so serving matches training)."""

    window: int = 20
    long_half_life_events: float = 50.0
    long_half_life_seconds: float = math.inf
    short_half_life_events: float = 1.5
    short_half_life_seconds: float = 3 * 86400.0
    type_weights: dict[str, float] = field(
        default_factory=lambda: {
            "view": 0.5, "click": 1.0, "cart": 2.0, "purchase": 3.0, "review": 3.0,
            "rating": 1.0, "search": 1.0, "tag": 1.0,
        }
    )
    # ratings scale their type weight by (value - center) / scale: 5 stars -> +1, 1 star -> -1
    rating_center: float = 3.0
    rating_scale: float = 2.0
    # share of an event's own words (a review, a tag) next to its item in the interest vectors
    text_share: float = 0.5
    # zero-shot scoring: how much of the query is the short-term vector
    short_mix: float = 0.7
    max_counters: int = 12
    # precision the interest sums are kept at between events (numpy paths): float16 halves the
    # memory per user and moves scores only slightly; every path rounds the same way, so batch and live
    # profiles stay equal. Arithmetic is always float32.
    vector_dtype: str = "float16"

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProfileParams":
        """Inverse of to_dict (unknown keys are an error, missing ones take the default)."""
        return cls(**data)


@dataclass
class RecentEvent:
    """One entry of the recent-events window."""

    item_id: str
    type: str
    ts: float
    weight: float


@dataclass
class ProfileState:
    """Everything the service keeps about one user."""

    user_id: str
    n_events: int = 0
    last_ts: Optional[float] = None
    long_sum: Any = None  # decayed weighted sum of embeddings (numpy array or torch tensor)
    long_weight: float = 0.0
    short_sum: Any = None
    short_weight: float = 0.0
    recent: list[RecentEvent] = field(default_factory=list)  # oldest first, at most params.window
    counters: dict[str, float] = field(default_factory=dict)  # "brand:X" / "category:Y" -> decayed count

    def copy(self) -> "ProfileState":
        """An independent copy (vectors shared: updates never modify them in place)."""
        return replace(self, recent=list(self.recent), counters=dict(self.counters))


def event_weight(event: Event, params: ProfileParams) -> float:
    """How strongly (and in which direction) an event says the user likes its item."""
    weight = params.type_weights.get(event.type, 1.0)
    if event.type == "rating" and event.value is not None:
        weight *= (event.value - params.rating_center) / params.rating_scale
    return float(weight)


def decay(dt: float, half_life_seconds: float, half_life_events: float) -> float:
    """Share of the old profile kept across one event arriving `dt` seconds after the last."""
    kept = 1.0
    if math.isfinite(half_life_seconds) and dt > 0:
        kept *= 0.5 ** (dt / half_life_seconds)
    if math.isfinite(half_life_events):
        kept *= 0.5 ** (1.0 / half_life_events)
    return kept


def apply_event(state: ProfileState, event: Event, embedding: Any, params: ProfileParams,
                item_meta: Optional[dict[str, Any]] = None) -> ProfileState:
    """The profile after `event`; `embedding` is the event's vector (see `event_embedding`).

    Returns a new state and leaves `state` untouched. `embedding` may be None (an event whose
    item has no vector): the window and counters still move, the interest vectors only decay.
    """
    new = state.copy()
    dt = 0.0 if state.last_ts is None else max(0.0, event.ts - state.last_ts)
    weight = event_weight(event, params)
    a_long = decay(dt, params.long_half_life_seconds, params.long_half_life_events)
    a_short = decay(dt, params.short_half_life_seconds, params.short_half_life_events)
    if embedding is not None:
        new.long_sum = _blend(state.long_sum, a_long, weight, embedding, params.vector_dtype)
        new.short_sum = _blend(state.short_sum, a_short, weight, embedding, params.vector_dtype)
        new.long_weight = a_long * state.long_weight + abs(weight)
        new.short_weight = a_short * state.short_weight + abs(weight)
    else:
        new.long_sum = _blend(state.long_sum, a_long, 0.0, None, params.vector_dtype)
        new.short_sum = _blend(state.short_sum, a_short, 0.0, None, params.vector_dtype)
        new.long_weight = a_long * state.long_weight
        new.short_weight = a_short * state.short_weight
    if event.item_id is not None:
        new.recent.append(RecentEvent(event.item_id, event.type, event.ts, weight))
        del new.recent[: max(0, len(new.recent) - params.window)]
        _count(new.counters, item_meta, a_long, weight, params.max_counters)
    new.n_events = state.n_events + 1
    new.last_ts = event.ts if state.last_ts is None else max(state.last_ts, event.ts)
    return new


def event_embedding(item_vector: Any, text_vector: Any, params: ProfileParams) -> Any:
    """The vector an event adds to the profile: its item's, its own text's, or a blend of both."""
    if item_vector is None:
        return text_vector
    if text_vector is None:
        return item_vector
    return (1.0 - params.text_share) * item_vector + params.text_share * text_vector


def build_profile(user_id: str, events: Iterable[Event], vector_of: Callable[[Event], Any],
                  params: ProfileParams, meta_of: Optional[Callable[[str], Optional[dict]]] = None,
                  state: Optional[ProfileState] = None) -> ProfileState:
    """Apply `events` in the given order to `state` (or to a new profile): the batch path."""
    state = state or ProfileState(user_id=user_id)
    for event in events:
        meta = meta_of(event.item_id) if meta_of and event.item_id is not None else None
        state = apply_event(state, event, vector_of(event), params, meta)
    return state


# A vector whose total weight decayed below a millionth of one event is gone: what is left is
# rounding noise, and float32 cannot divide by it (a year without events, then a 3-star rating
# of weight 0, leaves Z ~ 1e-40).
MIN_WEIGHT = 1e-6


def interest_vectors(state: ProfileState) -> tuple[Any, Any]:
    """The long- and short-term interest vectors (S / Z), or None for one that has none left."""
    if state.long_sum is None or state.long_weight < MIN_WEIGHT:
        return None, None
    short = _compute(state.short_sum) / state.short_weight if state.short_weight >= MIN_WEIGHT else None
    return _compute(state.long_sum) / state.long_weight, short


def zero_shot_query(state: ProfileState, params: ProfileParams) -> Any:
    """The untrained query: a unit-length mix of the short- and long-term interest vectors.

    None before the first embedded event. Works on numpy arrays and torch tensors alike.
    """
    long, short = interest_vectors(state)
    if long is None:
        return None
    query = _unit(long)
    if short is not None:
        query = (1 - params.short_mix) * query + params.short_mix * _unit(short)
    return _unit(query)


def window_features(states: Sequence[ProfileState], row_of: Callable[[str], int], params: ProfileParams,
                    type_ids: dict[str, int]) -> dict[str, np.ndarray]:
    """The recent windows of `states` as padded arrays for the scoring model.

    Right-aligned (the newest event last), padded on the left with item row -1:
    items [B, W] int64, types [B, W] int64, weights [B, W] float32, gaps [B, W] float32
    (log1p of hours between each event and the user's newest one), positions [B, W] int64
    (0 = newest), mask [B, W] bool.
    """
    width = params.window
    n = len(states)
    items = np.full((n, width), -1, dtype=np.int64)
    types = np.zeros((n, width), dtype=np.int64)
    weights = np.zeros((n, width), dtype=np.float32)
    gaps = np.zeros((n, width), dtype=np.float32)
    for b, state in enumerate(states):
        recent = state.recent[-width:]
        newest = state.last_ts or 0.0
        for j, ev in enumerate(recent):
            col = width - len(recent) + j
            items[b, col] = row_of(ev.item_id)
            types[b, col] = type_ids.get(ev.type, 0)
            weights[b, col] = ev.weight
            gaps[b, col] = math.log1p(max(0.0, newest - ev.ts) / 3600.0)
    positions = np.broadcast_to(np.arange(width - 1, -1, -1), (n, width)).copy()
    return {"items": items, "types": types, "weights": weights, "gaps": gaps, "positions": positions,
            "mask": items >= 0}


def top_counters(state: ProfileState, n: int = 5) -> list[tuple[str, float]]:
    """The user's strongest brands/categories, strongest first."""
    return sorted(state.counters.items(), key=lambda kv: -kv[1])[:n]


STATES_SCHEMA_FIELDS = ("user_id", "n_events", "last_ts", "long_sum", "long_weight", "short_sum",
                        "short_weight", "recent", "counters")


def states_to_table(states: Iterable[ProfileState]) -> pa.Table:
    """Profile states as an Arrow table (one row per user) for snapshots and the batch job."""
    rows = {name: [] for name in STATES_SCHEMA_FIELDS}
    for s in states:
        rows["user_id"].append(s.user_id)
        rows["n_events"].append(s.n_events)
        rows["last_ts"].append(s.last_ts)
        rows["long_sum"].append(None if s.long_sum is None else np.asarray(s.long_sum, dtype=np.float32))
        rows["long_weight"].append(float(s.long_weight))
        rows["short_sum"].append(None if s.short_sum is None else np.asarray(s.short_sum, dtype=np.float32))
        rows["short_weight"].append(float(s.short_weight))
        rows["recent"].append([{"item_id": e.item_id, "type": e.type, "ts": e.ts, "weight": e.weight}
                               for e in s.recent])
        rows["counters"].append(list(s.counters.items()))
    return pa.table({
        "user_id": pa.array(rows["user_id"], pa.string()),
        "n_events": pa.array(rows["n_events"], pa.int64()),
        "last_ts": pa.array(rows["last_ts"], pa.float64()),
        "long_sum": pa.array(rows["long_sum"], pa.list_(pa.float32())),
        "long_weight": pa.array(rows["long_weight"], pa.float64()),
        "short_sum": pa.array(rows["short_sum"], pa.list_(pa.float32())),
        "short_weight": pa.array(rows["short_weight"], pa.float64()),
        "recent": pa.array(rows["recent"], _RECENT_TYPE),
        "counters": pa.array(rows["counters"], pa.map_(pa.string(), pa.float64())),
    }, schema=states_table_schema())


_RECENT_TYPE = pa.list_(pa.struct([("item_id", pa.string()), ("type", pa.string()), ("ts", pa.float64()),
                                   ("weight", pa.float64())]))


def states_table_schema() -> pa.Schema:
    """The schema of states_to_table (for writers that write states in chunks)."""
    return pa.schema([("user_id", pa.string()), ("n_events", pa.int64()), ("last_ts", pa.float64()),
                      ("long_sum", pa.list_(pa.float32())), ("long_weight", pa.float64()),
                      ("short_sum", pa.list_(pa.float32())), ("short_weight", pa.float64()),
                      ("recent", _RECENT_TYPE), ("counters", pa.map_(pa.string(), pa.float64()))])


def states_from_table(table: pa.Table) -> list[ProfileState]:
    """Inverse of states_to_table."""
    cols = table.to_pydict()
    states = []
    for i in range(table.num_rows):
        long_sum, short_sum = cols["long_sum"][i], cols["short_sum"][i]
        states.append(ProfileState(
            user_id=cols["user_id"][i],
            n_events=cols["n_events"][i],
            last_ts=cols["last_ts"][i],
            long_sum=None if long_sum is None else np.asarray(long_sum, dtype=np.float32),
            long_weight=cols["long_weight"][i],
            short_sum=None if short_sum is None else np.asarray(short_sum, dtype=np.float32),
            short_weight=cols["short_weight"][i],
            recent=[RecentEvent(**e) for e in cols["recent"][i]],
            counters=dict(cols["counters"][i]),
        ))
    return states


def _blend(old: Any, kept: float, weight: float, embedding: Any, dtype: str) -> Any:
    """kept * old + weight * embedding in float32, stored at `dtype` (numpy; torch stays as is)."""
    if old is None and embedding is None:
        return None
    total = weight * _compute(embedding) if old is None else kept * _compute(old)
    if old is not None and embedding is not None:
        total = total + weight * _compute(embedding)
    return total.astype(dtype) if isinstance(total, np.ndarray) else total


def _compute(v: Any) -> Any:
    # stored float16 sums are widened before any arithmetic, so rounding happens only on storing
    return v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype != np.float32 else v


def _count(counters: dict[str, float], meta: Optional[dict[str, Any]], kept: float, weight: float,
           limit: int) -> None:
    if not meta:
        return
    for key in list(counters):
        counters[key] *= kept
    keys = [f"brand:{meta['brand']}"] if meta.get("brand") else []
    keys += [f"category:{c}" for c in (meta.get("categories") or [])]
    for key in keys:
        counters[key] = counters.get(key, 0.0) + weight
    if len(counters) > limit:
        for key, _ in sorted(counters.items(), key=lambda kv: kv[1])[: len(counters) - limit]:
            del counters[key]


def _unit(v: Any) -> Any:
    # the epsilon keeps a zero vector at zero (and works for numpy and torch alike)
    return v / ((v * v).sum() ** 0.5 + 1e-12)

"""Replaying the event log: per-user sequences, cases with their histories, and profile states.

Training, the batch profile job and evaluation all see the log through these functions, so a
case's history (and the profile built from it) is the same wherever it is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from profilerec.data.schema import SPLITS, Event, events_from_table
from profilerec.model.profile import ProfileParams, ProfileState, apply_event


@dataclass
class Case:
    """Predict `target` (an item id) for `user_id` from the events in `history` (oldest first)."""

    user_id: str
    split: str
    target: str
    history: Sequence[Event]


def user_sequences(events: pa.Table) -> dict[str, list[Event]]:
    """Each user's events in log order (the prepared log is sorted by user, then time)."""
    sequences: dict[str, list[Event]] = {}
    for event in events_from_table(events):
        sequences.setdefault(event.user_id, []).append(event)
    return sequences


def later_splits(split: str) -> list[str]:
    """`split` and every split after it in time (their targets are hidden when evaluating `split`)."""
    return list(SPLITS[SPLITS.index(split):]) if split in SPLITS else [split]


def hidden_event_ids(cases: pa.Table, split: str) -> set[str]:
    """Target events of `split` and later splits: what a model evaluated on `split` must not learn from."""
    mask = pc.is_in(cases.column("split"), pa.array(later_splits(split)))
    return set(cases.filter(mask).column("target_event_id").to_pylist())


def iter_cases(sequences: dict[str, list[Event]], cases: pa.Table, splits: Iterable[str],
               max_history: Optional[int]) -> Iterator[Case]:
    """The cases of `splits` in log order, each with the user's events before its target.

    `max_history` caps the history to the most recent events (the Amazon protocol ranks given at
    most 10 earlier items); None keeps all earlier events.
    """
    wanted = set(splits)
    position = {}
    for seq in sequences.values():
        for i, event in enumerate(seq):
            position[event.event_id] = i
    cols = cases.to_pydict()
    for user_id, target_id, split in zip(cols["user_id"], cols["target_event_id"], cols["split"]):
        if split not in wanted:
            continue
        seq = sequences[user_id]
        at = position[target_id]
        start = 0 if max_history is None else max(0, at - max_history)
        yield Case(user_id, split, seq[at].item_id, seq[start:at])


def case_states(cases: Sequence[Case], vector_of: Callable[[Event], object], params: ProfileParams,
                meta_of: Optional[Callable[[str], Optional[dict]]] = None) -> list[ProfileState]:
    """The profile state of each case: its history applied event by event from an empty profile.

    Consecutive cases of one user whose histories extend each other reuse the previous state, so
    replaying a long log costs one update per event, not one per event per case.
    """
    states: list[ProfileState] = []
    prev_case: Optional[Case] = None
    prev_state: Optional[ProfileState] = None
    for case in cases:
        start, state = 0, ProfileState(user_id=case.user_id)
        if prev_case is not None and _extends(prev_case, case):
            start, state = len(prev_case.history), prev_state
        for event in case.history[start:]:
            meta = meta_of(event.item_id) if meta_of and event.item_id is not None else None
            state = apply_event(state, event, vector_of(event), params, meta)
        states.append(state)
        prev_case, prev_state = case, state
    return states


def target_rows(cases: Sequence[Case], row_of: Callable[[str], int]) -> np.ndarray:
    """Index rows of the cases' targets (-1 for an item the index lacks)."""
    return np.array([row_of(c.target) for c in cases], dtype=np.int64)


def _extends(prev: Case, case: Case) -> bool:
    n = len(prev.history)
    return (prev.user_id == case.user_id and len(case.history) >= n and n > 0
            and case.history[0].event_id == prev.history[0].event_id
            and case.history[n - 1].event_id == prev.history[n - 1].event_id)

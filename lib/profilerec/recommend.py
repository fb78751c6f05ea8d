"""Scoring profiles against the item index: what evaluation measures and the service answers.

A Recommender holds the item index, the event-text vectors, the profile parameters and the
popularity prior. It turns events into the vectors profile.py consumes (`vector_of`) and
profile states into scores over every item (`scores`) and top-K lists (`recommend`). A user
with no embedded event yet gets the popularity ranking (cold start).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import pyarrow as pa

from profilerec.encoder import text_hash
from profilerec.index import ItemIndex
from profilerec.profile import ProfileParams, ProfileState, event_embedding, interest_vectors, zero_shot_query
from profilerec.schema import Event


@dataclass
class Recommender:
    """Everything needed to score profiles: index, text vectors, profile params, popularity."""

    index: ItemIndex
    params: ProfileParams = field(default_factory=ProfileParams)
    text_vectors: dict[str, np.ndarray] = field(default_factory=dict)  # text_hash -> unit vector
    popularity: Optional[np.ndarray] = None  # [items] event counts in the training log
    encode_text: Optional[Callable[[str], np.ndarray]] = None  # for texts not encoded in advance

    def vector_of(self, event: Event) -> Optional[np.ndarray]:
        """The embedding `event` adds to a profile (item and/or its own text), or None."""
        item = self.index.vector(event.item_id)
        text = None
        if event.text:
            text = self.text_vectors.get(text_hash(event.text))
            if text is None and self.encode_text is not None:
                text = self.encode_text(event.text)
        return event_embedding(item, text, self.params)

    def popularity_scores(self) -> np.ndarray:
        """Cold-start scores: log of the item's count in the training log (0 for unseen items)."""
        n = len(self.index)
        pop = np.zeros(n, dtype=np.float32)
        if self.popularity is not None:
            m = min(n, len(self.popularity))
            pop[:m] = np.log1p(self.popularity[:m])
        return pop

    def scores(self, states: Sequence[ProfileState]) -> np.ndarray:
        """[len(states), items] scores; higher is better. Cold users get popularity scores."""
        out = np.empty((len(states), len(self.index)), dtype=np.float32)
        queries = [zero_shot_query(s, self.params) for s in states]
        warm = [i for i, q in enumerate(queries) if q is not None]
        if warm:
            out[warm] = np.stack([queries[i] for i in warm]).astype(np.float32) @ self.index.vectors.T
        cold = [i for i, q in enumerate(queries) if q is None]
        if cold:
            out[cold] = self.popularity_scores()
        return out

    def recommend(self, state: ProfileState, k: int = 10, exclude_seen: bool = False,
                  brand: Optional[str] = None, category: Optional[str] = None) -> list[dict[str, Any]]:
        """The top-`k` items for one profile, best first, with scores."""
        scores = self.scores([state])[0]
        exclude = [self.index.row(ev.item_id) for ev in state.recent] if exclude_seen else []
        rows, top = self.index.top_k(scores, k, exclude, self.index.allowed(brand, category))
        return [{"item_id": self.index.item_ids[r], "score": float(s), "title": self.index.titles[r]}
                for r, s in zip(rows, top)]


    def explain(self, state: ProfileState, item_id: str) -> dict[str, Any]:
        """Why `item_id` suits the profile: its similarity to the short- and long-term interests
        and the recent item it is closest to."""
        vector = self.index.vector(item_id)
        if vector is None:
            return {"reason": "unknown item"}
        long, short = interest_vectors(state)
        if long is None:
            return {"reason": "popular with all users (no events of this user yet)"}
        out: dict[str, Any] = {
            "long_term_similarity": round(_cosine(long, vector), 3),
            "short_term_similarity": round(_cosine(short, vector), 3) if short is not None else None,
        }
        recent = [(ev, self.index.vector(ev.item_id)) for ev in state.recent]
        recent = [(ev, v) for ev, v in recent if v is not None]
        if recent:
            ev, v = max(recent, key=lambda pair: float(pair[1] @ vector))
            out["closest_recent_item"] = {"item_id": ev.item_id, "title": (self.index.meta(ev.item_id) or {}).get("title"),
                                          "similarity": round(float(v @ vector), 3)}
        return out


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / denom if denom > 0 else 0.0


def load_recommender(items: pa.Table, embeddings: str, params: Optional[ProfileParams] = None,
                     popularity: Optional[np.ndarray] = None) -> Recommender:
    """A Recommender over `items` with the item and text vectors of the embeddings folder."""
    from profilerec.embeddings import read_embeddings, vectors_from_arrow
    from profilerec.index import index_from_tables

    index = index_from_tables(items, read_embeddings(embeddings, "items"))
    texts = read_embeddings(embeddings, "texts")
    text_vectors = dict(zip(texts.column("text_hash").to_pylist(), vectors_from_arrow(texts.column("vector"))))
    return Recommender(index, params or ProfileParams(), text_vectors, popularity)


def popularity_counts(events: pa.Table, index: ItemIndex, hidden: Iterable[str] = ()) -> np.ndarray:
    """How often each index item appears in `events`, leaving out the event ids in `hidden`."""
    hidden = set(hidden)
    counts = np.zeros(len(index), dtype=np.float64)
    for event_id, item_id in zip(events.column("event_id").to_pylist(), events.column("item_id").to_pylist()):
        if item_id is not None and event_id not in hidden:
            row = index.row(item_id)
            if row >= 0:
                counts[row] += 1
    return counts

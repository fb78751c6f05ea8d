"""Scoring profiles against the item index: what evaluation measures and the service answers.

A Recommender holds the item index, the event-text vectors, the profile parameters, the item
priors (popularity, transitions) and, once trained, the ProfileScorer (scorer.py). It turns
events into the vectors profile.py consumes (`vector_of`) and profile states into scores over
every item (`scores`, the first stage) and top-K lists (`recommend`: the first stage's top items
reordered by the second stage, second_stage.py, when the model has one). Without a scorer it ranks
by the zero-shot profile (cosine of the interest vectors); a user with no event yet gets the
popularity ranking.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
from profilerec.config import RetrievalConfig
from profilerec.data import storage
from profilerec.data.learned import ITEMS_LOG, TEXTS_LOG, VectorLog
from profilerec.data.schema import Event
from profilerec.model.ann import read_manifest
from profilerec.model.encoder import text_hash
from profilerec.model.frozen_scorer import ScoreParts, frozen_parts, frozen_popular_scores, frozen_row_scores
from profilerec.model.index import ItemIndex, best_rows, shared_index
from profilerec.model.priors import ItemPriors, empty_priors, grown_priors
from profilerec.model.profile import (
    ProfileParams,
    ProfileState,
    event_embedding,
    interest_vectors,
    window_features,
    zero_shot_query,
)
from profilerec.model.retrieval import Retrieval, configured_retrieval, index_retrieval, unheld_changes
from profilerec.model.row_sets import distinct, member
from profilerec.model.scorer import SCORER_META, ProfileScorer, load_scorer, scorer_exists
from profilerec.model.scorer_inputs import scorer_batch
from profilerec.model.second_stage import SecondStage, load_second_stage, rerank_features
from profilerec.model.text_vectors import TextVectors, empty_text_vectors, load_text_vectors

SCORER_DIR = "scorer"  # inside a model folder, next to a fine-tuned `encoder`

log = logging.getLogger(__name__)


@dataclass
class Recommender:
    """Everything needed to score profiles: index, text vectors, profile params, priors, scorer."""

    index: ItemIndex
    params: ProfileParams = field(default_factory=ProfileParams)
    text_vectors: TextVectors = field(default_factory=empty_text_vectors)  # text_hash -> unit vector
    priors: Optional[ItemPriors] = None  # popularity and transitions counted in the log
    scorer: Optional[ProfileScorer] = None  # the trained scorer; None = zero-shot profile
    second_stage: Optional[SecondStage] = None  # reorders the scorer's top items; None = its order
    retrieval: Optional[Retrieval] = None  # candidates for two-stage top-K; None = score every item

    def __post_init__(self) -> None:
        # popularity_scores and popular_rows, made on first use, dropped when the priors or items change
        self._popularity: Optional[np.ndarray] = None
        self._popular: Optional[np.ndarray] = None
        # the item changes made since the catalog was loaded (retrieval.ItemChanges): which of them
        # an index build holds
        self.changes: list[tuple[Optional[int], np.ndarray]] = []
        # a rebuilt index loaded by another thread (load_rebuilt_index), and how many changes it saw
        self._rebuilt: Optional[tuple[Retrieval, int]] = None

    def vector_of(self, event: Event) -> Optional[np.ndarray]:
        """The embedding `event` adds to a profile (item and/or its own text), or None."""
        item = self.index.vector(event.item_id)
        text = None
        if event.text:
            text = self.text_vectors.get(text_hash(event.text))
        return event_embedding(item, text, self.params)

    def popularity_scores(self) -> np.ndarray:
        """Cold-start scores: log of the item's count in the training log (0 for unseen items).
        Read-only: the array is kept until the priors change."""
        if self._popularity is None:
            n = len(self.index)
            pop = np.zeros(n, dtype=np.float32)
            if self.priors is not None:
                m = min(n, len(self.priors.popularity))
                pop[:m] = np.log1p(self.priors.popularity[:m])
            pop.flags.writeable = False
            self._popularity = pop
        return self._popularity

    @property
    def transition_span(self) -> int:
        """How far apart two events may be to count as a transition in the priors it scores with."""
        return self.scorer.params.transition_span if self.scorer is not None else 1

    def popular_rows(self) -> np.ndarray:
        """Every item row, most popular first (ties by row); kept until the priors change."""
        if self._popular is None:
            self._popular = np.lexsort((np.arange(len(self.index)), -self.popularity_scores()))
        return self._popular

    def set_priors(self, priors: ItemPriors) -> None:
        """Score with these item statistics from now on (the scorer too)."""
        self.priors = priors
        self._popularity = self._popular = None
        if self.scorer is not None:
            self.scorer.set_priors(priors)

    def upsert_items(self, items: pa.Table, vectors: np.ndarray, learned: Optional[int] = None) -> None:
        """Add new items (ITEMS_SCHEMA rows with their unit `vectors`) and replace changed ones;
        they are scored from now on. New items have no popularity or transitions yet. `learned`:
        the fingerprint of the service's items log after the file they come from."""
        if self.scorer is not None:
            # the scorer's rows of the catalog as loaded first: they are the node's shared file of
            # those vectors, which the changed rows then overwrite in this process only
            self.scorer.item_rows()
        cols = items.to_pydict()
        rows = self.index.upsert(cols["item_id"], vectors, cols["brand"], cols["categories"], cols["title"])
        self.changes.append((learned, np.asarray(rows, dtype=np.int64)))
        self.priors = grown_priors(self.priors or empty_priors(0), len(self.index))
        self._popularity = self._popular = None
        if self.scorer is not None:
            self.scorer.set_items(self.index.vectors, self.priors, rows)
        if self.retrieval is not None:
            self.retrieval.changed(rows)

    def scores(self, states: Sequence[ProfileState]) -> np.ndarray:
        """[len(states), items] scores; higher is better. Cold users get popularity scores."""
        out = np.empty((len(states), len(self.index)), dtype=np.float32)
        cold = [i for i, s in enumerate(states) if not s.recent and s.long_sum is None]
        warm = sorted(set(range(len(states))) - set(cold))
        if warm and self.scorer is not None:
            batch = scorer_batch([states[i] for i in warm], self.index.row, self.params, self.scorer.params,
                                 self.index.dim)
            out[warm] = self.scorer.predict(batch)
        elif warm:
            queries = [zero_shot_query(states[i], self.params) for i in warm]
            zero = np.zeros(self.index.dim, dtype=np.float32)  # a profile of unknown items only
            out[warm] = np.stack([zero if q is None else q for q in queries]).astype(np.float32) @ self.index.vectors.T
        if cold:
            out[cold] = self.popularity_scores()
        return out

    def reranks(self) -> bool:
        """Whether top-K lists are the second stage's order of the scorer's top items."""
        return self.second_stage is not None and self.scorer is not None

    def rerank_depth(self, k: int) -> int:
        """How many first-stage items a top-`k` list is made from."""
        return max(k, self.second_stage.depth) if self.reranks() else k

    def reranked_top(self, states: Sequence[ProfileState], tops: Sequence[tuple[np.ndarray, np.ndarray]],
                     k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The `k` best items of each profile from its first-stage list in `tops` (rows and scores,
        best first, rerank_depth(k) long where there are as many items): the second stage reorders
        the first `depth` of them and the rest follow in their order, their scores moved below.
        Without a second stage, and for a profile with no event, the first `k`."""
        out = [(rows[:k], scores[:k]) for rows, scores in tops]
        if not self.reranks():
            return out
        depth = self.second_stage.depth
        by_size: dict[int, list[int]] = {}  # profiles whose lists have the same head size score together
        for i, state in enumerate(states):
            if (state.recent or state.long_sum is not None) and len(tops[i][0]):
                by_size.setdefault(min(depth, len(tops[i][0])), []).append(i)
        for size, members in by_size.items():
            rows = np.stack([tops[i][0][:size] for i in members])
            first = np.stack([tops[i][1][:size] for i in members])
            new = self.second_stage.scores(self.second_stage_features([states[i] for i in members], rows, first))
            for j, i in enumerate(members):
                head = best_rows(rows[j], new[j], size)
                tail_rows, tail_scores = tops[i][0][size:], tops[i][1][size:]
                if len(tail_rows):  # below the head, in their order
                    tail_scores = tail_scores + min(0.0, float(head[1][-1] - tail_scores[0]))
                out[i] = (np.concatenate([head[0], tail_rows])[:k],
                          np.concatenate([head[1], tail_scores]).astype(np.float32)[:k])
        return out

    def second_stage_features(self, states: Sequence[ProfileState], rows: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """[B, R, F] the second stage's features of each profile's first-stage list (`rows` and
        their `scores`, [B, R], best first)."""
        window = window_features(states, self.index.row, self.params, {})["items"]
        priors = self.priors if self.priors is not None else empty_priors(len(self.index))
        return rerank_features(rows, scores, window, self.item_matrix(), priors, self.index.details.brand_codes())

    def recommend(self, state: ProfileState, k: int = 10, exclude_seen: bool = False,
                  brand: Optional[str] = None, category: Optional[str] = None) -> list[dict[str, Any]]:
        """The top-`k` items for one profile, best first, with scores."""
        exclude = [self.index.row(ev.item_id) for ev in state.recent] if exclude_seen else []
        allowed = self.index.allowed_rows(brand, category)
        if self.retrieval is None:
            mask = None
            if allowed is not None:
                mask = np.zeros(len(self.index), dtype=bool)
                mask[allowed] = True
            first = self.index.top_k(self.scores([state])[0], self.rerank_depth(k), exclude, mask)
            rows, top = self.reranked_top([state], [first], k)[0]
        else:
            rows, top = self.two_stage_top([state], k, [exclude], allowed)[0]
        return [{"item_id": self.index.item_ids[r], "score": float(s), "title": self.index.title(r)}
                for r, s in zip(rows, top)]

    def two_stage_top(self, states: Sequence[ProfileState], k: int, exclude: Sequence[Sequence[int]],
                      allowed: Optional[np.ndarray] = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Rows and scores of the `k` best items of each profile among its candidates (retrieval.py),
        leaving out its `exclude` rows and, with `allowed` (sorted rows), every other item, in the
        second stage's order (reranked_top). When a filter leaves fewer than `k` candidates, every
        allowed item is scored."""
        if self._rebuilt is not None:
            self._swap_rebuilt()
        if self.retrieval is None:
            raise ValueError("two_stage_top needs a Recommender with retrieval")
        final_k, k = k, self.rerank_depth(k)
        excluded = [distinct(rows) for rows in exclude]
        warm = [i for i, state in enumerate(states) if state.recent or state.long_sum is not None]
        out = {i: self._cold_top(k, excluded[i], allowed) for i in sorted(set(range(len(states))) - set(warm))}
        if warm:
            parts = self.score_parts([states[i] for i in warm])
            popular = self._popular_among(allowed, self.retrieval.popular)
            found = self.retrieval.candidates(parts, self.item_matrix(), popular, allowed)
            for b, i in enumerate(warm):
                rows = found.rows[b][~member(found.rows[b], excluded[i])]
                top = best_rows(rows, self.row_scores(parts.of(b), rows)[0], k)
                lifted, scores = self._lifted(top, k, found.reach[b], rows, excluded[i], allowed, parts.user[b])
                if len(lifted):
                    top = best_rows(np.concatenate([top[0], lifted]), np.concatenate([top[1], scores]), k)
                out[i] = top
        return self.reranked_top(states, [out[i] for i in range(len(states))], final_k)

    def _lifted(self, top: tuple[np.ndarray, np.ndarray], k: int, reach: float, scored: np.ndarray,
                excluded: np.ndarray, allowed: Optional[np.ndarray], user: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The items outside the `scored` candidates that may still beat the k-th of `top`, and
        their scores: an item outside them is at most `reach` similar to the user
        (retrieval.Candidates) and has no sparse term, so only a popularity term above the k-th
        score minus that similarity's term can place it. Those are the first items by decreasing
        popularity term, as many as FrozenScorer.popular_items holds at most."""
        none = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        if self.scorer is None or len(top[0]) < k or not np.isfinite(reach):
            return none
        frozen = self.scorer.frozen()
        order, lowered = frozen.by_popularity
        needed = top[1][-1] - frozen.scale * reach  # a tie may place an item too
        count = min(int(np.searchsorted(lowered, -needed, side="right")), len(frozen.popular_items))
        if not count:
            return none
        lifted = order[:count]
        keep = ~member(lifted, scored) & ~member(lifted, excluded)
        if allowed is not None:
            keep &= member(lifted, allowed)
        return lifted[keep], frozen_popular_scores(frozen, user, count)[keep]

    def _cold_top(self, k: int, excluded: np.ndarray, allowed: Optional[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The top-`k` of a profile with no event: the most popular allowed items."""
        rows = np.setdiff1d(self._popular_among(allowed, k + len(excluded)), excluded)
        return best_rows(rows, self.popularity_scores()[rows], k)

    def _popular_among(self, allowed: Optional[np.ndarray], n: int) -> np.ndarray:
        """The `n` most popular of the `allowed` rows (of every row when None), most popular first:
        the cost grows with the allowed rows, not with the catalog."""
        if allowed is None:
            return self.popular_rows()[:n]
        return best_rows(allowed, self.popularity_scores()[allowed], n)[0]

    def score_parts(self, states: Sequence[ProfileState]) -> ScoreParts:
        """The user vectors and sparse score terms of profiles with events (scorer.ScoreParts);
        without a scorer, the zero-shot query and no sparse term."""
        if self.scorer is not None:
            batch = scorer_batch(states, self.index.row, self.params, self.scorer.params, self.index.dim)
            return frozen_parts(self.scorer.frozen(), batch)
        zero = np.zeros(self.index.dim, dtype=np.float32)  # a profile of unknown items only
        queries = [zero_shot_query(s, self.params) for s in states]
        user = np.stack([zero if q is None else q for q in queries]).astype(np.float32)
        none = np.zeros(0, dtype=np.int64)
        return ScoreParts(user, none, none, np.zeros(0, dtype=np.float32))

    def item_matrix(self) -> np.ndarray:
        """[items, D] the item vectors the user vectors of score_parts are compared with."""
        return self.scorer.frozen().items if self.scorer is not None else self.index.vectors

    def row_scores(self, parts: ScoreParts, rows: np.ndarray) -> np.ndarray:
        """[B, len(rows)] the scores of `scores` for the item `rows` only (sorted, distinct)."""
        if self.scorer is not None:
            return frozen_row_scores(self.scorer.frozen(), parts, rows)
        return parts.user @ self.index.vectors[rows].T

    def apply_learned(self, logs: dict[str, VectorLog]) -> int:
        """Apply the files of the service's items and/or texts logs (data/learned.py) not applied
        yet; returns the rows applied."""
        applied = 0
        items_log = logs.get(ITEMS_LOG)
        for items, vectors in items_log.unapplied() if items_log else ():
            self.upsert_items(items, vectors, learned=items_log.fingerprint)
            applied += items.num_rows
        for texts, vectors in logs[TEXTS_LOG].unapplied() if TEXTS_LOG in logs else ():
            self.text_vectors.update(zip(texts.column("text_hash").to_pylist(), vectors))
            applied += texts.num_rows
        return applied

    def use_retrieval(self, cfg: RetrievalConfig) -> None:
        """Score candidates (two-stage) or every item from now on, as `cfg` says (retrieval.py)."""
        self.retrieval = configured_retrieval(cfg, self.index.item_ids, self.item_matrix(), self.changes)

    def load_rebuilt_index(self) -> bool:
        """Load the index at the retrieval's source when it is a new build that holds no item this
        process has not learned, to be swapped in before the next recommendation; True when one
        was. Safe beside recommendations (a serving process calls it from another thread);
        DataError when the new build indexes another catalog or other vectors."""
        current = self.retrieval
        if current is None or not current.source or self._rebuilt is not None:
            return False
        manifest = read_manifest(current.source)
        if manifest["build_id"] == current.build.get("build_id"):
            return False
        seen = len(self.changes)
        rebuilt = index_retrieval(current.source, current.nearest, current.popular, self.index.item_ids,
                                  self.item_matrix(), self.changes[:seen], manifest)
        if rebuilt is not None:
            self._rebuilt = (rebuilt, seen)
        return rebuilt is not None

    def _swap_rebuilt(self) -> None:
        """Take the rebuilt index loaded by load_rebuilt_index, on the thread that recommends (so
        that no change slips in between), with the changes made since it was loaded."""
        (rebuilt, seen), self._rebuilt = self._rebuilt, None
        for _, rows in self.changes[seen:]:
            rebuilt.changed(rows.tolist())
        self.changes = list(unheld_changes(self.changes, rebuilt.build.get("learned", 0)))  # the rest it holds
        self.retrieval = rebuilt
        log.info("swapped in the index build %s (%d items); %d items searched exactly until the next build",
                 rebuilt.build["build_id"], rebuilt.build["items"], len(rebuilt.fresh))

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
                     priors: Optional[ItemPriors] = None, model: Optional[str] = None) -> Recommender:
    """A Recommender over `items` with the item and text vectors of the embeddings folder, and the
    scorer saved in the `model` folder when it has one."""

    index = shared_index(items, embeddings)
    recommender = Recommender(index, params or ProfileParams(), load_text_vectors(storage.join(embeddings, "texts")),
                              priors)
    if scorer_exists(scorer_folder(model)):
        recommender.scorer = load_scorer(scorer_folder(model), index.item_ids, index.vectors,
                                         priors or empty_priors(len(index)))
        recommender.scorer.shared_key = index.shared_key
        recommender.second_stage = load_second_stage(scorer_folder(model))
    return recommender


def load_profile_params(model: Optional[str]) -> ProfileParams:
    """The profile params saved with a trained model (its scorer, else its fine-tuned encoder),
    or the defaults when there is none."""

    for location in (storage.join(scorer_folder(model), SCORER_META), storage.join(model, "manifest.json")) if model else ():
        if storage.exists(location):
            return ProfileParams.from_dict(storage.read_json(location).get("profile", {}))
    return ProfileParams()


def scorer_folder(model: Optional[str]) -> Optional[str]:
    """Where a model folder keeps its scorer."""

    return storage.join(model, SCORER_DIR) if model else None

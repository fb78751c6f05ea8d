"""The profile scorer in numpy for inference: its eval-mode weights folded (FrozenScorer) and the
scores of one batch of profiles from them, over every item or over some rows only.

Evaluation and serving score with these, not with the torch module (scorer.py): a request scores
one user, and torch's per-operation overhead was most of its cost. `tests/test_model.py` holds the
two forms to the same scores. A score is the sum of parts (ScoreParts): a dense term every item
gets (the scaled similarity of the user vector to the item's plus its popularity) and sparse
terms (repeats of window items, transitions from them) that only some items get, which is what
lets two-stage retrieval (retrieval.py) score candidates only.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import Any, Optional

import numpy as np
from profilerec.config import ScorerConfig
from profilerec.model.scorer_inputs import ScorerBatch

# items lifted by their popularity that one two-stage ranking scores at most beyond its candidates
# (recommend.py): FrozenScorer.popular_items holds that many, and the ranking reads the bound as
# its length. Past it, the ranking may miss an item that only its popularity places (a bound on
# the cost). On a large catalog of items with few events each, most rankings reach the bound: each
# further thousand items read costs more per request than the rare item it places
# (docs/benchmarks.md)
LIFTED_LIMIT = 3_000


@dataclass(frozen=True)
class FrozenScorer:
    """A ProfileScorer's weights as numpy arrays, folded for inference (see `frozen_scores`).

    Made once per loaded scorer (scorer.frozen_scorer): one-user scoring is a few dozen small
    operations, and each torch operation costs microseconds of dispatch that numpy does not
    (`bench/serve_bench.py` prints the CPU a request costs, by process).
    """

    params: ScorerConfig
    items: np.ndarray  # [N, D] unit item vectors: projected text plus ID embedding
    popularity: np.ndarray  # [N] the popularity logit, a constant while the priors do not change
    query_key: np.ndarray  # [D, D] W_q^T W_k: the newest item straight to the key-side query
    query_key_bias: np.ndarray  # [D] b_q W_k
    query_bias: np.ndarray  # [D] W_q^T b_k: the newest item's term of the key bias
    query_bias_const: float  # b_q . b_k
    proj_t: np.ndarray  # [D, D]
    pos_emb: np.ndarray  # [W, D]
    type_emb: np.ndarray  # [types + 1, D]
    slot_weight_t: np.ndarray  # [SLOT_FEATURES, D]
    slot_bias: np.ndarray  # [D]
    mix: np.ndarray  # [4]
    scale: float  # exp of the learned log-scale
    repeat: np.ndarray  # [W]
    trans: np.ndarray  # [W, 2]
    t_indptr: np.ndarray  # CSR of the transitions, as in ItemPriors
    t_indices: np.ndarray
    t_features: np.ndarray  # [nnz, 2] log1p(count) and count / max(total, 1): the transition features
    user_map_t: Optional[np.ndarray] = None  # [D, D] the user transform, transposed (user_transform)
    # the other item graphs (item_graphs): (indptr, indices, features as t_features, weights [W, 2]) each
    more_graphs: tuple[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], ...] = ()

    @functools.cached_property
    def items_t(self) -> np.ndarray:
        """[D, N] `items` transposed and contiguous: the one-user product over all items reads memory
        in order. Made on the first full scoring: two-stage scoring never needs it, and at a million
        items it is as large as `items`."""
        return np.ascontiguousarray(self.items.T)

    @functools.cached_property
    def by_popularity(self) -> tuple[np.ndarray, np.ndarray]:
        """Every item row by decreasing popularity term (ties by row), and those terms negated in
        float64 (ascending, for searchsorted): where two-stage retrieval looks for the items only
        their popularity could place (recommend.py). Made on first use."""
        order = np.lexsort((np.arange(len(self.popularity)), -self.popularity))
        return order, -self.popularity[order].astype(np.float64)

    @functools.cached_property
    def popular_items(self) -> np.ndarray:
        """[LIFTED_LIMIT, D] (all rows of a smaller catalog) the `items` rows of the first rows of
        `by_popularity`, contiguous: the items two-stage retrieval lifts by their popularity are a
        prefix of that order, and one product with a block in order costs a fraction of gathering
        as many rows from a large catalog (frozen_popular_scores). Made on first use."""
        return np.ascontiguousarray(self.items[self.by_popularity[0][:LIFTED_LIMIT]])


@dataclass(frozen=True)
class ScoreParts:
    """A batch's scores taken apart: a dense term every item gets (the user vector against the
    item's, plus its popularity) and sparse terms only some items get (repeats of window items,
    transitions from them). Retrieval searches by `user` and adds `rows` to the candidates, so the
    candidates hold every item whose score has more than the dense term."""

    user: np.ndarray  # [B, D] unit user vectors
    b_idx: np.ndarray  # [S] the profile each sparse term belongs to
    rows: np.ndarray  # [S] the item row it adds to
    values: np.ndarray  # [S] what it adds

    def of(self, b: int) -> "ScoreParts":
        """The parts of profile `b` alone."""
        mine = self.b_idx == b
        return ScoreParts(self.user[b:b + 1], np.zeros(int(mine.sum()), dtype=np.int64), self.rows[mine],
                          self.values[mine])


def frozen_parts(f: FrozenScorer, batch: ScorerBatch) -> ScoreParts:
    """The user vectors and sparse terms of ProfileScorer.forward in eval mode, step for step."""
    p = f.params
    win = {field.name: getattr(batch, field.name).cpu().numpy() for field in fields(batch)}
    mask = win["mask"]
    slots = f.items[np.maximum(win["items"], 0)] * (np.sign(win["weights"]) * mask)[..., None]  # [B, W, D]
    newest = slots[:, -1]
    parts = [newest]
    if p.attention:
        slot_inputs = (slots + f.pos_emb[win["positions"]] + f.type_emb[win["types"]]
                       + np.stack([win["gaps"], win["weights"]], -1) @ f.slot_weight_t + f.slot_bias)
        key_query = newest @ f.query_key + f.query_key_bias
        logits = ((slot_inputs @ key_query[..., None])[..., 0] + (newest @ f.query_bias + f.query_bias_const)[:, None]
                  ) / math.sqrt(slot_inputs.shape[-1])
        logits = np.where(mask, logits, np.float32(-1e9))
        attn = np.exp(logits - logits.max(-1, keepdims=True))
        attn = attn / attn.sum(-1, keepdims=True) * mask
        parts.append((attn[:, None, :] @ slots)[:, 0])
    else:
        parts.append(np.zeros_like(newest))
    if p.interests:
        parts += list(_unit(np.stack([win["short"], win["long"]]) @ f.proj_t))
    else:
        parts += [np.zeros_like(newest), np.zeros_like(newest)]
    user = sum(w * v for w, v in zip(f.mix, parts))
    if f.user_map_t is not None:
        user = user @ f.user_map_t
    user = _unit(user).astype(np.float32)
    b_idx, p_idx = np.nonzero(mask)
    rows, pos = win["items"][b_idx, p_idx], win["positions"][b_idx, p_idx]
    terms = []  # (profile, item row, value) of each sparse term, in arrays
    if p.repeat:
        terms.append((b_idx, rows, f.repeat[pos]))
    if p.transitions and len(rows):
        terms.append(_graph_terms(f.t_indptr, f.t_indices, f.t_features, f.trans, b_idx, rows, pos))
    if len(rows):
        terms += [_graph_terms(*graph, b_idx, rows, pos) for graph in f.more_graphs]
    return ScoreParts(user, _joined([t[0] for t in terms], np.int64), _joined([t[1] for t in terms], np.int64),
                      _joined([t[2] for t in terms], np.float32))


def _graph_terms(indptr: np.ndarray, indices: np.ndarray, features: np.ndarray, weights: np.ndarray,
                 b_idx: np.ndarray, rows: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(profile, item row, value) of an item-item CSR's entries from each window item `rows`."""
    starts = indptr[rows]
    lengths = indptr[rows + 1] - starts
    slot = np.repeat(np.arange(len(rows)), lengths)
    nz = starts[slot] + np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return b_idx[slot], indices[nz], (features[nz] * weights[pos[slot]]).sum(-1)


def frozen_scores(f: FrozenScorer, batch: ScorerBatch) -> np.ndarray:
    """[B, items] scores: ProfileScorer.forward in eval mode without targets."""
    parts = frozen_parts(f, batch)
    scores = _dense_scores(f, parts.user, f.items_t, f.popularity)
    np.add.at(scores, (parts.b_idx, parts.rows), parts.values)
    return scores.astype(np.float32, copy=False)


def frozen_row_scores(f: FrozenScorer, parts: ScoreParts, rows: np.ndarray) -> np.ndarray:
    """[B, len(rows)] the same scores as frozen_scores, for the item `rows` only (sorted, distinct):
    the cost grows with the rows scored, not with the catalog."""
    scores = _dense_scores(f, parts.user, f.items[rows].T, f.popularity[rows])
    if not len(rows):
        return scores.astype(np.float32, copy=False)
    at = np.searchsorted(rows, parts.rows)
    hit = (at < len(rows)) & (rows[np.minimum(at, len(rows) - 1)] == parts.rows)
    np.add.at(scores, (parts.b_idx[hit], at[hit]), parts.values[hit])
    return scores.astype(np.float32, copy=False)


def frozen_popular_scores(f: FrozenScorer, user: np.ndarray, n: int) -> np.ndarray:
    """[n] the scores of frozen_row_scores for the first `n` rows of `f.by_popularity` (at most
    LIFTED_LIMIT) and one user vector, for items without a sparse term (none of the profile's
    candidates, so none of its repeats or transitions)."""
    scores = _dense_scores(f, user, f.popular_items[:n].T, f.popularity[f.by_popularity[0][:n]])
    return scores.astype(np.float32, copy=False)


def _dense_scores(f: FrozenScorer, user: np.ndarray, items_t: np.ndarray, popularity: np.ndarray) -> np.ndarray:
    """The dense term every item's score has: the scaled similarity of the user vector(s) to the
    items (`items_t`, [D, items]) plus the items' `popularity` term."""
    return f.scale * (user @ items_t) + popularity


def _joined(arrays: list[np.ndarray], dtype: Any) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(0, dtype=dtype)


def _unit(x: np.ndarray) -> np.ndarray:
    """x / max(|x|, 1e-12) along the last axis, as F.normalize."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

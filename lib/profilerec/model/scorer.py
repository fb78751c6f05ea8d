"""The trainable parts and their losses.

ProfileScorer turns a profile (profile.py's state: the recent window and the long/short interest
vectors) into a score for every item. It adds, as logits on one scale:

- content: the similarity of a user vector to each item's vector. Items are their frozen text
  embedding through a learned projection, plus an ID embedding (zero at first, so items with
  no history stay pure text); the user vector is attention over the recent window (position,
  time gap and event type as features, queried by the newest event) mixed with the newest
  item and the long- and short-term interest vectors;
- repeat: a learned bonus for an item already in the window, by its position;
- transitions: item-to-item counts learned from the log (what users touched next after each
  window item), by position, as log-counts and as conditional frequencies;
- popularity: the log-count of each item.

Every part is O(window) per user plus one matmul over the items, or over a subset of them: the
candidates of two-stage retrieval (retrieval.py; `frozen_row_scores`) and the sampled negatives of
training on a large catalog (`forward(rows=...)`, `sampled_softmax_loss`). The module trains with torch
(gradients, GPU); `ProfileScorer.predict` runs the same math in numpy on the frozen weights
(`FrozenScorer`) for evaluation and serving, where a request scores one user and torch's
per-operation overhead was most of its cost (`tests/test_model.py` holds both to the same
scores). Encoder fine-tuning keeps its contrastive loss below.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
from dataclasses import dataclass, fields
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from profilerec.config import ScorerConfig, from_dict, to_dict
from profilerec.data import storage
from profilerec.model.priors import ItemPriors
from profilerec.model.profile import ProfileParams, ProfileState, interest_vectors, window_features
from profilerec.model.shared_rows import set_rows, shared_rows
from torch import nn

# features the attention reads per window slot besides the item vector: time gap, event weight
SLOT_FEATURES = 2
PROJECTED_ROWS = 1 << 15  # items projected at a time by projected_items
# items lifted by their popularity that one two-stage ranking scores at most beyond its candidates
# (recommend.py): past it, the ranking may miss an item that only its popularity places (a bound
# on the cost). FrozenScorer keeps the vectors of that many most popular items in one block. On a
# large catalog of items with few events each, most rankings reach the bound: each further
# thousand items read costs more per request than the rare item it places (docs/benchmarks.md)
LIFTED_LIMIT = 3_000


@dataclass
class ScorerBatch:
    """The model inputs for a batch of profiles (tensors, see `scorer_batch`)."""

    items: torch.Tensor  # [B, W] item rows, -1 = empty slot (right-aligned, newest last)
    types: torch.Tensor  # [B, W]
    weights: torch.Tensor  # [B, W]
    gaps: torch.Tensor  # [B, W]
    positions: torch.Tensor  # [B, W] 0 = newest
    mask: torch.Tensor  # [B, W] bool
    long: torch.Tensor  # [B, D] (zeros for an empty profile)
    short: torch.Tensor  # [B, D]

    def to(self, device: Any) -> "ScorerBatch":
        """The same batch on `device`."""
        return ScorerBatch(**{k: v.to(device) for k, v in self.__dict__.items()})


def scorer_batch(states: Sequence[ProfileState], row_of, params: ProfileParams, scorer_params: ScorerConfig,
                 dim: int) -> ScorerBatch:
    """Turn profile states into model inputs (the one conversion training and serving share)."""
    type_ids = {t: i + 1 for i, t in enumerate(scorer_params.types)}  # 0 = other
    win = window_features(states, row_of, params, type_ids)
    long = np.zeros((len(states), dim), dtype=np.float32)
    short = np.zeros((len(states), dim), dtype=np.float32)
    for b, state in enumerate(states):
        lv, sv = interest_vectors(state)
        if lv is not None:
            long[b] = lv
            short[b] = sv if sv is not None else lv
    return ScorerBatch(
        items=torch.from_numpy(win["items"]), types=torch.from_numpy(win["types"]),
        weights=torch.from_numpy(win["weights"]), gaps=torch.from_numpy(win["gaps"]),
        positions=torch.from_numpy(win["positions"]), mask=torch.from_numpy(win["mask"]),
        long=torch.from_numpy(long), short=torch.from_numpy(short),
    )


class ProfileScorer(nn.Module):
    """Scores every item for a batch of profiles; see the module docstring for the parts."""

    def __init__(self, item_vectors: np.ndarray, priors: ItemPriors, window: int,
                 params: Optional[ScorerConfig] = None):
        super().__init__()
        n, dim = item_vectors.shape
        params = params or ScorerConfig()
        self.params = params
        self.window = window
        self.trained_on: list[str] = []  # splits whose targets it learned from (set when loaded)
        self._frozen: Optional[FrozenScorer] = None  # predict()'s weights, made on first use
        # item_matrix() in numpy for the frozen weights (item_rows): kept while the weights stay,
        # rows past `_items_used` are room for items added while serving
        self._items: Optional[np.ndarray] = None
        self._items_used = 0
        self.shared_key: Optional[str] = None  # set: item_rows is made once per node (shared_rows.py)
        # item vectors and priors come from the index and the log at load time, not from the weights
        self.register_buffer("item_vectors", torch.as_tensor(item_vectors, dtype=torch.float32), persistent=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        nn.init.eye_(self.proj.weight)
        self.item_ids = nn.Embedding(n, dim) if params.id_embeddings else None
        if self.item_ids is not None:
            nn.init.zeros_(self.item_ids.weight)
        self.pos_emb = nn.Embedding(window, dim)
        self.type_emb = nn.Embedding(len(params.types) + 1, dim)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        nn.init.normal_(self.type_emb.weight, std=0.02)
        self.slot_features = nn.Linear(SLOT_FEATURES, dim)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.drop = nn.Dropout(params.dropout)
        # user vector = mix of [newest item, attention, short-term, long-term]
        self.mix = nn.Parameter(torch.tensor([1.0, 0.5, 0.5, 0.25]))
        self.scale = nn.Parameter(torch.tensor(math.log(20.0)))  # logit scale of the cosine, learned
        self.repeat = nn.Parameter(torch.zeros(window))
        self.trans = nn.Parameter(torch.zeros(window, 2))
        # the other item graphs' weights, by position (item_graphs)
        self.rtrans = nn.Parameter(torch.zeros(window, 2)) if params.reverse_transitions else None
        self.pop = nn.Parameter(torch.zeros(1))
        # identity at first: the user vector starts as the item-side similarity it was before
        self.user_map = nn.Linear(dim, dim, bias=False) if params.user_transform else None
        if self.user_map is not None:
            nn.init.eye_(self.user_map.weight)
        self.set_priors(priors)

    def set_priors(self, priors: ItemPriors) -> None:
        """Use these item statistics (a grown log, a new catalog) without retraining the rest."""
        rows = np.repeat(np.arange(priors.num_items), np.diff(priors.indptr))
        totals = np.zeros(priors.num_items, dtype=np.float32)
        np.add.at(totals, rows, priors.counts)
        buffers = {"t_indptr": torch.as_tensor(priors.indptr, dtype=torch.int64),
                   "t_indices": torch.as_tensor(priors.indices, dtype=torch.int64),
                   "t_counts": torch.as_tensor(priors.counts, dtype=torch.float32),
                   "t_totals": torch.as_tensor(totals[rows], dtype=torch.float32),
                   "popularity": torch.as_tensor(priors.popularity, dtype=torch.float32)}
        for prefix, (indptr, indices, counts, totals) in item_graphs(priors, self.params).items():
            buffers.update({f"{prefix}_indptr": torch.as_tensor(indptr, dtype=torch.int64),
                            f"{prefix}_indices": torch.as_tensor(indices, dtype=torch.int64),
                            f"{prefix}_counts": torch.as_tensor(counts, dtype=torch.float32),
                            f"{prefix}_totals": torch.as_tensor(totals, dtype=torch.float32)})
        self.span = priors.span
        for name, value in buffers.items():
            self.register_buffer(name, value.to(self.item_vectors.device), persistent=False)
        self._frozen = None

    def set_items(self, item_vectors: np.ndarray, priors: ItemPriors, changed: Optional[list[int]] = None) -> None:
        """Score over a grown or changed catalog (rows never move; new rows are new items, which
        have no ID embedding and are scored by their text alone). `changed`: the rows added or
        replaced; only they are projected again (None: every row, when next needed)."""
        vectors = torch.as_tensor(item_vectors, dtype=torch.float32).to(self.item_vectors.device)
        if self.item_ids is not None and len(vectors) > self.item_ids.num_embeddings:
            grown = nn.Embedding(len(vectors), self.item_ids.embedding_dim).to(vectors.device)
            nn.init.zeros_(grown.weight)
            with torch.no_grad():
                grown.weight[: self.item_ids.num_embeddings] = self.item_ids.weight
            self.item_ids = grown
        self.register_buffer("item_vectors", vectors, persistent=False)
        if self._items is not None and changed:
            with torch.no_grad():
                projected = self.item_matrix(torch.as_tensor(changed, device=vectors.device)).float().cpu().numpy()
            self._items, self._items_used = set_rows(self._items, self._items_used, changed, projected)
        else:
            self._items = None
        self.set_priors(priors)

    def item_rows(self) -> np.ndarray:
        """[items, D] item_matrix() in numpy, for scoring with the frozen weights: made once per
        node when `shared_key` is set (the same weights over the same vectors), kept until the
        weights change, and updated row by row when items change (set_items)."""
        if self._items is None:
            def fill(out: np.ndarray) -> None:
                self.projected_items(torch.from_numpy(out))

            n, dim = self.item_vectors.shape
            if self.shared_key:
                self._items = shared_rows(f"{self.shared_key}-{self._weights_digest()}", n, dim, fill)
            else:
                self._items = np.empty((n, dim), dtype=np.float32)
                fill(self._items)
            self._items_used = n
        return self._items[: self._items_used]

    def _weights_digest(self) -> str:
        digest = hashlib.blake2b(digest_size=12)
        for name, value in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(value.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()

    def item_matrix(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[items, D] unit vectors the user vector is compared with; [len(rows), D] those of `rows`
        alone (what a step over a subset of a large catalog projects)."""
        if rows is None:
            reps = self.proj(self.item_vectors)
            return F.normalize(reps + self.item_ids.weight if self.item_ids is not None else reps, dim=-1)
        reps = self.proj(self.item_vectors[rows])
        return F.normalize(reps + self.item_ids(rows) if self.item_ids is not None else reps, dim=-1)

    @torch.no_grad()
    def projected_items(self, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """item_matrix() without gradients, projected PROJECTED_ROWS items at a time into `out`
        (a new tensor on the model's device when not given; any device): a large catalog's
        intermediate products are never all in memory at once."""
        n, dim = self.item_vectors.shape
        device = self.item_vectors.device
        out = torch.empty((n, dim), dtype=torch.float32, device=device) if out is None else out
        for start in range(0, n, PROJECTED_ROWS):
            out[start:start + PROJECTED_ROWS] = self.item_matrix(torch.arange(start, min(n, start + PROJECTED_ROWS),
                                                                              device=device))
        return out

    def train(self, mode: bool = True) -> "ProfileScorer":
        self._frozen = self._items = None  # the weights are about to change (or just did)
        return super().train(mode)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self._frozen = self._items = None
        return super().load_state_dict(*args, **kwargs)

    def frozen(self) -> "FrozenScorer":
        """The eval-mode weights numpy scores with (made on the first call after loading,
        training or a catalog change)."""
        if self._frozen is None:
            self._frozen = frozen_scorer(self)
        return self._frozen

    def predict(self, batch: ScorerBatch) -> np.ndarray:
        """[B, items] scores of `forward` in eval mode, computed in numpy from the frozen weights."""
        return frozen_scores(self.frozen(), batch)

    def user_vectors(self, batch: ScorerBatch, items: torch.Tensor) -> torch.Tensor:
        """[B, D] unit user vectors from the window and the interest vectors (`items`: item_matrix())."""
        return self._user_vectors(batch, items[batch.items.clamp(min=0)])

    def _user_vectors(self, batch: ScorerBatch, window: torch.Tensor) -> torch.Tensor:
        """user_vectors from `window`, the [B, W, D] unit vectors of the window's items."""
        p = self.params
        # a disliked item (negative weight: a low rating) counts against its direction
        slots = window * (torch.sign(batch.weights) * batch.mask)[..., None]  # [B, W, D]
        newest = slots[:, -1]
        parts = [newest]
        if p.attention:
            slot_inputs = self.drop(slots + self.pos_emb(batch.positions) + self.type_emb(batch.types)
                                    + self.slot_features(torch.stack([batch.gaps, batch.weights], -1)))
            query = self.query(newest)
            # key(x)·q = x·(W_k^T q) + b_k·q: one [D, D] product per user instead of one per window slot
            logits = ((slot_inputs * (query @ self.key.weight)[:, None, :]).sum(-1)
                      + (query @ self.key.bias)[:, None]) / math.sqrt(slot_inputs.shape[-1])
            logits = logits.masked_fill(~batch.mask, -1e9)
            attn = torch.softmax(logits, dim=-1) * batch.mask
            parts.append((attn[..., None] * slots).sum(1))
        else:
            parts.append(torch.zeros_like(newest))
        if p.interests:
            parts += F.normalize(self.proj(torch.stack([batch.short, batch.long])), dim=-1).unbind()
        else:
            parts += [torch.zeros_like(newest), torch.zeros_like(newest)]
        user = sum(w * v for w, v in zip(self.mix, parts))
        if self.user_map is not None:
            user = self.user_map(user)
        return F.normalize(self.drop(user), dim=-1)

    def forward(self, batch: ScorerBatch, targets: Optional[torch.Tensor] = None,
                rows: Optional[torch.Tensor] = None, columns: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, items] logits, or [B, len(rows)] with `rows` (distinct item rows shared by the batch):
        the same logits as `forward(batch, targets)[:, rows]`, at a cost that grows with the batch,
        its window and the rows, not with the catalog (only those items are projected).
        `columns` may hold item_matrix(rows), or item_matrix() without `rows`, already made (an
        evaluation over many batches with the same weights projects each item once).

        In training, pass the `targets` whose own events are counted in the priors: their counts
        are taken out again (leave-one-out), or the model would learn to trust priors that already
        contain the answer."""
        window_rows = batch.items.clamp(min=0)
        if rows is None:
            columns = self.item_matrix() if columns is None else columns
            window = columns[window_rows]
            popularity = self.popularity
        elif columns is not None:
            window = self.item_matrix(window_rows.flatten()).view(*window_rows.shape, -1)
            popularity = self.popularity[rows]
        else:
            # each needed item projected once, whether a column, a window item or both
            needed, inverse = torch.unique(torch.cat([rows, window_rows.flatten()]), return_inverse=True)
            vectors = self.item_matrix(needed)
            columns, window = vectors[inverse[: len(rows)]], vectors[inverse[len(rows):]].view(*window_rows.shape, -1)
            popularity = self.popularity[rows]
        logits = self.scale.exp() * self._user_vectors(batch, window) @ columns.T
        if self.params.popularity:
            pop = popularity  # one row for every profile, unless the targets' own events come out
            if targets is not None:
                at, ones = self._on_columns(rows, torch.arange(len(targets), device=pop.device), targets,
                                            torch.full_like(targets, -1.0, dtype=pop.dtype))
                pop = pop[None, :].expand(len(logits), -1).index_put(at, ones, accumulate=True)
            logits = logits + self.pop * torch.log1p(pop.clamp(min=0))
        b_idx, p_idx = torch.nonzero(batch.mask, as_tuple=True)
        slot_rows = batch.items[b_idx, p_idx]
        pos = batch.positions[b_idx, p_idx]
        terms = []  # sparse terms as (profile, item row, value)
        if self.params.repeat:
            terms.append((b_idx, slot_rows, self.repeat[pos]))
        if self.params.transitions and len(slot_rows):
            terms.append(self._transition_terms(b_idx, slot_rows, pos, targets))
        if len(slot_rows):
            for prefix, weights in self._more_graphs():
                terms.append(self._transition_terms(b_idx, slot_rows, pos, None, prefix, weights))
        for term in terms:
            logits = logits.index_put(*self._on_columns(rows, *term), accumulate=True)
        return logits

    @staticmethod
    def _on_columns(rows: Optional[torch.Tensor], b_idx: torch.Tensor, items: torch.Tensor,
                    values: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Sparse terms (profile, item row, value) as index_put's (profile, column) and values: the
        column is the item row itself over every item, its place in `rows` over a subset (terms on
        items that are not columns are dropped)."""
        if rows is None:
            return (b_idx, items), values
        if not len(rows):
            none = torch.zeros(0, dtype=torch.int64, device=items.device)
            return (none, none), values[:0]
        ordered, order = torch.sort(rows)
        at = torch.searchsorted(ordered, items).clamp(max=len(rows) - 1)
        hit = ordered[at] == items
        return (b_idx[hit], order[at[hit]]), values[hit]

    def _more_graphs(self) -> list[tuple[str, nn.Parameter]]:
        """(buffer prefix, weights) of the item graphs besides the transitions (item_graphs)."""
        return [(prefix, w) for prefix, w in (("r", self.rtrans),) if w is not None]

    def _transition_terms(self, b_idx, rows, pos, targets, prefix: str = "t", weights=None):
        """(profile, item row, value) of the transitions from each window item, or of another item
        graph's entries (`prefix` of its buffers, `weights` by position; item_graphs)."""
        weights = self.trans if weights is None else weights
        indptr, indices = getattr(self, f"{prefix}_indptr"), getattr(self, f"{prefix}_indices")
        # gather the CSR rows of the window items without densifying the item-item matrix
        starts, ends = indptr[rows], indptr[rows + 1]
        lengths = ends - starts
        total = int(lengths.sum())
        slot = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), lengths)
        offset = torch.arange(total, device=rows.device) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
        nz = starts[slot] + offset
        counts, totals = getattr(self, f"{prefix}_counts")[nz], getattr(self, f"{prefix}_totals")[nz]
        if targets is not None:
            # item_priors counts a pair at distance d as 1/d; the newest window item is at distance 1
            distance = (pos[slot] + 1).float()
            own = ((indices[nz] == targets[b_idx[slot]]) & (distance <= self.span)).float() / distance
            counts, totals = (counts - own).clamp(min=0), (totals - own).clamp(min=0)
        feats = torch.stack([torch.log1p(counts), counts / totals.clamp(min=1.0)], dim=-1)
        values = (feats * weights[pos[slot]]).sum(-1)
        return b_idx[slot], indices[nz], values


def item_graphs(priors: ItemPriors, params: ScorerConfig) -> dict[str, tuple[np.ndarray, ...]]:
    """The item-to-item graphs besides the transitions that `params` scores with, by buffer prefix,
    each a CSR (indptr, indices, counts) plus each entry's row total: "r" the reverse transitions."""
    return {"r": reverse_transitions(priors)} if params.reverse_transitions else {}


def reverse_transitions(priors: ItemPriors) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The transitions read backwards, as a CSR (indptr, indices, counts) whose row b lists the
    items that preceded b, plus each entry's row total (what b's predecessors add up to)."""
    n = priors.num_items
    source = np.repeat(np.arange(n), np.diff(priors.indptr))
    order = np.lexsort((source, priors.indices))  # by the later item, then the earlier one
    later = priors.indices[order]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(later, minlength=n))]).astype(np.int64)
    counts = priors.counts[order].astype(np.float32)
    totals = np.bincount(later, weights=counts, minlength=n).astype(np.float32)
    return indptr, source[order].astype(np.int64), counts, totals[later]


@dataclass(frozen=True)
class FrozenScorer:
    """A ProfileScorer's weights as numpy arrays, folded for inference (see `frozen_scores`).

    Made once per loaded scorer: one-user scoring is a few dozen small operations, and each
    torch operation costs microseconds of dispatch that numpy does not. The shard's CPU per
    recommendation fell by about a third with it (`bench/serve_bench.py` prints it by process).
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


def frozen_scorer(model: ProfileScorer) -> FrozenScorer:
    """The eval-mode weights of `model`, on the CPU, folded as FrozenScorer describes."""
    with torch.no_grad():
        def arr(t: torch.Tensor) -> np.ndarray:
            t = t.detach().cpu()
            return np.ascontiguousarray((t.float() if t.is_floating_point() else t).numpy())

        items = model.item_rows()
        w_q, b_q, w_k, b_k = (arr(t).astype(np.float64) for t in (model.query.weight, model.query.bias,
                                                                     model.key.weight, model.key.bias))
        counts, totals = arr(model.t_counts), arr(model.t_totals)
        more_graphs = tuple((arr(getattr(model, f"{prefix}_indptr")), arr(getattr(model, f"{prefix}_indices")),
                             transition_features(arr(getattr(model, f"{prefix}_counts")),
                                                 arr(getattr(model, f"{prefix}_totals"))), arr(weights))
                            for prefix, weights in model._more_graphs())
        popularity = np.zeros(len(items), dtype=np.float32)
        if model.params.popularity:
            popularity = arr(model.pop * torch.log1p(model.popularity.clamp(min=0)))
        return FrozenScorer(
            params=model.params, items=items, popularity=popularity,
            query_key=(w_q.T @ w_k).astype(np.float32), query_key_bias=(b_q @ w_k).astype(np.float32),
            query_bias=(w_q.T @ b_k).astype(np.float32), query_bias_const=float(b_q @ b_k),
            proj_t=np.ascontiguousarray(arr(model.proj.weight).T), pos_emb=arr(model.pos_emb.weight),
            type_emb=arr(model.type_emb.weight), slot_weight_t=np.ascontiguousarray(arr(model.slot_features.weight).T),
            slot_bias=arr(model.slot_features.bias), mix=arr(model.mix), scale=float(model.scale.exp()),
            repeat=arr(model.repeat), trans=arr(model.trans), t_indptr=arr(model.t_indptr),
            t_indices=arr(model.t_indices), t_features=transition_features(counts, totals),
            user_map_t=None if model.user_map is None else np.ascontiguousarray(arr(model.user_map.weight).T),
            more_graphs=more_graphs,
        )


def transition_features(counts: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """[nnz, 2] log1p(count) and count / max(total, 1): what the transition weights multiply."""
    return np.stack([np.log1p(counts), counts / np.maximum(totals, 1.0)], axis=-1).astype(np.float32)


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


# the scorer's training losses (TrainConfig.loss): auto picks one by the catalog's size
LOSSES = ("auto", "full", "sampled")


def full_softmax_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the target against every item (the ranking task itself)."""
    return F.cross_entropy(logits, targets)


def sampled_softmax_loss(logits: torch.Tensor, labels: torch.Tensor, candidates: torch.Tensor,
                         targets: torch.Tensor, log_expected: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross-entropy of each case's target against sampled candidates: an estimate of
    full_softmax_loss whose cost grows with the candidates, not with the catalog.

    `logits` [B, C] are the scores of the `candidates` [C] (item rows; a row drawn twice is two
    columns), `labels` [B] the column of each case's target, `targets` [B] its item row. Every
    other column is a negative draw for the case, except those whose row is the case's target
    (an accidental hit: a sampled row, or another case with the same target), which are removed:
    the target counts only as itself.

    `log_expected` [C] is log m_c, m_c the expected number of times row c is among a case's
    negative draws. Each negative's logit gets it subtracted (the logQ correction, Yi et al. 2019,
    as in Bengio and Senecal's importance-sampled softmax): the sum of exp(s_c - log m_c) over the
    negative draws is then an unbiased estimate of the sum of exp(s_c) over every item c but the
    target, the rest of the full softmax's partition. The target's own column is not corrected:
    it is a candidate by construction, not by a draw, and its term of the partition is exact.
    With every item once as the candidates and no correction, this is full_softmax_loss.
    """
    own = torch.arange(len(candidates), device=logits.device)[None, :] == labels[:, None]
    if log_expected is not None:
        logits = logits - torch.where(own, torch.zeros_like(logits), log_expected[None, :].to(logits.dtype))
    hits = (candidates[None, :] == targets[:, None]) & ~own
    return F.cross_entropy(logits.masked_fill(hits, float("-inf")), labels)


def contrastive_loss(queries: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """Cross-entropy of each query against all `keys`, the right one being `keys[positives[i]]`.

    Keys are the distinct items of the batch, so an item that is the target of several cases is
    never a negative for any of them.
    """
    logits = queries @ keys.T / temperature
    return F.cross_entropy(logits, positives)


# parts a saved scorer does not name were added to the scorer after it was trained: it has no
# weights for them, whatever the default is now
PREDATING = {"reverse_transitions": False}

SCORER_WEIGHTS = "scorer.pt"
SCORER_META = "scorer.json"


def save_scorer(model: ProfileScorer, folder: str, item_ids: Sequence[str], profile: ProfileParams,
                trained_on: Sequence[str]) -> None:
    """Write the scorer's weights and what is needed to rebuild it (params, item id per row, and
    the splits whose targets it learned from, which it must not be evaluated on)."""


    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    storage.write_bytes(buf.getvalue(), storage.join(folder, SCORER_WEIGHTS))
    storage.write_json({"scorer": to_dict(model.params), "profile": profile.to_dict(), "window": model.window,
                        "trained_on": list(trained_on), "item_ids": list(item_ids)}, storage.join(folder, SCORER_META))


def scorer_exists(folder: Optional[str]) -> bool:
    """Whether `folder` holds a saved scorer."""

    return bool(folder) and storage.exists(storage.join(folder, SCORER_META))


def load_scorer(folder: str, item_ids: Sequence[str], item_vectors: np.ndarray, priors: ItemPriors) -> ProfileScorer:
    """A saved scorer over the given items: ID embeddings follow their item ids, items it was not
    trained with get none (they are scored by their text alone)."""


    meta = storage.read_json(storage.join(folder, SCORER_META))
    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(folder, SCORER_WEIGHTS))), map_location="cpu")
    model = ProfileScorer(item_vectors, priors, meta["window"],
                          from_dict(ScorerConfig, {**PREDATING, **meta["scorer"]}))
    if "item_ids.weight" in state:
        trained = state["item_ids.weight"]
        rows = {item_id: i for i, item_id in enumerate(meta["item_ids"])}
        weight = torch.zeros(len(item_ids), trained.shape[1])
        for i, item_id in enumerate(item_ids):
            if item_id in rows:
                weight[i] = trained[rows[item_id]]
        state["item_ids.weight"] = weight
    model.load_state_dict(state)
    model.trained_on = list(meta.get("trained_on", []))
    model.eval()
    return model

"""The profile scorer: the trainable model of a profile's score for every item.

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
training on a large catalog (`forward(rows=...)`; training/losses.py). The module trains with
torch (gradients, GPU); `ProfileScorer.predict` runs the same math in numpy on the frozen weights
(frozen_scorer.py) for evaluation and serving. Saving and loading a trained scorer are here too.
"""

from __future__ import annotations

import hashlib
import io
import math
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from profilerec.config import ScorerConfig, from_dict, to_dict
from profilerec.data import storage
from profilerec.model.frozen_scorer import FrozenScorer, frozen_scores
from profilerec.model.priors import ItemPriors
from profilerec.model.profile import ProfileParams
from profilerec.model.scorer_inputs import ScorerBatch
from profilerec.model.shared_rows import set_rows, shared_rows
from torch import nn

# features the attention reads per window slot besides the item vector: time gap, event weight
SLOT_FEATURES = 2
PROJECTED_ROWS = 1 << 15  # items projected at a time by projected_items


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

    def frozen(self) -> FrozenScorer:
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

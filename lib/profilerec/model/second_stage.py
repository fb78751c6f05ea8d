"""The second stage: a small network that reorders the first stage's top items of a profile.

The ProfileScorer (scorer.py) adds its parts linearly, one score per item. Over the first
`depth` items it ranks highest, the second stage looks at each item beside the profile and the
others on that list (features below: the first stage's score and place, how close the item is to
each item of the window, its popularity, how often it is repeated, the transitions between it and
the window both ways, shared brands) and adds a learned correction to the score: an MLP with one
hidden layer. It reorders those `depth` items only; the rest keep the first stage's order below
them. It is fitted on the cases the first stage chose its epochs on (training/second_stage.py);
what mixes its features non-linearly (an item's popularity and its repeats in the score's light) is
what the first stage's sum cannot express.

This module owns the features and the numpy forward that evaluation and the service run
(Recommender.reranked_top); the torch fit builds the same network and hands its weights here.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional

import numpy as np
from profilerec.data import storage
from profilerec.errors import DataError
from profilerec.model.priors import ItemPriors

# the features of one (profile, item) pair, in column order
FEATURES = (
    "score", "gap to the first", "log1p place", "similarity to the newest", "highest similarity in the window",
    "mean similarity to the window", "log1p popularity", "times in the window", "is the newest",
    "log1p transitions newest -> item", "log1p transitions window -> item", "log1p transitions item -> newest",
    "log1p transitions item -> window", "brand of the newest", "window items of its brand", "log1p window length",
)

SECOND_STAGE_FILE = "second_stage.npz"  # in the scorer folder, beside its weights


@dataclass
class SecondStage:
    """The fitted network: standardisation of the features, then correction =
    relu(x @ w1 + b1) @ w2 + b2, added to the first stage's score."""

    depth: int  # first-stage items it reorders
    mean: np.ndarray  # [F]
    std: np.ndarray  # [F]
    w1: np.ndarray  # [F, H]
    b1: np.ndarray  # [H]
    w2: np.ndarray  # [H]
    b2: float

    def scores(self, features: np.ndarray) -> np.ndarray:
        """[B, R] the new scores of the items whose `features` [B, R, F] are given."""
        x = (features - self.mean) / self.std
        hidden = np.maximum(x @ self.w1 + self.b1, 0.0)
        return (features[..., 0] + hidden @ self.w2 + self.b2).astype(np.float32)


def rerank_features(rows: np.ndarray, scores: np.ndarray, window: np.ndarray, items: np.ndarray,
                    priors: ItemPriors, brands: np.ndarray) -> np.ndarray:
    """[B, R, F] FEATURES of each profile's first-stage list.

    `rows`, `scores` [B, R]: the list, best first; `window` [B, W]: the item rows of each profile's
    recent window, newest last, -1 for an empty slot; `items` [N, D]: unit item vectors (the
    scorer's); `priors`: popularity and transitions; `brands` [N]: a code per brand, -1 for none.
    """
    b, r = rows.shape
    present = window >= 0
    win = np.maximum(window, 0)
    cand = items[rows]  # [B, R, D]
    sims = (cand @ items[win].transpose(0, 2, 1)) * present[:, None, :]  # [B, R, W]
    length = present.sum(1)
    out = np.empty((b, r, len(FEATURES)), dtype=np.float32)
    out[..., 0] = scores
    out[..., 1] = scores[:, :1] - scores
    out[..., 2] = np.log1p(np.arange(r))[None, :]
    out[..., 3] = sims[..., -1]
    out[..., 4] = np.where(present[:, None, :], sims, -1.0).max(-1) * (length > 0)[:, None]
    out[..., 5] = sims.sum(-1) / np.maximum(length, 1)[:, None]
    out[..., 6] = np.log1p(priors.popularity[rows])
    same = (rows[:, :, None] == window[:, None, :])
    out[..., 7] = same.sum(-1)
    out[..., 8] = same[..., -1]
    window_rows = np.broadcast_to(window[:, None, :], (b, r, window.shape[1]))
    cand_rows = np.broadcast_to(rows[:, :, None], window_rows.shape)
    # [2, B, R, W] the transition counts window item -> item and item -> window item, in one lookup
    # (the window's last slot holds the newest item)
    counts = priors.pair_counts(np.stack([window_rows, cand_rows]), np.stack([cand_rows, window_rows]))
    out[..., 9], out[..., 11] = np.log1p(counts[..., -1])
    out[..., 10], out[..., 12] = np.log1p(counts.sum(-1))
    brand = brands[rows]
    window_brands = np.where(present, brands[win], -1)
    out[..., 13] = (brand >= 0) & (brand == window_brands[:, -1:])
    out[..., 14] = ((brand[:, :, None] == window_brands[:, None, :]) & (brand >= 0)[..., None]).sum(-1)
    out[..., 15] = np.log1p(length)[:, None]
    return out


def save_second_stage(stage: SecondStage, folder: str) -> None:
    """Write the network to `folder` (the scorer's)."""
    buf = io.BytesIO()
    np.savez(buf, depth=stage.depth, mean=stage.mean, std=stage.std, w1=stage.w1, b1=stage.b1, w2=stage.w2,
             b2=stage.b2, features=np.array(FEATURES))
    storage.write_bytes(buf.getvalue(), storage.join(folder, SECOND_STAGE_FILE))


def load_second_stage(folder: str) -> Optional[SecondStage]:
    """The network saved in `folder`, or None when the scorer there has no second stage."""
    location = storage.join(folder, SECOND_STAGE_FILE)
    if not storage.exists(location):
        return None
    saved = np.load(io.BytesIO(storage.read_bytes(location)))
    if tuple(saved["features"].tolist()) != FEATURES:
        raise DataError(f"{location} was fitted on other features than this version computes: train again")
    return SecondStage(depth=int(saved["depth"]), mean=saved["mean"], std=saved["std"], w1=saved["w1"],
                       b1=saved["b1"], w2=saved["w2"], b2=float(saved["b2"]))

"""The profile scorer's inputs: profile states turned into a batch of window tensors, the one
conversion training, evaluation and serving share (scorer.py, frozen_scorer.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from profilerec.config import ScorerConfig
from profilerec.model.profile import ProfileParams, ProfileState, interest_vectors, window_features


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

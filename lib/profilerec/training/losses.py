"""The training losses: the profile scorer's softmax over every item or over sampled candidates
(training/scorer.py), and the contrastive loss of encoder fine-tuning (training/finetune.py)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

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

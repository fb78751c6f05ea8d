"""The trainable parts and their loss.

Encoder fine-tuning: the user side is the profile itself (profile.py's update run on embeddings
that carry gradients), the item side the encoder's item vectors; next-item prediction is a
contrastive loss with the other items of the batch as negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_loss(queries: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """Cross-entropy of each query against all `keys`, the right one being `keys[positives[i]]`.

    Keys are the distinct items of the batch, so an item that is the target of several cases is
    never a negative for any of them.
    """
    logits = queries @ keys.T / temperature
    return F.cross_entropy(logits, positives)

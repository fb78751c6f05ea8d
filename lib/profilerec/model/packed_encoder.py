"""Packed (unpadded) inference of BERT-family encoders, on the Hugging Face model's own weights.

A batch of token-id rows of unequal length is concatenated into one [total_tokens] row: the
embeddings, the Q/K/V and output projections, the LayerNorms and the feed-forward layers (all
token-wise) run on a [total_tokens, hidden] tensor with no padding at all; only attention, which
mixes the tokens of one text, runs per sequence, with one of three kernels (`ATTENTION`):

- `varlen`: torch's flash-attention varlen kernel (`torch.nn.attention.varlen.varlen_attn`),
  CUDA only, fp16/bf16 only: cumulative offsets straight in, no padding anywhere;
- `jagged`: `scaled_dot_product_attention` on nested tensors of layout `torch.jagged` (CUDA: the
  flash or memory-efficient varlen kernels, any float dtype; CPU: torch's math path per sequence);
- `padded`: the packed q/k/v scattered into a padded [rows, heads, longest, head_dim] block for
  the attention kernel only and gathered back (rows are length-sorted, so the padding is small).

No weight is copied: `packed_forward` calls the model's own submodules (so int8-quantised Linear
layers work too). The architectures it understands are in `PACKABLE`; docs/encoding.md has the
figures that chose where packing and which kernel are the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

PACKABLE = ("bert",)  # config.model_type values whose module layout packed_forward follows
ATTENTION = ("varlen", "jagged", "padded")


def packing_support(model: torch.nn.Module) -> str:
    """"" when packed_forward can run `model`, else why not (one phrase, for an error message)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in PACKABLE:
        return f"architecture {model_type or type(model).__name__!r} is not one of {', '.join(PACKABLE)}"
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return f"position embeddings {config.position_embedding_type!r} are not absolute"
    if getattr(config, "is_decoder", False):
        return "the model is a decoder (causal attention)"
    if not all(hasattr(model, name) for name in ("embeddings", "encoder")):
        return f"{type(model).__name__} lacks the BertModel layout (embeddings, encoder.layer)"
    return ""


@dataclass
class PackedBatch:
    """Token-id rows concatenated: ids and positions [total_tokens], offsets [rows + 1] (int32,
    the cumulative lengths the varlen kernels take), lengths [rows] and the longest row."""

    ids: torch.Tensor
    positions: torch.Tensor
    offsets: torch.Tensor
    lengths: torch.Tensor
    longest: int

    @property
    def rows(self) -> int:
        return len(self.lengths)


def pack_rows(rows: Sequence[Sequence[int]], device: torch.device) -> PackedBatch:
    """A PackedBatch of non-empty token-id rows, built on the host and moved to `device` once."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    if not len(lengths) or lengths.min() < 1:
        raise ValueError("pack_rows needs at least one row and no empty row")
    ids = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows])
    starts = np.concatenate([[0], np.cumsum(lengths)])
    # position of each token inside its own row: 0..len-1 per row
    positions = np.arange(len(ids), dtype=np.int64) - np.repeat(starts[:-1], lengths)
    return PackedBatch(
        ids=torch.from_numpy(ids).to(device), positions=torch.from_numpy(positions).to(device),
        offsets=torch.from_numpy(starts.astype(np.int32)).to(device),
        lengths=torch.from_numpy(lengths).to(device), longest=int(lengths.max()),
    )


def default_attention(device: torch.device, dtype: torch.dtype) -> str:
    """The attention kernel packed_forward uses on `device` at `dtype`: CUDA half types the flash
    varlen kernel, other CUDA dtypes jagged SDPA; CPUs pad inside attention (docs/encoding.md
    has the CPU measurement that chose it over jagged)."""
    if device.type == "cuda":
        return "varlen" if dtype in (torch.float16, torch.bfloat16) else "jagged"
    return "padded"


def _attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch,
                      scale: float) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, batch.offsets, batch.offsets, batch.longest, batch.longest, scale=scale)


def _attention_jagged(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch,
                      scale: float) -> torch.Tensor:
    offsets = batch.offsets.long()

    def nested(x: torch.Tensor) -> torch.Tensor:
        # [rows, j, heads, dim] -> [rows, heads, j, dim], the layout SDPA takes
        return torch.nested.nested_tensor_from_jagged(x, offsets, max_seqlen=batch.longest).transpose(1, 2)

    out = F.scaled_dot_product_attention(nested(q), nested(k), nested(v), scale=scale)
    return out.transpose(1, 2).values()


class _PaddedLayout:
    """Where each packed token sits in a padded [rows x longest] block, and the key mask; built
    once per batch and shared by every layer."""

    def __init__(self, batch: PackedBatch):
        rows = torch.repeat_interleave(torch.arange(batch.rows, device=batch.ids.device), batch.lengths)
        self.slots = rows * batch.longest + batch.positions
        columns = torch.arange(batch.longest, device=batch.ids.device)
        self.mask = (columns[None, :] < batch.lengths[:, None])[:, None, None, :]  # [rows, 1, 1, longest]
        self.shape = (batch.rows, batch.longest)


def _attention_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: _PaddedLayout,
                      scale: float) -> torch.Tensor:
    rows, longest = layout.shape
    heads, dim = q.shape[1:]

    def padded(x: torch.Tensor) -> torch.Tensor:
        block = x.new_zeros(rows * longest, heads, dim)
        block[layout.slots] = x
        return block.view(rows, longest, heads, dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=layout.mask, scale=scale)
    return out.transpose(1, 2).reshape(rows * longest, heads, dim)[layout.slots]


def packed_forward(model: torch.nn.Module, batch: PackedBatch, attention: str) -> torch.Tensor:
    """The last hidden state [total_tokens, hidden] of a BERT-family `model` (eval mode, no
    dropout) for a packed batch; equal to the padded forward's unpadded tokens up to rounding."""
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, not {attention!r}")
    emb = model.embeddings
    # every text is one segment (token type 0), as the tokenizer gives single texts
    x = emb.word_embeddings(batch.ids) + emb.position_embeddings(batch.positions) + emb.token_type_embeddings.weight[0]
    x = emb.LayerNorm(x)
    layout = _PaddedLayout(batch) if attention == "padded" else None
    for layer in model.encoder.layer:
        self_attn = layer.attention.self
        heads, dim = self_attn.num_attention_heads, self_attn.attention_head_size
        q, k, v = (proj(x).view(-1, heads, dim) for proj in (self_attn.query, self_attn.key, self_attn.value))
        if attention == "varlen":
            context = _attention_varlen(q, k, v, batch, self_attn.scaling)
        elif attention == "jagged":
            context = _attention_jagged(q, k, v, batch, self_attn.scaling)
        else:
            context = _attention_padded(q, k, v, layout, self_attn.scaling)
        out = layer.attention.output
        x = out.LayerNorm(out.dense(context.reshape(-1, heads * dim)) + x)
        x = layer.output.LayerNorm(layer.output.dense(layer.intermediate(x)) + x)
    return x


def packed_mean_pool(hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Per-row mean of the packed token vectors, L2-normalised, in fp32 [rows, hidden] (the
    sentence-transformers recipe, as mean_pool does for padded batches)."""
    rows = torch.repeat_interleave(torch.arange(batch.rows, device=hidden.device), batch.lengths)
    sums = torch.zeros(batch.rows, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, rows, hidden.float())
    return F.normalize(sums / batch.lengths[:, None].float(), p=2, dim=-1)

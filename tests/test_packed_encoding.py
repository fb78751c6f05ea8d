"""Packed (unpadded) encoding gives the padded path's vectors; its settings fail clearly."""

import json

import numpy as np
import pytest
import torch
from conftest import SAMPLE
from profilerec.errors import ConfigError
from profilerec.model.encoder import TextEncoder, load_tokenizer, resolve_model_path, token_batches
from profilerec.model.packed_encoder import pack_rows, packed_forward, packed_mean_pool


def sample_texts(items: int = 100) -> list[str]:
    """Real texts of very different lengths from the bundled sample: long descriptions (cut at
    max_length), titles, single words and a few characters."""
    texts = []
    with open(SAMPLE / "items.jsonl") as f:
        for line, _ in zip(f, range(items)):
            row = json.loads(line)
            title, description = row.get("title") or "drill", row.get("description") or ""
            texts += [f"{title}. {description}", title, title.split()[0], title[:3]]
    return texts


@pytest.fixture(scope="module")
def padded():
    return TextEncoder(packing="off")


@pytest.fixture(scope="module")
def texts():
    return sample_texts()


@pytest.mark.parametrize("attention", ["padded", "jagged"])
def test_packed_vectors_equal_the_padded_paths(padded, texts, attention):
    packed = TextEncoder(packing="on")
    packed.attention = attention  # each CPU kernel, whichever is the default
    rows = padded.token_ids(texts)
    lengths = sorted({len(r) for r in rows})
    assert lengths[0] <= 4 and lengths[-1] == padded.max_length  # very different lengths, some cut
    expected, got = padded.encode_ids(rows), packed.encode_ids(rows)
    cosine = (expected * got).sum(axis=1)
    assert cosine.min() >= 0.9999, cosine.min()
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_one_packed_call_of_rows_in_any_order_equals_each_row_alone(padded, texts):
    # a call that mixes a long and a short text: no token of one may reach the other
    rows = padded.token_ids([texts[0], texts[3], texts[1]])
    batch = pack_rows(rows, padded.device)
    with torch.inference_mode():
        together = packed_mean_pool(packed_forward(padded.model, batch, "padded"), batch).numpy()
    alone = np.concatenate([padded.encode_ids([r]) for r in rows])
    np.testing.assert_allclose(together, alone, atol=2e-5)


def test_packing_uses_the_models_own_weights(padded):
    packed = TextEncoder(packing="on")
    before = packed.encode(["cordless drill"])
    with torch.no_grad():
        packed.model.encoder.layer[0].intermediate.dense.weight.mul_(0.5)
    assert (packed.encode(["cordless drill"]) * before).sum() < 0.9999  # the changed weight is the one used


def test_token_batches_respect_the_budget_and_keep_every_row_once():
    lengths = [3, 128, 7, 64, 64, 1, 30] * 20
    batches = token_batches(lengths, token_budget=512, max_batch=16)
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(len(lengths)))
    for idx in batches:
        assert len(idx) <= 16 and (len(idx) == 1 or max(lengths[i] for i in idx) * len(idx) <= 512)


def test_packing_on_fails_clearly_where_it_cannot_run():
    with pytest.raises(ConfigError, match="packing must be one of auto, on, off, not 'yes'"):
        TextEncoder(packing="yes")
    with pytest.raises(ConfigError, match="packing on needs a BERT-family text model at a float precision: int8"):
        TextEncoder(precision="int8", packing="on")
    assert not TextEncoder(precision="int8", packing="auto").packed


def test_another_architecture_is_not_packed_and_packing_on_says_why(tmp_path):
    from transformers import DistilBertConfig, DistilBertModel

    tokenizer = load_tokenizer(resolve_model_path("default"))
    DistilBertModel(DistilBertConfig(n_layers=1, dim=32, hidden_dim=64, n_heads=2,
                                     vocab_size=tokenizer.vocab_size)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="packing on needs a BERT-family text model.*'distilbert'"):
        TextEncoder(str(tmp_path), packing="on")
    fallback = TextEncoder(str(tmp_path), packing="auto")
    assert not fallback.packed
    assert fallback.encode(["cordless drill", "saw"]).shape == (2, 32)

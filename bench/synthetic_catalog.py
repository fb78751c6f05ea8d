"""Synthetic catalogs and user queries grown from a small set of real item embeddings.

The demo work folder holds about a thousand encoded items; an index benchmark needs a million.
Random Gaussian vectors would be the wrong stand-in: in 384 dimensions they are all nearly
orthogonal, so every neighbour is about as far as every other and an ANN index looks either
perfect or hopeless. Grown vectors keep the real embeddings' clusters: each is a mix of two real
items (mostly the first) with a little noise, so it has a clear neighbourhood but no duplicates.

    from synthetic_catalog import grown_vectors, query_vectors
"""

from __future__ import annotations

import numpy as np

# Per-dimension noise (a norm of about 0.3 in 384 dimensions): enough that a grown vector's nearest
# real item sits at a cosine of about 0.8-0.95 (bench/ann_choice.py prints the spread) instead of
# near 1, and that two grown vectors mixed from the same pair are not near-duplicates.
NOISE = 0.015

# Rows made at a time: the noise and mixing temporaries stay small next to the output.
_CHUNK = 65536


def _unit(rows: np.ndarray) -> np.ndarray:
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def grown_vectors(vectors: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """n unit float32 vectors, each a*u + (1-a)*v + noise normalised, for random rows u, v of
    `vectors` and a uniform in [0.5, 1]."""
    return grown_with_parents(vectors, n, seed)[0]


def grown_with_parents(vectors: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """grown_vectors, and for each grown vector the row of `vectors` it is mostly made of (its u):
    a synthetic catalog can take that item's metadata and its place in real users' sequences."""
    base = _unit(np.array(vectors, dtype=np.float32))
    rng = np.random.default_rng(seed)
    out = np.empty((n, base.shape[1]), dtype=np.float32)
    parents = np.empty(n, dtype=np.int64)
    for start in range(0, n, _CHUNK):
        m = min(_CHUNK, n - start)
        a = rng.uniform(0.5, 1.0, size=(m, 1)).astype(np.float32)
        parents[start:start + m] = rng.integers(len(base), size=m)
        mix = a * base[parents[start:start + m]]
        mix += (1.0 - a) * base[rng.integers(len(base), size=m)]
        mix += rng.normal(0.0, NOISE, size=mix.shape).astype(np.float32)
        out[start:start + m] = _unit(mix)
    return out, parents


def query_vectors(vectors: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """n unit float32 user-like queries: the normalised mean of 1-5 random rows of `vectors` (the
    items a user engaged with) plus noise."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, vectors.shape[1]), dtype=np.float32)
    for i in range(n):
        rows = vectors[rng.integers(len(vectors), size=int(rng.integers(1, 6)))]
        out[i] = rows.mean(axis=0) + rng.normal(0.0, NOISE, size=vectors.shape[1])
    return _unit(out)

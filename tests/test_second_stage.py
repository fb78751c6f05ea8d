"""The second stage (model/second_stage.py, training/second_stage.py): its features, its fit, its file."""

import dataclasses

import numpy as np
import pytest
from profilerec.config import SecondStageConfig, TrainConfig
from profilerec.data.schema import Event
from profilerec.errors import ConfigError, DataError
from profilerec.model import second_stage as second_stage_module
from profilerec.model.index import ItemIndex
from profilerec.model.priors import item_priors
from profilerec.model.second_stage import FEATURES, load_second_stage, rerank_features, save_second_stage
from profilerec.training.scorer import run_train
from profilerec.training.second_stage import (
    ListedCases,
    cross_fitted_ranks,
    fit_second_stage,
    fitted_second_stage,
    reranked_ranks,
)

N, DIM = 40, 8


def _log(seed: int = 0) -> tuple[ItemIndex, dict[str, list[Event]]]:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(N, DIM))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    brands = [None if i % 5 == 0 else ("Acme" if i % 2 else "acme ") if i % 3 == 0 else f"B{i % 4}"
              for i in range(N)]
    index = ItemIndex([f"i{i}" for i in range(N)], vectors, brands, [[] for _ in range(N)],
                      [f"t{i}" for i in range(N)])
    sequences = {f"u{u}": [Event(event_id=f"u{u}:{n}", user_id=f"u{u}", item_id=f"i{i}", type="view",
                                 ts=3600.0 * n) for n, i in enumerate(rng.integers(0, N, 12))] for u in range(60)}
    return index, sequences


def test_pair_counts_are_the_counted_transitions():
    index, sequences = _log()
    priors = item_priors(sequences, index, span=2)
    counted = {}
    for events in sequences.values():
        rows = [index.row(e.item_id) for e in events]
        for d in (1, 2):
            for a, b in zip(rows, rows[d:]):
                counted[a, b] = counted.get((a, b), 0.0) + 1.0 / d
    a, b = np.meshgrid(np.arange(-1, N), np.arange(-1, N), indexing="ij")
    got = priors.pair_counts(a, b)
    expected = np.array([[counted.get((i, j), 0.0) if i >= 0 and j >= 0 else 0.0 for j in range(-1, N)]
                         for i in range(-1, N)])
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got.shape == a.shape and (got > 0).sum() > N


def test_each_feature_is_what_the_window_and_the_log_say():
    index, sequences = _log()
    priors = item_priors(sequences, index)
    rng = np.random.default_rng(3)
    window = np.full((3, 6), -1)
    window[0] = rng.integers(0, N, 6)
    window[1, 3:] = [7, 9, 7]  # a short window that repeats an item
    window[2, :] = -1  # no item (a profile of texts alone)
    rows = np.stack([rng.permutation(N)[:10] for _ in range(3)])
    rows[1, 4] = 7
    scores = -np.sort(-rng.normal(size=(3, 10)), axis=1).astype(np.float32)
    brands = index.details.brand_codes()
    got = rerank_features(rows, scores, window, index.vectors, priors, brands)
    raw_brand = [index.meta(f"i{r}")["brand"] for r in range(N)]

    def brand(r):
        value = (raw_brand[r] or "").lower()
        return value or None

    def count(a, b):
        return sum(1.0 for events in sequences.values() for x, y in zip(events, events[1:])
                   if (x.item_id, y.item_id) == (f"i{a}", f"i{b}"))

    for b in range(3):
        win = [w for w in window[b] if w >= 0]
        for r, item in enumerate(rows[b]):
            sims = [float(index.vectors[item] @ index.vectors[w]) for w in win]
            newest = win[-1] if win else None
            expected = [
                scores[b, r], scores[b, 0] - scores[b, r], np.log1p(r),
                sims[-1] if win else 0.0, max(sims) if win else 0.0, np.mean(sims) if win else 0.0,
                np.log1p(priors.popularity[item]), win.count(item), float(item == newest),
                np.log1p(count(newest, item)) if win else 0.0, np.log1p(sum(count(w, item) for w in win)),
                np.log1p(count(item, newest)) if win else 0.0, np.log1p(sum(count(item, w) for w in win)),
                float(win != [] and brand(item) is not None and brand(item) == brand(newest)),
                sum(brand(item) is not None and brand(item) == brand(w) for w in win), np.log1p(len(win)),
            ]
            np.testing.assert_allclose(got[b, r], expected, rtol=1e-5, atol=1e-6, err_msg=f"profile {b} item {r}")
    assert got[1, 4, FEATURES.index("times in the window")] == 2


def _listed_cases(n: int = 600, depth: int = 30, seed: int = 0) -> ListedCases:
    """Lists whose target is the item with the highest popularity feature, which the score ignores."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, depth, len(FEATURES))).astype(np.float32)
    features[..., 0] = -np.sort(-rng.normal(size=(n, depth)), axis=1)
    labels = features[..., FEATURES.index("log1p popularity")].argmax(1)
    ranks = (features[..., 0] > features[np.arange(n), labels, 0][:, None]).sum(1)
    labels[:50] = -1  # targets off the list: left where the scorer put them
    ranks[:50] = depth + 7
    return ListedCases(features, labels, ranks)


def test_the_fit_learns_what_the_first_stage_score_misses():
    data = _listed_cases()
    cfg = SecondStageConfig(epochs=20)
    stage = fit_second_stage(data, cfg, seed=0)
    fitted, crossed = reranked_ranks(stage, data), cross_fitted_ranks(data, cfg, seed=0)
    on = data.labels >= 0
    assert (data.ranks[on] == 0).mean() < 0.2
    assert (fitted[on] == 0).mean() > 0.8 and (crossed[on] == 0).mean() > 0.6
    assert (fitted[~on] == data.ranks[~on]).all() and (crossed[~on] == data.ranks[~on]).all()
    again = fit_second_stage(data, cfg, seed=0)  # a seed makes it the same network
    np.testing.assert_array_equal(again.w1, stage.w1)


def test_a_second_stage_is_kept_only_with_enough_cases_and_a_cross_fitted_gain():
    cfg = SecondStageConfig(epochs=10)
    useful = _listed_cases()
    stage, report = fitted_second_stage(useful, cfg, seed=0)
    assert stage is not None and "skipped" not in report and report["fit_cases"] == 550 == (useful.labels >= 0).sum()
    assert report["cross_fitted"]["NDCG@10"] > report["first_stage"]["NDCG@10"]
    # targets the features say nothing about, placed where the score puts them: nothing to gain
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, len(useful.labels))
    useless = ListedCases(useful.features, labels, labels.copy())
    stage, report = fitted_second_stage(useless, cfg, seed=0)
    assert stage is None and "is not above the scorer's" in report["skipped"]
    assert fitted_second_stage(useless, dataclasses.replace(cfg, only_if_better=False), seed=0)[0] is not None
    stage, report = fitted_second_stage(useful.take(np.arange(120)), cfg, seed=0)
    assert stage is None and report["skipped"] == "70 cases have their target among the first 30 (min_cases 100)"


def test_the_file_holds_the_network_and_is_refused_for_other_features(tmp_path, monkeypatch):
    stage = fit_second_stage(_listed_cases(n=200), SecondStageConfig(epochs=2), seed=0)
    save_second_stage(stage, str(tmp_path))
    loaded = load_second_stage(str(tmp_path))
    features = _listed_cases(n=5).features
    np.testing.assert_array_equal(loaded.scores(features), stage.scores(features))
    assert load_second_stage(str(tmp_path / "nothing")) is None
    monkeypatch.setattr(second_stage_module, "FEATURES", FEATURES[:-1])
    with pytest.raises(DataError, match="other features"):
        load_second_stage(str(tmp_path))


def test_a_refit_and_a_second_stage_are_refused_together(tmp_path):
    with pytest.raises(ConfigError, match="setting refit"):
        run_train(TrainConfig(input=str(tmp_path), embeddings=str(tmp_path), output=str(tmp_path), refit=True))

"""Ranking metrics against hand-computed values."""

import math

import numpy as np
import pytest
from profilerec.model.ranking import ranking_metrics, target_ranks


def test_ranks_count_strictly_better_items_and_ties_favour_the_target():
    scores = np.array([[0.9, 0.5, 0.5, 0.1],
                       [0.1, 0.2, 0.3, 0.4],
                       [1.0, np.nan, 0.0, 0.0]])
    ranks = target_ranks(scores, np.array([2, 0, 1]))
    assert ranks.tolist() == [1, 3, 4]  # tie with item 1 does not count; NaN target ranks last


def test_hr_ndcg_mrr_by_hand():
    ranks = np.array([0, 2, 4, 9, 20])
    m = ranking_metrics(ranks, ks=(3, 5, 10))
    assert m["HR@3"] == pytest.approx(2 / 5)
    assert m["NDCG@3"] == pytest.approx((1 + 1 / math.log2(4)) / 5)
    assert m["HR@5"] == pytest.approx(3 / 5)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(6)) / 5)
    assert m["HR@10"] == pytest.approx(4 / 5)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(6) + 1 / math.log2(11)) / 5)
    assert m["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 5 + 1 / 10 + 1 / 21) / 5)


def test_no_cases_is_an_error():
    with pytest.raises(ValueError):
        ranking_metrics(np.array([]))

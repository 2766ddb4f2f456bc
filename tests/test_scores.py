"""Scores and statistics, pinned on hand-computed cases."""

import pytest

from sft_ray.evaluate import bootstrap_ci, exact_match, json_match, json_valid, mcnemar_exact, normalized_match, score


def test_matches():
    assert exact_match(" 2 ", "2") == 1.0 and exact_match("2.", "2") == 0.0
    assert normalized_match("The  Answer: 2.", "the answer 2") == 1.0
    assert json_match('{"a": 1, "b": "x"}', '{"b":"x","a":1}') == 1.0
    assert json_match('{"a": 1}', '{"a": 2}') == 0.0
    assert json_match("not json", '{"a": 1}') == 0.0
    assert json_valid("[1, 2]") == 1.0 and json_valid("{") == 0.0


def test_score_adds_json_metrics_only_for_json_references():
    assert set(score(["a"], ["a"])) == {"exact_match", "normalized_match"}
    s = score(['{"x": 1}', "nope"], ['{"x":1}', '{"x": 2}'])
    assert s["json_match"] == [1.0, 0.0] and s["json_valid"] == [1.0, 0.0] and s["exact_match"] == [0.0, 0.0]


def test_mcnemar_exact_known_values():
    # 10 improved, 0 regressed: two-sided p = 2 * 0.5**10
    r = mcnemar_exact([0.0] * 10 + [1.0] * 5, [1.0] * 10 + [1.0] * 5)
    assert (r["improved"], r["regressed"]) == (10, 0)
    assert r["p_value"] == pytest.approx(2 / 1024)
    # 3 vs 3: no evidence either way
    r = mcnemar_exact([1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1])
    assert r["p_value"] == pytest.approx(1.0)
    # 1 improved, 4 regressed: p = 2 * (C(5,0)+C(5,1)) / 32 = 0.375
    r = mcnemar_exact([1, 1, 1, 1, 0], [0, 0, 0, 0, 1])
    assert r["p_value"] == pytest.approx(0.375)
    assert mcnemar_exact([1, 0], [1, 0])["p_value"] == 1.0


def test_bootstrap_interval_brackets_the_mean():
    values = [1.0] * 30 + [0.0] * 70
    lo, hi = bootstrap_ci(values)
    assert lo < 0.3 < hi and 0.18 < lo and hi < 0.42
    assert bootstrap_ci([1.0] * 20) == (1.0, 1.0)
    assert bootstrap_ci([]) == (0.0, 0.0)

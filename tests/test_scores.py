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
    # the bounds sit at numpy's 2.5th and 97.5th percentiles of the same resampled means (rank for rank)
    import random

    import numpy as np

    rng, k = random.Random(0), len(values)
    means = [sum(values[rng.randrange(k)] for _ in range(k)) / k for _ in range(2000)]
    want = np.percentile(means, [2.5, 97.5], method="nearest")
    assert (lo, hi) == (float(want[0]), float(want[1]))


def test_token_f1_and_rouge_l_by_hand():
    from sft_ray.evaluate import rouge_l, token_f1

    # pred tokens: the cat sat ; ref: the cat sat down -> common 3, P=1, R=3/4, F1=6/7
    assert token_f1("The cat sat.", "the cat sat down") == pytest.approx(6 / 7)
    assert token_f1("dog", "cat") == 0.0 and token_f1("", "") == 1.0
    # LCS("a b c d", "a c b d") = 3 (a b d or a c d): P=R=3/4 -> F=0.75
    assert rouge_l("a b c d", "a c b d") == pytest.approx(0.75)
    assert rouge_l("x y", "x y") == 1.0 and rouge_l("x", "y") == 0.0


def test_permutation_test_known_answers():
    from sft_ray.evaluate import permutation_test

    # 10 pairs, all improved by the same amount: exact two-sided p = 2 / 2**10
    r = permutation_test([0.2] * 10, [0.7] * 10)
    assert r["mean_diff"] == pytest.approx(0.5)
    assert r["p_value"] == pytest.approx(2 / 1024, abs=0.002)
    assert permutation_test([0.3, 0.5], [0.3, 0.5])["p_value"] == 1.0
    # symmetric noise: no evidence
    assert permutation_test([0.1, 0.9, 0.4, 0.6], [0.9, 0.1, 0.6, 0.4])["p_value"] > 0.5


def test_user_scorer_by_import_path():
    from sft_ray.evaluate import load_scorer, score

    name, fn = load_scorer("os.path:commonprefix")
    assert name == "commonprefix" and callable(fn)
    s = score(["abc"], ["abd"], ["tests.test_scores:first_char_match"])
    assert s["first_char_match"] == [1.0]
    with pytest.raises(ValueError, match="package.module:function"):
        load_scorer("no_colon")


def first_char_match(pred: str, ref: str) -> float:
    return float(pred[:1] == ref[:1])


def test_free_text_gets_f1_and_rouge():
    s = score(["the cat sat on the mat"], ["a cat sat on a mat today"])
    assert {"token_f1", "rouge_l"} <= set(s) and "json_match" not in s


def test_eval_pairs_follow_the_eval_fraction_split(tmp_path):
    import json

    from sft_ray.data import in_eval_split
    from sft_ray.evaluate import eval_pairs

    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(300)))
    pairs = eval_pairs([str(f)], "auto", {}, 1000, fraction_split=(5, 0.1))
    rows = [int(p[-1]["content"][1:]) + 1 for p, _, _ in pairs]  # q{i} sits on line i+1
    assert 10 < len(pairs) < 60
    assert all(in_eval_split(str(f), r, 5, 0.1) for r in rows)
    assert [ref for _, ref, _ in pairs] == [f"a{r - 1}" for r in rows]
    assert len(eval_pairs([str(f)], "auto", {}, 1000)) == 300


def test_json_scores_follow_json_types_and_survive_degenerate_answers():
    from sft_ray.evaluate import json_match, json_valid, score

    assert json_match('{"ok": true}', '{"ok":true}') == 1.0 and json_match("1.0", "1") == 1.0
    assert json_match("1", "true") == json_match("0", "false") == json_match('{"ok": 1}', '{"ok": true}') == 0.0
    assert json_valid("NaN") == json_valid("Infinity") == 0.0  # Python's parser takes them; JSON has no such values
    deep = "[" * 5000  # a looping model: a RecursionError in the parser, scored 0 instead of ending the eval
    assert json_match(deep, "[1]") == json_valid(deep) == 0.0
    assert score([deep], ["[1]"])["json_valid"] == [0.0]


def nan_scorer(pred, ref):
    return float("nan")


def raising_scorer(pred, ref):
    raise ZeroDivisionError("empty reference")


def test_a_scorer_that_returns_nan_or_raises_is_named_not_reported_as_significant():
    from sft_ray.evaluate import EvalError, score

    with pytest.raises(EvalError, match=r"tests.test_scores:nan_scorer' returned nan on held-out row 1"):
        score(["a", "b"], ["a", "b"], ["tests.test_scores:nan_scorer"])
    with pytest.raises(EvalError, match=r"raising_scorer' failed on held-out row 1: ZeroDivisionError: empty"):
        score(["a"], ["a"], ["tests.test_scores:raising_scorer"])


def test_rows_without_a_text_answer_or_a_question_are_not_scored_and_tools_reach_the_prompt():
    import json

    from sft_ray.evaluate import _pairs

    call = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]}
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    records = [
        {"messages": [{"role": "user", "content": "Weather in Paris?"}, call]},  # the answer is a tool call
        {"messages": [{"role": "assistant", "content": "Hello! How can I help?"}]},  # nothing asked
        {"messages": [{"role": "system", "content": "Be kind."}, {"role": "assistant", "content": "Hi"}]},
        {"tools": tools, "messages": [{"role": "user", "content": "Weather?"}, call,
                                      {"role": "tool", "content": "sunny", "tool_call_id": None},
                                      {"role": "assistant", "content": "It is sunny."}]},
    ]
    out = _pairs({"source": ["f.jsonl"] * 4, "row": [1, 2, 3, 4], "record": [json.dumps(r) for r in records],
                  "error": [""] * 4}, "auto", {})
    assert out["key"] == ["f.jsonl:4"] and out["reference"] == ["It is sunny."]
    assert json.loads(out["tools"][0]) == tools


def test_report_pages_keep_model_text_inert_and_metrics_json_strict(tmp_path):
    import json

    from sft_ray import report

    evil = "ok</td></table><script>alert(1)</script>\n# not a heading\nuse ```x``` here"
    res = {"n_eval": 0, "scores": {}, "not_scored": "no held-out row could be scored",
           "eval_data": ["s3://b/eval.jsonl"], "probes": [{"question": "q?", "before": evil, "after": "fine"}],
           "examples": [{"prompt": "p", "reference": "r", "before": evil, "after": float("nan")}]}
    summary = {"config": {"model": {"name": "s3://bucket/m?X-Amz-Signature=abc123"},
                          "data": {"train": ["https://user:tok@h/x.jsonl"]}},
               "metrics": {"loss": float("nan")}}
    res["examples"][0]["after"] = "x"
    report.write(tmp_path, res, summary)
    md = (tmp_path / "report.md").read_text()
    fenced = md.split("````\n")  # the fence is longer than the answer's own ``` run
    assert any(part.startswith(evil) for part in fenced), md
    assert "\n# not a heading" not in md.replace(evil, "")
    assert "Not scored: no held-out row could be scored." in md and "| exact_match" not in md
    text = (tmp_path / "metrics.json").read_text()
    assert json.loads(text)["run"]["metrics"]["loss"] is None and "NaN" not in text
    for page in ("report.md", "report.html"):
        page_text = (tmp_path / page).read_text()
        assert "abc123" not in page_text and "user:tok" not in page_text, page

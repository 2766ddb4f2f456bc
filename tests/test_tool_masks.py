"""Tool calls and reasoning on real chat templates: the model trains on exactly the text the template gives
for the whole conversation (with ``tools``), and only on the assistant's part of it.

The templates are the real ones that ship inside the installed ``trl`` package (``trl/chat_templates``:
Qwen3's, Qwen2.5's Hermes-style tool template, Llama 3.1's JSON tool format), SmolLM2's own (the embedded
model's tokenizer) and sft-ray's ChatML. Each is applied to SmolLM2's tokenizer with the template's special
tokens added, so no weights or downloads are needed.
"""

import copy
import json
from pathlib import Path

import pytest

from sft_ray.formats import RowError, to_example
from sft_ray.modeling import CHATML_TEMPLATE
from sft_ray.template import IGNORE_INDEX, render, tokenize_example, tokenize_examples, trained_text

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = {"type": "function", "id": "c1", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
ROW = {"tools": TOOLS, "messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "reasoning_content": "Need the tool.", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "c1", "content": "18C, sunny"},
    {"role": "assistant", "content": "18C and sunny.", "reasoning_content": "Tool said 18C."},
    {"role": "user", "content": "Thanks! And 2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "Simple sum."},
]}
# never trained, whatever the template: the system prompt, the schemas, the user turns, the tool result
NOT_TRAINED = ["You are terse", "Weather in a city", "Weather in Paris", "18C, sunny", "Thanks!"]

HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
EXPECTED = {
    # Qwen3 keeps the reasoning of turns after the last user message (and writes an empty think block for a
    # final turn without any); the first two turns come before the last user message, so theirs is dropped
    "qwen3": [HERMES_CALL + "<|im_end|>", "18C and sunny.<|im_end|>",
              "<think>\nSimple sum.\n</think>\n\n4<|im_end|>"],
    "qwen2_5": [HERMES_CALL + "<|im_end|>", "18C and sunny.<|im_end|>", "4<|im_end|>"],
    "llama3_1": ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', "18C and sunny.<|eot_id|>",
                 "4<|eot_id|>"],
    "chatml": ["<think>\nNeed the tool.\n</think>\n\n" + HERMES_CALL + "<|im_end|>",
               "<think>\nTool said 18C.\n</think>\n\n18C and sunny.<|im_end|>",
               "<think>\nSimple sum.\n</think>\n\n4<|im_end|>"],
}
REASONING = {"qwen3": True, "qwen2_5": False, "llama3_1": False, "chatml": True}  # does the template render it


def _trl_template(name: str) -> str:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text()


@pytest.fixture(scope="module")
def toks(smol_tok):
    def make(template, specials):
        tok = copy.deepcopy(smol_tok)
        if specials:
            tok.add_special_tokens({"additional_special_tokens": specials})
        tok.chat_template = template
        return tok

    return {
        "qwen3": make(_trl_template("qwen3"), ["<think>", "</think>", "<tool_call>", "</tool_call>"]),
        "qwen2_5": make(_trl_template("qwen2_5"), ["<tool_call>", "</tool_call>"]),
        "llama3_1": make(_trl_template("llama3_1"), ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>",
                                                     "<|eom_id|>"]),
        "chatml": make(CHATML_TEMPLATE, []),
        "smollm2": smol_tok,
    }


def _row(reasoning: bool):
    row = copy.deepcopy(ROW)
    if not reasoning:
        for m in row["messages"]:
            m.pop("reasoning_content", None)
    return row


@pytest.mark.parametrize("name", list(EXPECTED))
def test_tool_conversation_trains_exactly_the_assistant_part(toks, name):
    tok = toks[name]
    ex = to_example(_row(REASONING[name]))
    out = tokenize_example(ex, tok, 4096)
    # (a) the trained-on text is apply_chat_template of the whole conversation, tools included
    whole = tok.apply_chat_template(ex.messages, tools=TOOLS, tokenize=False)
    assert "get_weather" in whole.split("Weather in Paris")[0]  # the schemas reached the template
    assert out["input_ids"] == tok(whole, add_special_tokens=False)["input_ids"]
    assert tok.decode(out["input_ids"]) == whole
    # (b) the trained tokens are the assistant turns as the template writes them (calls, kept reasoning,
    # end-of-turn token), and nothing else
    runs = trained_text(tok, out["input_ids"], out["labels"])
    assert runs == EXPECTED[name]
    assert not any(bad in run for run in runs for bad in NOT_TRAINED)
    assert out["n_trained"] == sum(1 for x in out["labels"] if x != IGNORE_INDEX)


@pytest.mark.parametrize("name", ["qwen3", "chatml"])
def test_reasoning_can_be_shown_but_not_trained(toks, name):
    tok = toks[name]
    out = tokenize_example(to_example(_row(True)), tok, 4096, train_reasoning=False)
    runs = trained_text(tok, out["input_ids"], out["labels"])
    assert "".join(runs) == "".join(r.split("</think>\n\n")[-1] for r in EXPECTED[name])
    assert "<think>" in tok.decode(out["input_ids"])  # still in the text the model reads


def test_inline_think_blocks_follow_the_template(toks):
    """Reasoning written inside the content: SmolLM2's template keeps it verbatim (so it is trained);
    Qwen3's splits it out and drops it from turns before the last user message."""
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>r1</think>b"},
                        {"role": "user", "content": "c"}, {"role": "assistant", "content": "<think>\nr2\n</think>\n\nd"}]}
    out = tokenize_example(to_example(row), toks["smollm2"], 512)
    assert trained_text(toks["smollm2"], out["input_ids"], out["labels"]) == [
        "<think>r1</think>b<|im_end|>", "<think>\nr2\n</think>\n\nd<|im_end|>"]
    out = tokenize_example(to_example(row), toks["qwen3"], 512)
    assert trained_text(toks["qwen3"], out["input_ids"], out["labels"]) == ["b<|im_end|>", "<think>\nr2\n</think>\n\nd<|im_end|>"]
    out = tokenize_example(to_example(row), toks["qwen3"], 512, train_reasoning=False)
    assert trained_text(toks["qwen3"], out["input_ids"], out["labels"]) == ["b<|im_end|>", "d<|im_end|>"]


def test_a_template_that_drops_what_the_data_holds_makes_the_row_bad(toks):
    # SmolLM2's own template writes only role and content: the call would silently vanish from training
    with pytest.raises(RowError, match="does not render tool calls .*'get_weather'.*model.chat_template"):
        tokenize_example(to_example(_row(False)), toks["smollm2"], 4096)
    # Qwen2.5's has no place for reasoning_content
    with pytest.raises(RowError, match="leaves out the reasoning_content .*data.train_reasoning=false"):
        tokenize_example(to_example(_row(True)), toks["qwen2_5"], 4096)
    # ... which the user may accept
    out = tokenize_example(to_example(_row(True)), toks["qwen2_5"], 4096, train_reasoning=False)
    assert trained_text(toks["qwen2_5"], out["input_ids"], out["labels"]) == EXPECTED["qwen2_5"]
    # a tools column the template ignores
    plain = {"tools": TOOLS, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    with pytest.raises(RowError, match="ignores the row's tools"):
        tokenize_example(to_example(plain), toks["smollm2"], 512)
    # Llama 3.1's template refuses two calls in one turn: a bad row with its words, not a crash
    two = _row(False)
    two["messages"][2]["tool_calls"] = [CALL, {**CALL, "id": "c2"}]
    two["messages"].insert(4, {"role": "tool", "tool_call_id": "c2", "content": "19C"})
    with pytest.raises(RowError, match="refused this conversation: .*single tool-calls"):
        tokenize_example(to_example(two), toks["llama3_1"], 4096)


def test_tool_call_shapes_are_normalised(toks):
    """Arguments as a JSON string or an object, a bare {name, arguments} call, ShareGPT's function_call turn
    and a tools column stored as a JSON string all give the same training text."""
    want = tokenize_example(to_example(_row(False)), toks["qwen2_5"], 4096)["input_ids"]
    as_object = _row(False)
    as_object["messages"][2]["tool_calls"] = [{"type": "function", "id": "c1", "function": {
        "name": "get_weather", "arguments": {"city": "Paris"}}}]
    as_object["tools"] = json.dumps(TOOLS)
    assert tokenize_example(to_example(as_object), toks["qwen2_5"], 4096)["input_ids"] == want
    sharegpt = {"tools": json.dumps(TOOLS), "conversations": [
        {"from": "system", "value": "You are terse."}, {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "18C, sunny"}, {"from": "gpt", "value": "18C and sunny."},
        {"from": "human", "value": "Thanks! And 2+2?"}, {"from": "gpt", "value": "4"}]}
    assert tokenize_example(to_example(sharegpt), toks["qwen2_5"], 4096)["input_ids"] == want


@pytest.mark.parametrize("change, reason", [
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments='{"city": Paris}'),
     r"messages\[2\].tool_calls\[0\].function.arguments is not valid JSON"),
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments="[1, 2]"),
     r"arguments must be a JSON object, got list"),
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].pop("name"), r"tool_calls\[0\] has no function name"),
    (lambda r: r["messages"][2].update(tool_calls=None, content="Let me check."),
     r"messages\[3\] is a tool result with no tool call before it"),
    (lambda r: r["messages"][3].update(tool_call_id="c9"), r"answers tool_call_id 'c9', which no call before it has"),
    (lambda r: r["messages"].insert(4, {"role": "tool", "content": "again"}), r"tool result 2 for 1 tool call"),
    (lambda r: (r["messages"][2].update(tool_calls=[CALL, {**CALL, "id": "c2"}]),
                r["messages"].insert(4, {"role": "tool", "tool_call_id": "c1", "content": "19C"})),
     r"messages\[4\] answers tool_call_id 'c1' a second time"),
    (lambda r: r.update(tools="[{not json"), r"tools is not valid JSON"),
    (lambda r: r.update(tools=[{"description": "no name"}]), r"tools\[0\] is not a function schema with a name"),
    (lambda r: r["messages"][4].update(reasoning_content=7), r"reasoning_content must be a string"),
])
def test_malformed_tool_use_is_a_bad_row(change, reason):
    row = _row(False)
    change(row)
    with pytest.raises(RowError, match=reason):
        to_example(row)


@pytest.mark.parametrize("name", ["qwen3", "qwen2_5", "llama3_1", "chatml", "smollm2"])
def test_direct_rendering_equals_apply_chat_template(toks, name):
    """The pipeline renders through the compiled template, skipping apply_chat_template's wrapper: the text
    must be the same for every prefix of a conversation with tools, tool results and reasoning."""
    from jinja2 import TemplateError

    from sft_ray.template import _render_direct

    tok = toks[name]
    msgs = to_example(_row(reasoning=True)).messages
    kw_sets = [{}, {"tools": TOOLS}] + ([{"enable_thinking": False}] if name == "qwen3" else [])
    for kw in kw_sets:
        for n in range(1, len(msgs) + 1):
            for gen in (False, True):
                try:
                    want = tok.apply_chat_template(msgs[:n], tokenize=False, add_generation_prompt=gen, **kw)
                except TemplateError:  # a prefix the template refuses (Llama 3.1: tools with no user turn yet)
                    with pytest.raises(TemplateError):
                        _render_direct(tok, msgs[:n], gen, dict(kw))
                    continue
                assert _render_direct(tok, msgs[:n], gen, dict(kw)) == want


def test_direct_rendering_falls_back_when_it_would_differ(smol_tok):
    """A tokenizer whose apply_chat_template renders otherwise (a subclass adding to it, as processors do) is
    caught by the first comparison: render gives apply_chat_template's text, for that template from then on."""
    from sft_ray import template

    odd = copy.deepcopy(smol_tok)
    odd.__class__ = type("Odd", (type(smol_tok),), {
        "apply_chat_template": lambda self, *a, **k: "PREFIX " + type(smol_tok).apply_chat_template(self, *a, **k)})
    odd.chat_template = smol_tok.chat_template + "{# a template of its own #}"
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert render(odd, msgs).startswith("PREFIX ")
    assert odd.chat_template in template._DIRECT["off"]
    assert template._render_direct(odd, msgs, False, {}) is None
    assert render(odd, msgs[:1], add_generation_prompt=True).startswith("PREFIX ")


@pytest.mark.parametrize("name", ["qwen3", "qwen2_5", "llama3_1", "chatml", "smollm2"])
def test_the_final_turn_read_off_the_whole_text_equals_rendering_turn_by_turn(toks, name, monkeypatch):
    """A final assistant turn's start is read off the whole text (one render per single-turn row instead of two);
    the labels must be exactly those of rendering turn by turn, on every template and conversation shape."""
    from sft_ray import template

    tok = toks[name]
    rows = [{"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! 😀"}]},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                          {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
                          {"role": "assistant", "content": "It is 6.\n"}]},
            _row(reasoning=False), _row(reasoning=True)]
    kws = [{}] + ([{"enable_thinking": False}] if name == "qwen3" else [])
    examples = [to_example(r) for r in rows]

    def labels(fast: bool):
        if not fast:
            monkeypatch.setattr(template, "_read_final_turn_start", lambda *a, **k: (None, None))
        out = [tokenize_examples(examples, tok, 1024, template_kwargs=kw) for kw in kws]
        monkeypatch.undo()
        return [[r if isinstance(r, Exception) else (r["input_ids"], r["labels"]) for r in o] for o in out]

    calls = template._LAST["calls"]
    fast, slow = labels(True), labels(False)
    assert [[str(x) if isinstance(x, Exception) else x for x in o] for o in fast] == \
        [[str(x) if isinstance(x, Exception) else x for x in o] for o in slow]
    if name in ("chatml", "smollm2", "qwen2_5"):
        assert template._LAST["calls"] > calls  # the final turns were read off the text


def test_a_template_that_fools_the_final_turn_reading_is_caught(smol_tok):
    """A template whose assistant turns repeat the generation prompt ("A: A: ...") makes the final turn look as if
    it started later than it does; the first row's check renders turn by turn, finds the difference and turns
    the shortcut off for that template."""
    from sft_ray import template

    tok = copy.deepcopy(smol_tok)
    tok.add_special_tokens({"additional_special_tokens": ["<eot>"]})
    tok.chat_template = ("{% for m in messages %}{% if m.role == 'user' %}U: {{ m.content }}\n{% else %}"
                         "A: A: {{ m.content }}<eot>\n{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}")
    out = tokenize_examples([to_example({"messages": [{"role": "user", "content": "hi"},
                                                      {"role": "assistant", "content": "hello"}]})], tok, 64)[0]
    # the second "A: " and the answer (the token that holds the first one's space is " A")
    assert [t.strip() for t in trained_text(tok, out["input_ids"], out["labels"])] == ["A: hello<eot>"]
    assert any(k[0] == tok.chat_template for k in template._LAST["off"])


def _trained(tok, row, **kw):
    out = tokenize_example(to_example(row), tok, 4096, **kw)
    return trained_text(tok, out["input_ids"], out["labels"])


def test_a_dropped_call_or_schema_is_caught_when_the_text_mentions_the_tool(toks):
    """The default model's template writes neither calls nor schemas; an answer or a user turn that names the tool
    must not pass for the call or the schema (the name has to appear beyond the messages' own words)."""
    row = {"messages": [{"role": "user", "content": "Use get_weather for Paris"},
                        {"role": "assistant", "content": "Calling get_weather now.", "tool_calls": [CALL]},
                        {"role": "tool", "tool_call_id": "c1", "content": "18C"},
                        {"role": "assistant", "content": "18C."}]}
    with pytest.raises(RowError, match="does not render tool calls"):
        _trained(toks["smollm2"], row)
    mentioned = {"tools": TOOLS, "messages": [{"role": "user", "content": "Use get_weather for Paris"},
                                              {"role": "assistant", "content": "Paris is 18C (get_weather)."}]}
    with pytest.raises(RowError, match="ignores the row's tools"):
        _trained(toks["smollm2"], mentioned)
    # with a template that renders both, the same rows train the call and the answers
    assert _trained(toks["qwen2_5"], {**row, "tools": TOOLS})[0].endswith(HERMES_CALL + "<|im_end|>")
    assert _trained(toks["qwen2_5"], mentioned) == ["Paris is 18C (get_weather).<|im_end|>"]


@pytest.mark.parametrize("where", ["reasoning_content", "thinking", "inline"])
def test_final_reasoning_under_enable_thinking_false_is_trained_whole_or_not_at_all(toks, where):
    """Qwen3 with enable_thinking=false writes an empty think block as the generation prompt; a final turn that
    has reasoning is trained from its own <think>, and train_reasoning=false leaves all of the block out."""
    answer = {"role": "assistant", "content": "4", where: "two plus two"} if where != "inline" else \
        {"role": "assistant", "content": "<think>\ntwo plus two\n</think>\n\n4"}
    row = {"messages": [{"role": "user", "content": "2+2?"}, answer]}
    kw = {"template_kwargs": {"enable_thinking": False}}
    assert _trained(toks["qwen3"], row, **kw) == ["<think>\ntwo plus two\n</think>\n\n4<|im_end|>"]
    assert _trained(toks["qwen3"], row, train_reasoning=False, **kw) == ["4<|im_end|>"]


def test_reasoning_keys_and_think_tags_in_an_answer(toks):
    """``thinking``/``reasoning`` are reasoning_content under other names (checked the same way); with
    train_reasoning=false only the <think> blocks that open a turn are reasoning, not one an answer talks about."""
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "thinking": "R"}]}
    same = {"messages": [{"role": "user", "content": "q"},
                         {"role": "assistant", "content": "a", "reasoning_content": "R"}]}
    assert _trained(toks["chatml"], row) == _trained(toks["chatml"], same) == ["<think>\nR\n</think>\n\na<|im_end|>"]
    with pytest.raises(RowError, match="leaves out the reasoning_content"):
        _trained(toks["smollm2"], row)  # SmolLM2's template drops it: not silently untrained
    with pytest.raises(RowError, match=r"messages\[1\].thinking must be a string"):
        to_example({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "thinking": 7}]})
    with pytest.raises(RowError, match="different reasoning under reasoning_content and thinking"):
        to_example({"messages": [{"role": "user", "content": "q"},
                                 {"role": "assistant", "content": "a", "reasoning_content": "R", "thinking": "S"}]})
    talk = {"messages": [{"role": "user", "content": "How do I mark reasoning?"},
                         {"role": "assistant", "content": "Wrap it in <think>...</think> tags, then answer."}]}
    assert _trained(toks["chatml"], talk, train_reasoning=False) == \
        ["Wrap it in <think>...</think> tags, then answer.<|im_end|>"]
    both = {"messages": [{"role": "user", "content": "q"},
                         {"role": "assistant", "content": "<think>one</think><think>two</think>a1"}]}
    assert _trained(toks["chatml"], both, train_reasoning=False) == ["a1<|im_end|>"]


def test_a_row_that_breaks_the_template_or_the_tokenizer_is_a_bad_row_not_a_failed_batch(smol_tok):
    """A template error other than raise_exception (a TypeError on a value), and a lone UTF-16 surrogate (half an
    emoji), make that row bad; the rows beside it in the batch are tokenized."""
    tok = copy.deepcopy(smol_tok)
    tok.chat_template = "{% for m in messages %}{{ m.content }}{{ m.extra + 1 }}{% endfor %}"
    good = {"messages": [{"role": "user", "content": "q", "extra": 1}, {"role": "assistant", "content": "a", "extra": 2}]}
    bad = {"messages": [{"role": "user", "content": "q", "extra": "x"}, {"role": "assistant", "content": "a", "extra": 2}]}
    out = tokenize_examples([to_example(bad), to_example(good)], tok, 512, loss_on="all")
    assert isinstance(out[0], RowError) and "template failed on this conversation: TypeError" in str(out[0])
    assert not isinstance(out[1], Exception) and out[1]["n_tokens"] > 0
    cut = {"messages": [{"role": "user", "content": "emoji cut \ud83d"}, {"role": "assistant", "content": "ok"}]}
    out = tokenize_examples([to_example(cut), to_example({"text": "half \ud83d"}), to_example({"text": "fine"})],
                            smol_tok, 512)
    assert all(isinstance(o, RowError) and "lone UTF-16 surrogate '\\ud83d'" in str(o) for o in out[:2]), out[:2]
    assert not isinstance(out[2], Exception)


def test_a_row_ending_in_a_user_turn_is_not_held_to_its_last_reasoning(toks):
    """Qwen3 drops the reasoning of every assistant turn before the last user message, the final one included
    when a user turn ends the row: trained without it, not refused."""
    row = {"messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a", "reasoning_content": "R1"},
                        {"role": "user", "content": "and?"}]}
    assert _trained(toks["qwen3"], row) == ["a<|im_end|>"]

"""The loss mask, checked by decoding: trained tokens == each assistant turn + its end-of-turn token."""

import copy
import re

import pytest

from sft_ray.formats import RowError, to_example
from sft_ray.template import IGNORE_INDEX, TooLong, tokenize_example, trained_text

LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)
QWEN3 = (
    "{%- for message in messages %}{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\n' }}"
    "{%- if loop.last and message.reasoning_content %}{{- '<think>\n' + message.reasoning_content + '\n</think>\n\n' }}"
    "{%- endif %}{{- message.content + '<|im_end|>\n' }}{%- else %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)

CONV = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hi in Chinese."},
        {"role": "assistant", "content": "你好！😀"},
        {"role": "user", "content": "And 2+2?"},
        {"role": "assistant", "content": "It is 4."},
    ]
}


def _tok(base, template, eot, extra=()):
    tok = copy.deepcopy(base)
    tok.add_special_tokens({"additional_special_tokens": [eot, *extra]})
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def styles(smol_tok):
    return {
        "chatml": (smol_tok, "<|im_end|>"),
        "llama3": (_tok(smol_tok, LLAMA3, "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"]), "<|eot_id|>"),
        "mistral": (_tok(smol_tok, MISTRAL, "</s>"), "</s>"),
    }


@pytest.mark.parametrize("style", ["chatml", "llama3", "mistral"])
def test_every_assistant_turn_and_only_those(styles, style):
    tok, eot = styles[style]
    if style == "mistral":
        tok.eos_token = "</s>"
    out = tokenize_example(to_example(CONV), tok, max_length=512)
    assert trained_text(tok, out["input_ids"], out["labels"]) == ["你好！😀" + eot, "It is 4." + eot]
    assert out["n_trained"] == sum(1 for x in out["labels"] if x != IGNORE_INDEX)
    assert len(out["input_ids"]) == len(out["labels"]) == out["n_tokens"]


def test_last_assistant_only_and_all(smol_tok):
    last = tokenize_example(to_example(CONV), smol_tok, 512, loss_on="last_assistant")
    assert trained_text(smol_tok, last["input_ids"], last["labels"]) == ["It is 4.<|im_end|>"]
    everything = tokenize_example(to_example(CONV), smol_tok, 512, loss_on="all")
    assert everything["labels"] == everything["input_ids"]


def test_qwen3_thinking(smol_tok):
    tok = _tok(smol_tok, QWEN3, "<|im_end|>", ["<think>", "</think>"])
    row = {"messages": [{"role": "user", "content": "2+2?"},
                        {"role": "assistant", "content": "4", "reasoning_content": "two plus two"}]}
    out = tokenize_example(to_example(row), tok, 512)
    assert trained_text(tok, out["input_ids"], out["labels"]) == ["<think>\ntwo plus two\n</think>\n\n4<|im_end|>"]
    # enable_thinking=false: the generation prompt carries an empty think block the turn does not have
    plain = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    out = tokenize_example(to_example(plain), tok, 512, template_kwargs={"enable_thinking": False})
    assert trained_text(tok, out["input_ids"], out["labels"]) == ["4<|im_end|>"]
    # a template that drops earlier reasoning: each turn is trained as the whole text has it (no "r")
    multi = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "r"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    out = tokenize_example(to_example(multi), tok, 512)
    assert trained_text(tok, out["input_ids"], out["labels"]) == ["b<|im_end|>", "d<|im_end|>"]
    out = tokenize_example(to_example(multi), tok, 512, loss_on="last_assistant")
    assert trained_text(tok, out["input_ids"], out["labels"]) == ["d<|im_end|>"]


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"prompt": "What is 3*3?", "completion": "9"}, ["9<|im_end|>"]),
        ({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "earlier"},
                     {"role": "user", "content": "again"}],
          "completion": [{"role": "assistant", "content": "done"}]}, ["done<|im_end|>"]),
        ({"instruction": "Translate", "input": "chat", "output": "cat", "system": "sys"}, ["cat<|im_end|>"]),
        ({"instruction": "Name a colour", "input": "", "output": "blue"}, ["blue<|im_end|>"]),
        ({"conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
                            {"from": "user", "value": "q2"}, {"from": "assistant", "value": "a2"}]},
         ["a1<|im_end|>", "a2<|im_end|>"]),
    ],
)
def test_formats_train_on_the_completion(smol_tok, row, expected):
    out = tokenize_example(to_example(row), smol_tok, 512)
    assert trained_text(smol_tok, out["input_ids"], out["labels"]) == expected


def test_content_parts_are_joined_like_the_serve_endpoint_joins_them(smol_tok):
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "4."}]}]}
    plain = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]}
    a, b = tokenize_example(to_example(parts), smol_tok, 512), tokenize_example(to_example(plain), smol_tok, 512)
    assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
    assert trained_text(smol_tok, a["input_ids"], a["labels"]) == ["4.<|im_end|>"]


def test_alpaca_prompt_layout(smol_tok):
    ex = to_example({"instruction": "Translate", "input": "chat", "output": "cat"})
    assert ex.messages[0] == {"role": "user", "content": "Translate\n\nchat"}


def test_text_trains_every_token(smol_tok):
    out = tokenize_example(to_example({"text": "Domain text 東京."}), smol_tok, 512)
    assert out["labels"] == out["input_ids"] and out["input_ids"][-1] == smol_tok.eos_token_id


def test_too_long_truncate_or_drop(smol_tok):
    long = {"messages": [{"role": "user", "content": "x " * 10}, {"role": "assistant", "content": "y " * 200}]}
    prompt = smol_tok.apply_chat_template(long["messages"][:1], add_generation_prompt=True, tokenize=False)
    prompt_len = len(smol_tok(prompt, add_special_tokens=False)["input_ids"])
    limit = prompt_len + 8
    out = tokenize_example(to_example(long), smol_tok, limit, too_long="truncate")
    assert out["truncated"] and len(out["input_ids"]) == limit and out["n_trained"] == 8
    with pytest.raises(TooLong):
        tokenize_example(to_example(long), smol_tok, limit, too_long="drop")
    # truncation that leaves nothing to train is a drop, not a silent empty row
    with pytest.raises(TooLong, match="no trained tokens"):
        tokenize_example(to_example(long), smol_tok, prompt_len, too_long="truncate")


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "unknown role 'wizard'"),
        ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}, "content (user) is empty"),
        ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
         "must be a string or a list of content parts, got int"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "look"},
                                                    {"type": "image_url", "image_url": {"url": "x.png"}}]},
                       {"role": "assistant", "content": "x"}]}, "content (user)[1] is a 'image_url' content part"),
        ({"messages": [{"role": "user", "content": ["plain"]}, {"role": "assistant", "content": "x"}]},
         "content (user)[0] is a str content part"),
        ({"messages": [{"role": "user", "content": []}, {"role": "assistant", "content": "x"}]}, "content (user) is empty"),
        ({"messages": []}, "non-empty list"),
        ({"question": "q", "answer": "a"}, "matches no known format"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, "unknown speaker 'alien'"),
        ({"prompt": "p", "completion": ""}, "completion is empty"),
        ({"instruction": "i", "output": None}, "output must be a string"),
        ({"system": "s", "conversations": [{"from": "system", "value": "t"}, {"from": "human", "value": "q"},
                                           {"from": "gpt", "value": "a"}]}, "opens with a system turn too"),
        ({"instruction": "i", "output": "o", "history": [["only one"]]}, "history[0] must be an [instruction, response] pair"),
        ({"messages": None, "prompt": None, "completion": None}, "messages must be a non-empty list"),
    ],
)
def test_bad_rows_have_reasons(row, reason):
    with pytest.raises(RowError, match=re.escape(reason)):
        to_example(row)


def test_rows_of_a_file_that_mixes_formats_have_every_column(smol_tok):
    """Parquet and Hugging Face datasets give every row every column, null where unused: a row is judged by the
    columns it fills."""
    cols = {"messages": None, "prompt": None, "completion": None, "instruction": None, "output": None, "text": None}
    assert to_example({**cols, "prompt": "P", "completion": "C"}).messages[-1] == {"role": "assistant", "content": "C"}
    assert to_example({**cols, "text": "T"}).text == "T"
    assert to_example({**cols, "instruction": "I", "output": "O"}).messages[-1]["content"] == "O"


def test_llama_factory_system_column_and_alpaca_history(smol_tok):
    """A ShareGPT or Alpaca row's ``system`` column is its system turn; Alpaca's ``history`` pairs are the turns
    before its own, their responses trained like the output (data.loss_on=last_assistant: the output only)."""
    share = to_example({"system": "Be a pirate.", "conversations": [{"from": "human", "value": "hi"},
                                                                   {"from": "gpt", "value": "arr"}]})
    assert share.messages[0] == {"role": "system", "content": "Be a pirate."}
    alpaca = to_example({"system": "S", "instruction": "I", "input": "", "output": "O",
                         "history": [["q1", "a1"], ["q2", "a2"]]})
    assert [(m["role"], m["content"]) for m in alpaca.messages] == [
        ("system", "S"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2"),
        ("user", "I"), ("assistant", "O")]
    out = tokenize_example(alpaca, smol_tok, 512)
    assert trained_text(smol_tok, out["input_ids"], out["labels"]) == ["a1<|im_end|>", "a2<|im_end|>", "O<|im_end|>"]
    out = tokenize_example(alpaca, smol_tok, 512, loss_on="last_assistant")
    assert trained_text(smol_tok, out["input_ids"], out["labels"]) == ["O<|im_end|>"]


def test_column_mapping_never_lets_one_column_silently_win():
    cols = {"question": "prompt", "answer": "completion"}
    for row in ({"prompt": "OLD", "question": "Q", "answer": "A"}, {"question": "Q", "prompt": "OLD", "answer": "A"}):
        with pytest.raises(RowError, match="data.columns puts '(question|prompt)' and '(question|prompt)' both in "
                                           "column 'prompt'"):
            to_example(row, columns=cols)
    # a target column that is there but null (Parquet) is filled by the renamed one, in either order
    for row in ({"prompt": None, "question": "Q", "answer": "A"}, {"question": "Q", "prompt": None, "answer": "A"}):
        assert to_example(row, columns=cols).messages[0]["content"] == "Q"


def test_column_mapping(smol_tok):
    ex = to_example({"question": "q?", "answer": "a!"}, columns={"question": "prompt", "answer": "completion"})
    out = tokenize_example(ex, smol_tok, 512)
    assert trained_text(smol_tok, out["input_ids"], out["labels"]) == ["a!<|im_end|>"]


def test_chatml_added_when_model_has_no_template(smol_tok):
    from sft_ray.modeling import CHATML_TEMPLATE, ensure_chat_template

    tok = copy.deepcopy(smol_tok)
    tok.chat_template = None
    ensure_chat_template(tok)
    assert tok.chat_template == CHATML_TEMPLATE and tok.eos_token == "<|im_end|>"
    out = tokenize_example(to_example(CONV), tok, 512)
    assert trained_text(tok, out["input_ids"], out["labels"]) == ["你好！😀<|im_end|>", "It is 4.<|im_end|>"]


def test_a_batch_gives_what_each_row_gives_alone(smol_tok):
    """The pipeline tokenizes a block of rows in one tokenizer call: every row's ids, labels and counts (or its
    error) must be those of the row on its own, in its place."""
    from sft_ray.template import tokenize_examples

    rows = [CONV, {"text": "Plain domain text."}, {"messages": [{"role": "user", "content": "only a question"}]},
            {"prompt": "2+2?", "completion": "4"}, {"messages": [{"role": "user", "content": "long " * 300},
                                                                   {"role": "assistant", "content": "ok"}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! 你好"}]}]
    examples = []
    for r in rows:
        try:
            examples.append(to_example(r))
        except RowError:  # rows that are bad before the template are the parser's (formats.py) to report
            continue
    for too_long in ("truncate", "drop"):
        batch = tokenize_examples(examples, smol_tok, 128, too_long=too_long)
        assert len(batch) == len(examples)
        for ex, got in zip(examples, batch):
            try:
                alone = tokenize_example(ex, smol_tok, 128, too_long=too_long)
            except (RowError, TooLong) as e:
                assert type(got) is type(e) and str(got) == str(e)
            else:
                assert got == alone
        assert any(isinstance(g, dict) for g in batch) and any(not isinstance(g, dict) for g in batch)


def test_encoding_straight_from_the_rust_tokenizer_equals_calling_the_tokenizer(smol_tok):
    from sft_ray.encode import encode

    texts = [smol_tok.apply_chat_template(CONV["messages"], tokenize=False), "plain 東京 text<|im_end|>", ""]
    enc = smol_tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    want = [(list(i), [tuple(o) for o in off]) for i, off in zip(enc["input_ids"], enc["offset_mapping"])]
    assert [(list(i), [tuple(o) for o in off]) for i, off in encode(texts, smol_tok, offsets=True)] == want
    # a backend left truncating (by a tokenizer.json, or an earlier call) is not used as is
    odd = copy.deepcopy(smol_tok)
    odd.backend_tokenizer.enable_truncation(8)
    assert [(list(i), [tuple(o) for o in off]) for i, off in encode(texts, odd, offsets=True)] == want
    ids_only = smol_tok(texts, add_special_tokens=False)["input_ids"]
    assert [list(i) for i in encode(texts, smol_tok, offsets=False)] == [list(i) for i in ids_only]


def _offset_labels(texts, spans, tok):
    from sft_ray.encode import encode, span_labels

    return [(list(ids), list(ids) if sp is None else span_labels(ids, off, sp))
            for (ids, off), sp in zip(encode(texts, tok, offsets=True), spans)]


def _awkward_rows(tok):
    """Rendered conversations with whitespace runs, CJK, emoji split across tokens, and spans at odd places."""
    contents = ["  two leading spaces", "trailing  ", "a\n\n  b\t\tc", "日本語の答え 😀👍🏽", "{\"k\": [1, 2]}\n"]
    texts, spans = [], []
    for c in contents:
        text = tok.apply_chat_template([{"role": "user", "content": "q " + c}, {"role": "assistant", "content": c}],
                                       tokenize=False)
        k = text.rfind(c)
        texts += [text, text, text]
        spans += [[(k, k + len(c))], [(k + 1, len(text) - 1), (0, 3)], None]
    return texts, spans


def test_labels_from_byte_lengths_equal_labels_from_offsets(smol_tok, styles):
    """Byte-level tokenizers take the path without offsets; its labels must be the offsets' labels exactly."""
    from sft_ray.encode import _byte_table, labels_for

    for tok, _ in styles.values():
        assert _byte_table(tok) is not None  # SmolLM2's byte-level BPE, with each style's added tokens
        texts, spans = _awkward_rows(tok)
        assert [(list(i), l) for i, l in labels_for(texts, spans, tok)] == _offset_labels(texts, spans, tok)


def test_tokenizers_that_are_not_plain_byte_level_get_the_offsets(smol_tok):
    """A byte-level tokenizer whose offsets are trimmed (GPT-2's post-processor) fails the probe; a
    SentencePiece-style one (Metaspace, no byte-level decoder) is never tried; both still get exact labels."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from sft_ray.encode import _byte_table, labels_for

    trimmed = copy.deepcopy(smol_tok)
    trimmed.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    words = sorted({w for t in _awkward_rows(smol_tok)[0] for w in t.replace("\n", " ").split(" ")} | {"▁"})
    sp = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    sp.pre_tokenizer, sp.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    metaspace = PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="[UNK]")
    metaspace.chat_template = smol_tok.chat_template
    for tok in (trimmed, metaspace):
        assert _byte_table(tok) is None
        texts, spans = _awkward_rows(tok)
        assert [(list(i), l) for i, l in labels_for(texts, spans, tok)] == _offset_labels(texts, spans, tok)

"""Loading and describing models, without training: the tokens that end an answer, and LoRA target names."""

import copy
import shutil

import pytest

from sft_ray.modeling import check_target_modules, stop_token_ids

# a Gemma-style template: turns end with <end_of_turn>, while the tokenizer's EOS is another token
EOT_TEMPLATE = ("{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}"
                "{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}")


def test_an_answer_stops_at_the_templates_end_of_turn_and_every_eos_the_model_has(smol_tok):
    from transformers import GenerationConfig

    tok = copy.deepcopy(smol_tok)
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = EOT_TEMPLATE
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    assert eot != tok.eos_token_id
    assert stop_token_ids(tok) == sorted({tok.eos_token_id, eot})
    # a generation config's list is kept whole (Llama 3: <|end_of_text|> and <|eot_id|>), not replaced by one id
    assert stop_token_ids(tok, GenerationConfig(eos_token_id=[0, 7])) == sorted({0, 7, tok.eos_token_id, eot})
    assert stop_token_ids(smol_tok) == [smol_tok.eos_token_id]  # SmolLM2's template ends turns with its EOS


def test_the_serving_engine_stops_on_every_eos_of_the_exported_generation_config(tiny_model_dir, tmp_path):
    from transformers import GenerationConfig

    from sft_ray.serve.engine import Engine

    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    GenerationConfig(eos_token_id=[2, 7], pad_token_id=2).save_pretrained(d)
    assert {2, 7} <= Engine(str(d), continuous=False).eos_ids


def test_lora_target_modules_must_name_modules_the_model_has(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    check_target_modules(model, ["q_proj", "v_proj"])
    check_target_modules(model, "all-linear")
    with pytest.raises(ValueError, match=r"names 'typo_proj', which this model does not have; its linear layers: "
                                         r".*down_proj.*q_proj"):
        check_target_modules(model, ["q_proj", "typo_proj"])


def test_auto_precision_follows_the_device_the_worker_was_given(monkeypatch):
    """README: bf16 on Ampere+ GPUs, fp16 on older GPUs, bf16 on CPUs with bf16 instructions, fp32 on other CPUs.
    A CPU worker on a GPU node (train.use_gpu=false) sees the node's GPUs and must still choose for its CPU. No
    GPU here: CUDA's answers are stubbed, the decision is the code under test."""
    import torch

    from sft_ray import modeling
    from sft_ray.modeling import choose_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU node
    for cpu_bf16 in (False, True):
        monkeypatch.setattr(modeling, "cpu_supports_bf16", lambda v=cpu_bf16: v)
        assert choose_precision("auto", on_gpu=False) == ("bf16" if cpu_bf16 else "fp32")
    for gpu_bf16, want in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, v=gpu_bf16, **k: v)
        assert choose_precision("auto", on_gpu=True) == want
    assert choose_precision("fp32", on_gpu=True) == "fp32"  # asked for: kept

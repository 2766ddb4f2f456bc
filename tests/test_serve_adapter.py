"""A LoRA adapter folder served on its base model, by two replicas, answers like peft in process."""

import openai
import pytest
import torch

from sft_ray.config import load_config

PORT = 8124


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    d = tmp_path_factory.mktemp("adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(1)
    # init_lora_weights=False: random B, so the adapter really changes the answers
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, target_modules="all-linear",
                                                 init_lora_weights=False))
    peft_model.save_pretrained(d)  # adapter only, no tokenizer: the base model's is used
    assert not (d / "config.json").exists()
    return d


def _greedy(model, tok, prompt, n=12):
    ids = tok(tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                      add_generation_prompt=True), add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_adapter_served_by_two_replicas_equals_peft_in_process(ray_local, tiny_model_dir, adapter_dir):
    from peft import PeftModel
    from ray import serve
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sft_ray.serve import start

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompts = ["hello there", "what is 2+2?", "name a city"]
    base_answers = [_greedy(base, tok, p) for p in prompts]
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()  # unmerged: the reference
    want = [_greedy(peft_model, tok, p) for p in prompts]
    assert want != base_answers

    cfg = load_config(None, [f"serve.port={PORT}", "serve.model_name=tiny-lora", "serve.min_replicas=2",
                             "serve.max_replicas=2", "serve.cpus_per_replica=0.5", "serve.default_max_tokens=12"])
    url = start(str(adapter_dir), cfg)
    try:
        st = serve.status().applications["sft-ray"].deployments["OpenAIServer"]
        assert st.replica_states.get("RUNNING") == 2, st.replica_states
        client = openai.OpenAI(base_url=url, api_key="unused")
        for _ in range(2):  # enough requests that both replicas answer some
            got = [client.chat.completions.create(model="tiny-lora", messages=[{"role": "user", "content": p}],
                                                  max_tokens=12, temperature=0).choices[0].message.content
                   for p in prompts]
            assert got == want
    finally:
        serve.shutdown()

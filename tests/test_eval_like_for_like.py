"""The before/after comparison asks both models the same thing: prompts rendered once with the run's
tokenizer, chat template and template kwargs, the same token ids for both, and the report says which."""

import json
import shutil

import pytest

from sft_ray.config import load_config
from sft_ray.evaluate import compare, render_prompts
from sft_ray.modeling import load_tokenizer
from sft_ray.synthetic import generate, write_jsonl

pytestmark = [pytest.mark.usefixtures("ray_local")]

MARKED = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{{ marker }}{% endif %}")


def test_base_and_tuned_models_get_the_same_prompts(tmp_path, tiny_model_dir):
    # the run trains with ChatML while the base model's own template is SmolLM2's (with its default system turn)
    cfg = load_config(None, [f"model.name={tiny_model_dir}", "model.chat_template=chatml", f"output_dir={tmp_path}",
                             "eval.max_examples=3", "eval.max_new_tokens=6", "eval.probe_max_new_tokens=6",
                             "eval.actors=1", "eval.loss=false"])
    evals = write_jsonl(generate(3, seed=1, split="eval"), tmp_path / "eval.jsonl")
    # "tuned": the very same weights, exported with the run's tokenizer (as a training run exports them)
    tuned = tmp_path / "tuned"
    shutil.copytree(tiny_model_dir, tuned)
    load_tokenizer(cfg.model).save_pretrained(str(tuned))
    res = compare(str(tiny_model_dir), str(tuned), [str(evals)], cfg, tmp_path / "eval")
    # same weights + same prompt ids = the same greedy answers, row by row (own templates would differ)
    assert [e["before"] for e in res["examples"]] == [e["after"] for e in res["examples"]]
    assert [p["before"] for p in res["probes"]] == [p["after"] for p in res["probes"]]
    assert res["prompt_template"].startswith("ChatML (model.chat_template=chatml")
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "rendered with ChatML (model.chat_template=chatml" in report and str(evals) in report
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n_eval"] == 3


def test_template_kwargs_reach_the_rendered_prompts(tiny_model_dir):
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"model.chat_template={json.dumps(MARKED)}",
                             "data.template_kwargs={marker: THINK-OFF}"])
    tok = load_tokenizer(cfg.model)
    ids = render_prompts(tok, [[{"role": "user", "content": "hi"}]], cfg.data.template_kwargs)[0]
    assert tok.decode(ids).endswith("<|im_start|>assistant\nTHINK-OFF")

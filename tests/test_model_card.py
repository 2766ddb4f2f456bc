"""The exported model folder's card (``{output_dir}/model/README.md``): a Hugging Face model card that
``ModelCard.load`` parses, whose metadata holds, and whose numbers are those of metrics.json and the summary.

Fast: the summary and the results are built with the functions a run builds them with (data stats, the plan,
the per-row scores and their comparison, ``report.write`` for metrics.json), without training."""

import json
import re
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, ModelCardData, metadata_load
from huggingface_hub.utils import validate_repo_id

from sft_ray import evaluate, model_card, report
from sft_ray.config import load_config
from sft_ray.data import DataStats
from sft_ray.plan import plan_run
from sft_ray.synthetic import generate
from sft_ray.train import eval_source


def _run_like(tmp_path: Path, *overrides: str, adapter: bool = False, with_eval: bool = True):
    """(cfg, summary, results, metrics.json) as `sft-ray train` leaves them, with an exported model folder."""
    cfg = load_config("jobs/configs/local-cpu.yaml", [f"output_dir={tmp_path}", *overrides])
    model = tmp_path / "model"
    model.mkdir(parents=True)
    (model / ("adapter_config.json" if adapter else "config.json")).write_text("{}")
    train = DataStats(rows=320, tokens=30969, trained_tokens=8624, truncated=2, max_len=107)
    ev = DataStats(rows=48, tokens=4645, trained_tokens=1302, max_len=104)
    plan = plan_run(cfg, train.rows, train.tokens / train.rows, True, eval_source(cfg))
    summary = {"data": {"train": train.to_dict(), "eval": ev.to_dict()}, "plan": plan.to_dict(),
               "model_dir": str(model.resolve()),
               "metrics": {"loss": 0.00045876, "step": plan.max_steps, "tokens": 30969, "trained_tokens": 8624,
                           "avg_tokens_per_s": 64.21, "eval_loss": 0.0362365, "precision": "fp32"},
               "resumed_finished_run": False, "train_seconds": 520.2, "total_seconds": 751.6,
               "config": cfg.model_dump(mode="json")}
    if not with_eval:
        return cfg, summary, None, None
    rows = generate(40, seed=3, split="eval")
    refs = [r["messages"][-1]["content"] for r in rows]
    before = ["I am not sure."] * 39 + [refs[39]]  # right once
    after = refs[:34] + ["{}"] * 5 + ["nope"]  # right 34 times, wrong on the row it was right on
    results = {"n_eval": len(refs), "models": {"before": "base", "after": str(model)}, "eval_data": ["x"],
               "prompt_template": "the model's own (sha256 0123456789ab)",
               "scores": evaluate.compare_scores(evaluate.score(before, refs), evaluate.score(after, refs)),
               "loss": {"eval_loss": {"before": 0.63534, "after": 0.036411},
                        "perplexity": {"before": 1.88774, "after": 1.03708}},
               "probes": [{"question": "Calculate 1+1-1", "before": "2", "after": "1"}], "examples": []}
    report.write(tmp_path / "eval", results, summary)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    return cfg, summary, results, metrics


def _row(text: str, first: str) -> list[str]:
    """The cells of the Markdown table row whose first cell is ``first``."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first:
            return cells
    raise AssertionError(f"no table row {first!r} in the card")


def assert_card_matches(card_path: Path, metrics: dict) -> ModelCard:
    """The card parses, its metadata holds, and its figures are metrics.json's (as the table rounds them)."""
    card = ModelCard.load(card_path)  # strict: a model-index that does not parse would raise here
    # RepoCard.validate() posts the card to the Hub (network); offline, the checks huggingface_hub does
    # locally: the front matter is a mapping that ModelCardData rebuilds as is, ids are valid repo ids
    assert metadata_load(card_path) == card.data.to_dict()
    assert ModelCardData(**card.data.to_dict()).to_dict() == card.data.to_dict()
    for repo_id in [card.data.base_model] + list(card.data.datasets or []):
        if repo_id:
            validate_repo_id(repo_id)
    assert card.data.library_name in ("transformers", "peft") and card.data.pipeline_tag == "text-generation"
    assert {"sft", "trl", "sft-ray"} <= set(card.data.tags)
    text = card.text
    n = metrics["n_eval"]
    for metric, s in metrics["scores"].items():
        t = s["paired_test"]
        cells = _row(text, metric)
        assert cells[1].split()[0] == f"{s['before']:.3f}" and cells[2].split()[0] == f"{s['after']:.3f}", cells
        if s["binary"]:
            assert cells[1].endswith(f"({s['before_correct']}/{n})") and cells[2].endswith(f"({s['after_correct']}/{n})")
        assert cells[3] == f"{s['before_ci95'][0]:.3f}–{s['before_ci95'][1]:.3f}"
        assert cells[4] == f"{s['after_ci95'][0]:.3f}–{s['after_ci95'][1]:.3f}"
        assert cells[5:7] == [str(t.get("improved", "-")), str(t.get("regressed", "-"))]
        assert cells[7] == f"{t['p_value']:.2g} ({t['test']})"
    for name, v in metrics.get("loss", {}).items():
        assert _row(text, name)[1:3] == [f"{v['before']:.4f}", f"{v['after']:.4f}"]
    assert f"on {n} held-out rows" in text
    run = metrics["run"]
    for split, st in run["data"].items():
        assert _row(text, split)[2:5] == [str(st["rows"]), str(st["tokens"]), str(st["trained_tokens"])]
    assert _row(text, "optimizer steps")[1].split()[0] == str(run["metrics"]["step"])
    assert f"eval loss {run['metrics']['eval_loss']:.4f}" in text and f"final train loss {run['metrics']['loss']:.4f}" in text
    return card


def test_card_parses_validates_and_equals_metrics_json(tmp_path):
    cfg, summary, results, metrics = _run_like(tmp_path)
    path = model_card.write(cfg, summary, results)
    assert path == tmp_path / "model" / "README.md"
    card = assert_card_matches(path, metrics)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the embedded default
    assert card.data.license == "apache-2.0" and card.data.library_name == "transformers"
    assert card.data.datasets is None and card.data.eval_results is None  # no Hub dataset: no model-index
    # the figures compared above are this run's (not defaults): 1/40 before, 34/40 after, 34 improved, 1 regressed
    s = metrics["scores"]["exact_match"]
    assert (s["before_correct"], s["after_correct"]) == (1, 34)
    assert _row(card.text, "exact_match")[5:7] == ["34", "1"]
    # the recipe
    for key, value in [("DeepSpeed", "ZeRO stage 0"), ("packing", "on"), ("precision", "fp32"), ("seed", "42"),
                       ("max_length", "1024"), ("fine-tuning", "full (every weight trained)"),
                       ("epochs", "1"), ("learning rate", "0.0001, cosine schedule, warmup ratio 0.05"),
                       ("rows per step", "8 = 2 workers x 4 rows x grad_accum 1")]:
        assert _row(card.text, key)[1] == value, key
    # how to serve it and publish it
    assert "sft-ray serve NAME --port 8000" in card.text and "from openai import OpenAI" in card.text
    assert "hf upload ORG/NAME path/to/this/folder" in card.text
    # no path of this machine; the same inputs give the same bytes
    assert str(tmp_path) not in path.read_text() and str(Path.home()) not in path.read_text()
    first = path.read_bytes()
    model_card.write(cfg, summary, results)
    assert path.read_bytes() == first


def test_lora_adapter_card_and_hub_data(tmp_path):
    """An unmerged LoRA export is a peft repository; a Hub dataset is named in `datasets`, and Hub eval data
    gives a model-index (the after scores) that huggingface_hub parses back."""
    cfg, summary, results, metrics = _run_like(
        tmp_path, "lora.enabled=true", "lora.r=8", "data.train=[generated, hf:org/chat-data]",
        "data.eval=hf:org/chat-eval:test", adapter=True)
    card = assert_card_matches(model_card.write(cfg, summary, results), metrics)
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    assert card.data.datasets == ["org/chat-data"]
    assert _row(card.text, "fine-tuning")[1].startswith("LoRA r=8, alpha=32")
    assert "serve.base_model=embedded" in card.text
    assert card.data.model_name == cfg.train.name
    got = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert got == {m: s["after"] for m, s in metrics["scores"].items()}
    assert {(r.dataset_type, r.dataset_split) for r in card.data.eval_results} == {("org/chat-eval", "test")}


def test_local_base_model_license_from_its_card(tmp_path):
    """A local folder: the license from its own card when it has one; a Hub-cache snapshot names its repo."""
    base = tmp_path / "hub" / "models--acme--tiny-chat" / "snapshots" / "abc123"
    base.mkdir(parents=True)
    (base / "README.md").write_text("---\nlicense: mit\nbase_model: acme/tiny-base\n---\n# tiny chat\n")
    cfg, summary, _, _ = _run_like(tmp_path / "a", f"model.name={base}", with_eval=False)
    card = ModelCard.load(model_card.write(cfg, summary, None))
    assert (card.data.base_model, card.data.license) == ("acme/tiny-chat", "mit")
    plain = tmp_path / "my-model"
    plain.mkdir()
    cfg, summary, _, _ = _run_like(tmp_path / "b", f"model.name={plain}", with_eval=False)
    card = ModelCard.load(model_card.write(cfg, summary, None))
    assert card.data.license is None and card.data.base_model is None  # not known: left out
    assert "`my-model`" in card.text and str(tmp_path) not in card.text


def test_hub_base_model_license_from_its_card_on_the_hub(tmp_path, monkeypatch):
    """A Hub id: `base_model` is the id, the license comes from its card (the cached copy, else downloaded);
    when the card cannot be had (offline, gated), the license is left out and the card is still written."""
    import huggingface_hub

    readme = tmp_path / "hub-README.md"
    readme.write_text("---\nlicense: other\nlicense_name: acme-license\nlicense_link: LICENSE\n---\n# acme\n")
    asked = []
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, f, revision=None: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, f, revision=None: asked.append((repo, f, revision)) or str(readme))
    cfg, summary, _, _ = _run_like(tmp_path / "a", "model.name=acme/chat-1b", "model.revision=v2", with_eval=False)
    card = ModelCard.load(model_card.write(cfg, summary, None))
    assert asked == [("acme/chat-1b", "README.md", "v2")]
    assert (card.data.base_model, card.data.license, card.data.license_name, card.data.license_link) == \
        ("acme/chat-1b", "other", "acme-license", "LICENSE")

    def offline(*a, **k):
        raise huggingface_hub.errors.OfflineModeIsEnabled("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    cfg, summary, _, _ = _run_like(tmp_path / "b", "model.name=acme/chat-1b", with_eval=False)
    card = ModelCard.load(model_card.write(cfg, summary, None))
    assert card.data.base_model == "acme/chat-1b" and card.data.license is None


def test_without_eval_the_card_has_no_score_table(tmp_path, monkeypatch):
    """`sft-ray train ... eval.enabled=false` still writes the card (through the train command itself)."""
    from sft_ray import cli, train

    cfg, summary, _, _ = _run_like(tmp_path, with_eval=False)
    monkeypatch.setattr(train, "run", lambda c: summary)
    assert cli.main(["train", "jobs/configs/local-cpu.yaml", f"output_dir={tmp_path}", "eval.enabled=false"]) == 0
    card = ModelCard.load(tmp_path / "model" / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "before 95% CI" not in card.text and "eval.enabled=false" in card.text
    assert _row(card.text, "train")[2:5] == ["320", "30969", "8624"]


def test_a_card_that_cannot_be_written_stops_the_run_with_the_reason(tmp_path, monkeypatch, capsys):
    from sft_ray import cli, train

    cfg, summary, _, _ = _run_like(tmp_path, with_eval=False)
    (tmp_path / "model" / "README.md").mkdir()  # the card's place is taken (a read-only folder does the same)
    with pytest.raises(model_card.ModelCardError, match=re.escape(str(tmp_path / "model" / "README.md"))):
        model_card.write(cfg, summary, None)
    monkeypatch.setattr(train, "run", lambda c: summary)
    assert cli.main(["train", "jobs/configs/local-cpu.yaml", f"output_dir={tmp_path}", "eval.enabled=false"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("sft-ray: cannot write the model card ")
    with pytest.raises(model_card.ModelCardError, match="no model folder"):
        model_card.write(cfg, summary, None, tmp_path / "elsewhere")


def test_hf_cli_uploads_a_folder_to_the_repository_root(tmp_path, monkeypatch):
    """The README's publish command, as written: `hf upload ORG/NAME runs/local-cpu/model` puts the folder's
    files at the repository's root (huggingface_hub's own path resolution; nothing is sent)."""
    import subprocess
    import sys

    from huggingface_hub.cli.upload import _resolve_upload_paths

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    cmd = next(line.split() for line in readme.splitlines() if line.startswith(".venv/bin/hf upload "))
    assert cmd[2] == "ORG/NAME" and len(cmd) == 4
    hf = Path(sys.executable).with_name("hf")
    for command in (["upload"], ["auth", "login"]):
        assert subprocess.run([str(hf), *command, "--help"], capture_output=True, timeout=120).returncode == 0
    (tmp_path / cmd[3]).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert _resolve_upload_paths(repo_id=cmd[2], local_path=cmd[3], path_in_repo=None, include=None)[:2] == \
        (cmd[3], ".")


def test_object_storage_sources_are_named_without_credentials():
    from sft_ray.model_card import describe_source

    text = describe_source("s3://AKIAEXAMPLE:s3cr3t@bucket/data/*.jsonl?X-Amz-Signature=abc123")
    assert text == "`s3://bucket/data/*.jsonl`"


def test_a_base_model_in_object_storage_is_named_without_credentials():
    from sft_ray.config import load_config
    from sft_ray.model_card import base_model

    cfg = load_config(None, ["model.name=s3://bucket/models/m7?access_key=AKIAEXAMPLE&secret_key=TOPSECRET"])
    info = base_model(cfg)
    assert info["label"] == "m7" and "SECRET" not in json.dumps(info) and "AKIA" not in json.dumps(info)


def test_a_run_that_scored_nothing_says_so_and_publishes_no_score(tmp_path):
    """No held-out row scored (eval.max_examples=0, no text answers): no 0/0 = 0% table and no model-index entry;
    a small eval fraction is written as it is, a base model in object storage is not called local."""
    cfg, summary, results, _ = _run_like(tmp_path, "data.eval_fraction=0.004", "data.eval=[]",
                                         "model.name=s3://bucket/base?X-Amz-Signature=abc123")
    results = {**results, "n_eval": 0, "scores": {}, "loss": {},
               "not_scored": "no held-out row could be scored (eval.max_examples=0)"}
    text = str(model_card.build(cfg, summary, results, tmp_path / "model"))
    assert "scored nothing: no held-out row could be scored (eval.max_examples=0)" in text
    assert "| exact_match" not in text and "model-index" not in text
    assert "a model folder in object storage, `base`" in text and "abc123" not in text
    assert model_card._eval_sources(cfg).startswith("a seeded 0.4% of the train rows")

"""Before/after evaluation: same prompts, same chat template, greedy decoding, measured scores.

Generation runs through Ray Data ``map_batches`` with an actor pool (one model per actor), so a
large eval set spreads over a cluster. Scores carry a bootstrap 95% interval, and the before/after
difference an exact paired test (McNemar), so a real gain can be told from noise.
"""

from __future__ import annotations

import json
import math
import random
import re
import string
from pathlib import Path
from typing import Any

from sft_ray.formats import RowError, to_example


class Generator:
    """Ray Data callable class: loads one model, answers batches of already-tokenized prompts greedily.

    Both models of a comparison get the same token ids, rendered once on the driver with the run's own
    tokenizer and chat template, and are decoded by that same tokenizer: the base model is asked exactly
    what the tuned one is asked."""

    def __init__(self, model_dir: str, tok_ref: list, max_new_tokens: int, trust_remote_code: bool = False,
                 revision: str | None = None):
        import ray
        from transformers.utils import logging as hf_logging

        from sft_ray.modeling import load_weights, stop_token_ids

        hf_logging.disable_progress_bar()
        self.tok = ray.get(tok_ref[0])
        self.model = load_weights(model_dir, self.tok, trust_remote_code, revision=revision)
        self.stops = stop_token_ids(self.tok)  # from the shared tokenizer: the same stops for both models
        self.device = self.model.device
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        import torch

        prompts = [json.loads(p) for p in batch["prompt_ids"]]
        width = max(len(p) for p in prompts)
        pad = self.tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens, do_sample=False,
                temperature=None, top_p=None, top_k=None, pad_token_id=pad, eos_token_id=self.stops,
            )
        texts = self.tok.batch_decode(out[:, width:], skip_special_tokens=True)
        return {"i": list(batch["i"]), "answer": [t.strip() for t in texts]}


def _actor_resources() -> dict[str, float]:
    """One GPU per model actor when the cluster has GPUs, else one CPU."""
    import ray

    return {"num_gpus": 1} if ray.cluster_resources().get("GPU", 0) >= 1 else {"num_cpus": 1}


def render_prompts(tok, conversations: list[list[dict]], template_kwargs: dict | None = None,
                   tools: list[list | None] | None = None) -> list[list[int]]:
    """Token ids of each conversation with the generation prompt, as the trained model's template renders it
    (with the row's tool schemas, as in training)."""
    kwargs = template_kwargs or {}
    tools = tools or [None] * len(conversations)
    return [tok(tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True,
                                        **({"tools": t} if t else {}), **kwargs),
                add_special_tokens=False)["input_ids"] for c, t in zip(conversations, tools)]


def generate(model_dir: str, prompts: list[list[int]], tok, max_new_tokens: int, batch_size: int, actors: int = 1,
             trust_remote_code: bool = False, revision: str | None = None) -> list[str]:
    """Greedy answers to tokenized prompts, in input order."""
    import ray
    from ray.data import ActorPoolStrategy

    if not prompts:
        return []
    items = [{"i": i, "prompt_ids": json.dumps(p)} for i, p in enumerate(prompts)]
    ds = ray.data.from_items(items).map_batches(
        Generator,
        fn_constructor_kwargs={"model_dir": model_dir, "tok_ref": [ray.put(tok)], "max_new_tokens": max_new_tokens,
                               "trust_remote_code": trust_remote_code, "revision": revision},
        batch_size=batch_size,
        compute=ActorPoolStrategy(size=max(1, actors)),
        **_actor_resources(),
    )
    rows = sorted(ds.take_all(), key=lambda r: r["i"])
    return [r["answer"] for r in rows]


class LossScorer:
    """Ray Data callable class: summed NLL and token count on the trained tokens of a batch."""

    def __init__(self, model_dir: str, tok_ref: list, trust_remote_code: bool = False, revision: str | None = None):
        import ray
        from transformers.utils import logging as hf_logging

        from sft_ray.modeling import load_weights

        hf_logging.disable_progress_bar()
        tok = ray.get(tok_ref[0])
        self.model = load_weights(model_dir, tok, trust_remote_code, float32=True, revision=revision)  # fp32 losses
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.device = self.model.device

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        import torch

        from sft_ray.data import pad_collate

        b = pad_collate(batch, self.pad)
        b = {k: v.to(self.device) for k, v in b.items() if isinstance(v, torch.Tensor)}
        with torch.inference_mode():
            logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), b["labels"][:, 1:].reshape(-1),
            ignore_index=-100, reduction="sum")
        return {"nll": [float(nll)], "n": [int((b["labels"][:, 1:] != -100).sum())]}


def eval_loss(model_dir: str, ds, tok, batch_size: int, actors: int, trust_remote_code: bool = False,
              revision: str | None = None) -> dict[str, float]:
    """Token-weighted loss and perplexity of a model on the trained tokens of a tokenized dataset."""
    import ray
    from ray.data import ActorPoolStrategy

    parts = ds.map_batches(LossScorer, fn_constructor_args=(model_dir, [ray.put(tok)], trust_remote_code, revision),
                           batch_size=batch_size, compute=ActorPoolStrategy(size=max(1, actors)),
                           **_actor_resources()).take_all()
    nll, n = sum(p["nll"] for p in parts), sum(p["n"] for p in parts)
    if n == 0:  # no trained token to measure: no loss, rather than a perfect 0.0 / perplexity 1.0
        return {"loss": None, "perplexity": None, "tokens": 0}
    loss = nll / n
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": n}


# ----------------------------------------------------------------------------- scores


def normalize(text: str) -> str:
    text = text.lower().strip()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


def exact_match(pred: str, ref: str) -> float:
    return float(pred.strip() == ref.strip())


def normalized_match(pred: str, ref: str) -> float:
    return float(normalize(pred) == normalize(ref))


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _json(text: str) -> Any:
    """Strict JSON: NaN and Infinity (which Python's parser accepts) are not JSON."""
    return json.loads(text, parse_constant=_no_constant)


def _same_json(a: Any, b: Any) -> bool:
    """Equal JSON values, by JSON's types: ``true`` is not ``1`` (Python's ``==`` says it is); 1 and 1.0 are one
    number."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


# what a degenerate answer can raise: ``[[[[...`` a thousand deep is a RecursionError, not a JSONDecodeError
_NOT_JSON = (ValueError, TypeError, RecursionError)


def json_match(pred: str, ref: str) -> float:
    """Same JSON value (key order and spacing ignored); 0 if either side does not parse."""
    try:
        return float(_same_json(_json(pred), _json(ref)))
    except _NOT_JSON:
        return 0.0


def json_valid(pred: str) -> float:
    try:
        _json(pred)
        return 1.0
    except _NOT_JSON:
        return 0.0


def _tokens(text: str) -> list[str]:
    return normalize(text).split()


def token_f1(pred: str, ref: str) -> float:
    """SQuAD-style bag-of-tokens F1 on normalised text."""
    p, r = _tokens(pred), _tokens(ref)
    if not p or not r:
        return float(p == r)
    common = sum(min(p.count(t), r.count(t)) for t in set(p))
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F-measure: longest common subsequence of normalised tokens."""
    p, r = _tokens(pred), _tokens(ref)
    if not p or not r:
        return float(p == r)
    prev = [0] * (len(r) + 1)
    for a in p:
        cur = [0]
        for j, b in enumerate(r, 1):
            cur.append(prev[j - 1] + 1 if a == b else max(prev[j], cur[j - 1]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


class EvalError(RuntimeError):
    """The evaluation cannot give a trustworthy figure (said instead of reporting a wrong one)."""


def load_scorer(path: str):
    """``package.module:function`` taking (prediction, reference) and returning a float."""
    import importlib

    module, _, name = path.partition(":")
    if not module or not name:
        raise ValueError(f"eval.scorers entry {path!r} must look like package.module:function")
    fn = getattr(importlib.import_module(module), name)
    if not callable(fn):
        raise ValueError(f"eval.scorers entry {path!r} is not callable")
    return name, fn


def permutation_test(before: list[float], after: list[float], n: int = 10000, seed: int = 0) -> dict[str, Any]:
    """Paired two-sided sign-flip permutation test on the mean difference (for non-binary scores)."""
    diffs = [a - b for a, b in zip(after, before)]
    if not diffs or all(d == 0 for d in diffs):
        return {"p_value": 1.0, "mean_diff": 0.0}
    observed = abs(sum(diffs))
    rng = random.Random(seed)
    hits = sum(1 for _ in range(n) if abs(sum(d if rng.random() < 0.5 else -d for d in diffs)) >= observed - 1e-12)
    return {"p_value": (hits + 1) / (n + 1), "mean_diff": sum(diffs) / len(diffs)}


def bootstrap_ci(values: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    if not values:
        return (0.0, 0.0)
    rng = random.Random(seed)
    k = len(values)
    means = sorted(sum(values[rng.randrange(k)] for _ in range(k)) / k for _ in range(n))
    return (means[round(0.025 * (n - 1))], means[round(0.975 * (n - 1))])  # the 2.5th and 97.5th percentiles


def mcnemar_exact(before: list[float], after: list[float]) -> dict[str, Any]:
    """Exact two-sided McNemar test on paired 0/1 outcomes."""
    b = sum(1 for x, y in zip(before, after) if x >= 0.5 > y)  # right before, wrong after
    c = sum(1 for x, y in zip(before, after) if y >= 0.5 > x)  # wrong before, right after
    n = b + c
    if n == 0:
        return {"improved": c, "regressed": b, "p_value": 1.0}
    tail = sum(math.comb(n, i) for i in range(0, min(b, c) + 1)) / 2**n
    return {"improved": c, "regressed": b, "p_value": min(1.0, 2 * tail)}


# ----------------------------------------------------------------------------- eval set


def _pairs(batch: dict[str, Any], fmt: str, columns: dict[str, str]) -> dict[str, list]:
    """(prompt conversation, its tool schemas, reference) of each row that can be scored: the reference is its
    last assistant turn's text. Not scored: rows whose answer is a tool call (no text to compare) and rows with
    nothing but a system prompt before the answer (nothing asked)."""
    prompts, tools, refs, keys = [], [], [], []
    for source, row, record, error in zip(batch["source"], batch["row"], batch["record"], batch["error"]):
        if error:
            continue
        try:
            ex = to_example(json.loads(record), fmt, columns)
        except (RowError, json.JSONDecodeError, TypeError):
            continue
        if ex.messages is None:
            continue
        last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
        answer = ex.messages[last]
        if answer.get("tool_calls") or not any(m["role"] != "system" for m in ex.messages[:last]):
            continue
        prompts.append(json.dumps(ex.messages[:last], ensure_ascii=False))
        tools.append(json.dumps(ex.tools, ensure_ascii=False) if ex.tools else "")
        refs.append(answer["content"])
        keys.append(f"{source}:{row}")
    return {"prompt": prompts, "tools": tools, "reference": refs, "key": keys}


def eval_pairs(specs: list[str], fmt: str, columns: dict[str, str], limit: int,
               fraction_split: tuple[int, float] | None = None) -> list[tuple[list[dict], str, list | None]]:
    """(prompt conversation, reference answer, tool schemas) for the first ``limit`` usable rows of the eval data.

    Read through the same Ray Data path as training (``sources.read``), so every source kind that trains
    also evaluates. ``fraction_split=(seed, fraction)``: the rows of ``specs`` that ``data.eval_fraction``
    holds out."""
    from sft_ray import sources
    from sft_ray.data import in_eval_split, quiet_ray_data

    if limit <= 0 or not specs:
        return []
    quiet_ray_data()
    ds = sources.read(specs)
    if fraction_split is not None:
        seed, frac = fraction_split
        ds = ds.filter(lambda r: in_eval_split(r["source"], r["row"], seed, frac))
    ds = ds.map_batches(_pairs, fn_kwargs={"fmt": fmt, "columns": columns}, batch_format="numpy", num_cpus=0.25)
    ds.context.execution_options.preserve_order = True  # the first rows of the files, in file order
    return [(json.loads(r["prompt"]), r["reference"], json.loads(r["tools"]) if r["tools"] else None)
            for r in ds.limit(limit).take_all()]


def score(preds: list[str], refs: list[str], scorers: list[str] | tuple = ()) -> dict[str, list[float]]:
    """Per-row scores, metrics chosen for the data: JSON metrics when every reference is JSON,
    F1/ROUGE-L when references are free text (more than a few words), plus user scorers."""
    scores = {
        "exact_match": [exact_match(p, r) for p, r in zip(preds, refs)],
        "normalized_match": [normalized_match(p, r) for p, r in zip(preds, refs)],
    }
    if refs and all(json_valid(r) for r in refs):
        scores["json_match"] = [json_match(p, r) for p, r in zip(preds, refs)]
        scores["json_valid"] = [json_valid(p) for p in preds]
    elif refs and sum(len(r.split()) for r in refs) / len(refs) > 3:
        scores["token_f1"] = [token_f1(p, r) for p, r in zip(preds, refs)]
        scores["rouge_l"] = [rouge_l(p, r) for p, r in zip(preds, refs)]
    for path in scorers:
        name, fn = load_scorer(path)
        values = []
        for i, (p, r) in enumerate(zip(preds, refs)):
            try:
                v = float(fn(p, r))
            except Exception as e:
                raise EvalError(f"eval.scorers {path!r} failed on held-out row {i + 1}: {type(e).__name__}: {e}") \
                    from None
            if not math.isfinite(v):  # a NaN would make every paired test "significant" and metrics.json invalid
                raise EvalError(f"eval.scorers {path!r} returned {v} on held-out row {i + 1}; scores must be finite")
            values.append(v)
        scores[name] = values
    return scores


def compare_scores(before: dict[str, list[float]], after: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """Per metric: both means, their bootstrap 95% intervals and the paired test (exact McNemar when every
    score is 0/1, a sign-flip permutation test otherwise), from the per-row scores of the same rows."""
    table = {}
    for metric in before:
        b, a = before[metric], after[metric]
        binary = all(v in (0.0, 1.0) for v in b + a)
        test = {**mcnemar_exact(b, a), "test": "McNemar exact"} if binary else {**permutation_test(b, a), "test": "permutation"}
        table[metric] = {
            "before": sum(b) / len(b) if b else 0.0,
            "after": sum(a) / len(a) if a else 0.0,
            "before_ci95": bootstrap_ci(b),
            "after_ci95": bootstrap_ci(a),
            "before_correct": int(sum(b)) if binary else None,
            "after_correct": int(sum(a)) if binary else None,
            "binary": binary,
            "paired_test": test,
        }
    return table


def describe_template(model_cfg, tok) -> str:
    """Which chat template rendered the prompts, in words (for the report)."""
    import hashlib

    digest = hashlib.sha256((tok.chat_template or "").encode()).hexdigest()[:12]
    if model_cfg.chat_template is None:
        from sft_ray.modeling import CHATML_TEMPLATE

        own = "ChatML (added: the model has none)" if tok.chat_template == CHATML_TEMPLATE else "the model's own"
        return f"{own} (sha256 {digest})"
    if model_cfg.chat_template == "chatml":
        return f"ChatML (model.chat_template=chatml, sha256 {digest})"
    return f"the Jinja template in model.chat_template (sha256 {digest})"


def compare(base_dir: str, tuned_dir: str, eval_specs: list[str], cfg, out_dir: Path,
            summary: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate base and tuned models on the same held-out prompts and probes; write the report.

    Like for like: the prompts are rendered once, with the run's tokenizer, chat template and
    ``data.template_kwargs``, and both models answer those very token ids; the base model is loaded with
    the run's ``model.revision`` and ``model.trust_remote_code``."""
    from sft_ray import report
    from sft_ray.data import _tokenizer
    from sft_ray.model_card import is_adapter
    from sft_ray.sources import shown_uri

    e, m = cfg.eval, cfg.model
    split = None
    if not eval_specs and cfg.data.eval_fraction > 0:  # the held-out fraction of the training files
        from sft_ray.train import resolve_data

        eval_specs, split = resolve_data(cfg)[0], (cfg.seed, cfg.data.eval_fraction)
    pairs = eval_pairs(eval_specs, cfg.data.format, cfg.data.columns, e.max_examples, split)
    tok = _tokenizer(m)
    task_prompts = render_prompts(tok, [p for p, _, _ in pairs], cfg.data.template_kwargs, [t for _, _, t in pairs])
    probe_prompts = render_prompts(tok, [[{"role": "user", "content": q}] for q in e.probes], cfg.data.template_kwargs)
    template = describe_template(m, tok) + (f", template_kwargs {cfg.data.template_kwargs}"
                                            if cfg.data.template_kwargs else "")
    shown = [shown_uri(s) for s in eval_specs]  # no credentials or signed queries in the report
    results: dict[str, Any] = {"n_eval": len(pairs), "models": {"before": shown_uri(base_dir), "after": tuned_dir},
                               "eval_data": shown if not split else f"{shown} (held-out fraction "
                                                                    f"{cfg.data.eval_fraction})",
                               "prompt_template": template}
    # an unmerged LoRA export is an adapter on the base at the run's revision, as the "before" model is
    tuned_revision = m.revision if is_adapter(Path(tuned_dir)) else None
    answers: dict[str, dict[str, list[str]]] = {}
    for tag, model_dir, revision in (("before", base_dir, m.revision), ("after", tuned_dir, tuned_revision)):
        kw = {"trust_remote_code": m.trust_remote_code, "revision": revision}
        answers[tag] = {"task": generate(model_dir, task_prompts, tok, e.max_new_tokens, e.batch_size, e.actors, **kw),
                        "probes": generate(model_dir, probe_prompts, tok, e.probe_max_new_tokens, e.batch_size, 1, **kw)}
    refs = [r for _, r, _ in pairs]
    if pairs:
        per_row = {tag: score(answers[tag]["task"], refs, e.scorers) for tag in answers}
        results["scores"] = compare_scores(per_row["before"], per_row["after"])
    else:  # nothing scored is said, not shown as 0/0 = 0%
        results["scores"] = {}
        results["not_scored"] = ("no held-out row could be scored (eval.max_examples=0, no eval data, or rows "
                                 "without a text answer to compare)")
    if e.loss and eval_specs:
        from sft_ray import data

        tokenized = data.tokenized(eval_specs, cfg, "eval" if split else None)
        ds = data.trainable(tokenized, "skip", cfg.data.tokenize_cpus).limit(e.max_loss_rows).materialize()
        before, after = (eval_loss(d, ds, tok, e.batch_size, e.actors, m.trust_remote_code, r)
                         for d, r in ((base_dir, m.revision), (tuned_dir, tuned_revision)))
        if before["loss"] is not None and after["loss"] is not None:
            results["loss"] = {"eval_loss": {"before": before["loss"], "after": after["loss"]},
                               "perplexity": {"before": before["perplexity"], "after": after["perplexity"]}}
    results["probes"] = [
        {"question": q, "before": answers["before"]["probes"][i], "after": answers["after"]["probes"][i]}
        for i, q in enumerate(e.probes)
    ]
    results["examples"] = [
        {"prompt": p[-1]["content"], "reference": r, "before": answers["before"]["task"][i],
         "after": answers["after"]["task"][i]}
        for i, (p, r, _) in enumerate(pairs[:8])
    ]
    history_file = Path(tuned_dir, "train_history.json")
    history = json.loads(history_file.read_text()) if history_file.is_file() else []
    report.write(out_dir, results, summary, history)
    return results


def render_console(res: dict[str, Any]) -> str:
    out = ["", "=" * 78, "BEFORE vs AFTER", "=" * 78]
    for p in res["probes"]:
        out += [f"Q: {p['question']}", f"  before: {p['before'][:300]}", f"  after:  {p['after'][:300]}", ""]
    for ex in res.get("examples", [])[:4]:
        out += [f"Task: {ex['prompt'][:200]}", f"  reference: {ex['reference']}", f"  before: {ex['before'][:200]}",
                f"  after:  {ex['after'][:200]}", ""]
    out.append(f"held-out rows: {res['n_eval']} from {res.get('eval_data')}; prompts: {res.get('prompt_template')}")
    if res.get("not_scored"):
        out.append(f"not scored: {res['not_scored']}")
    for m, s in res["scores"].items():
        t = s["paired_test"]
        if s.get("binary"):
            out.append(f"{m}: before {s['before_correct']}/{res['n_eval']} ({s['before']:.1%})  ->  after "
                       f"{s['after_correct']}/{res['n_eval']} ({s['after']:.1%})   {t['test']} p={t['p_value']:.2g}")
        else:
            out.append(f"{m}: before {s['before']:.3f} -> after {s['after']:.3f}   {t['test']} p={t['p_value']:.2g}")
    for name, v in res.get("loss", {}).items():
        out.append(f"{name}: before {v['before']:.4f} -> after {v['after']:.4f}")
    out.append("=" * 78)
    return "\n".join(out)

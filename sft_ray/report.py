"""The run report: report.md, report.html, loss.png and metrics.json under ``{output_dir}/eval``."""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Any

from sft_ray.sources import shown_uri


def loss_plot(history: list[dict[str, Any]], path: Path) -> Path | None:
    """Train and eval loss against optimizer step (800x450 PNG)."""
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", color="#1f77b4")
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss", color="#d62728")
    values = [v for _, v in train + evals if v > 0]
    if values and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (trained tokens)")
    ax.set_title("sft-ray: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _facts(summary: dict[str, Any] | None) -> list[tuple[str, str]]:
    if not summary:
        return []
    cfg = summary.get("config", {})
    plan, m = summary.get("plan", {}), summary.get("metrics", {})
    tr = summary.get("data", {}).get("train", {})
    ev = summary.get("data", {}).get("eval", {})
    facts = [
        ("model", shown_uri(str(cfg.get("model", {}).get("name", "?")))),
        ("train data", ", ".join(shown_uri(str(s)) for s in cfg.get("data", {}).get("train", []))),
        ("train rows / tokens (trained)", f"{tr.get('rows', '?')} / {tr.get('tokens', '?')} ({tr.get('trained_tokens', '?')})"),
        ("bad / truncated / dropped rows", f"{tr.get('bad', 0)} / {tr.get('truncated', 0)} / {tr.get('dropped_too_long', 0)}"),
        ("eval data", str(plan.get("eval_source", "-"))),
        ("eval rows", str(ev.get("rows", "-"))),
        ("rows per optimizer step", f"{plan.get('rows_per_step', '?')} = {cfg.get('train', {}).get('num_workers')} workers x "
                                    f"{cfg.get('train', {}).get('per_device_batch_size')} rows x accum "
                                    f"{cfg.get('train', {}).get('grad_accum')}"
                                    f"{' (packed)' if cfg.get('data', {}).get('packing') else ''}"),
        ("DeepSpeed ZeRO stage", str(cfg.get("deepspeed", {}).get("zero_stage"))),
        ("optimizer steps", str(plan.get("max_steps", "?"))),
        ("train time", f"{summary.get('train_seconds', '?')} s"),
        ("throughput", f"{m.get('avg_tokens_per_s', 0):.1f} tokens/s (non-pad, all workers)"),
        ("final train loss / eval loss", f"{_num(m.get('loss'))} / {_num(m.get('eval_loss'))}"),
    ]
    return facts


def _num(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "-"


def _fence(text: str) -> list[str]:
    """Model text in report.md as a fenced block, with a fence longer than any run of backticks in it: no
    Markdown or HTML in an answer (``</table>``, ``<script>``, ``# ``) takes effect."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence, text, fence]


def finite(obj: Any) -> Any:
    """A copy where NaN and infinities are None: metrics.json stays JSON that strict parsers read."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def score_rows(res: dict[str, Any]) -> list[list[str]]:
    """The before/after table's rows (cells as shown, under ``HEADER``): every score with its bootstrap 95%
    intervals and paired test, then the eval loss and perplexity of both models. Shared by the report and the
    model card, so both show the same figures."""
    rows = []
    n = res["n_eval"]
    for metric, s in res["scores"].items():
        t = s["paired_test"]
        rows.append([
            metric,
            f"{s['before']:.3f}" + (f" ({s['before_correct']}/{n})" if s.get("binary") else ""),
            f"{s['after']:.3f}" + (f" ({s['after_correct']}/{n})" if s.get("binary") else ""),
            f"{s['before_ci95'][0]:.3f}–{s['before_ci95'][1]:.3f}",
            f"{s['after_ci95'][0]:.3f}–{s['after_ci95'][1]:.3f}",
            f"{t.get('improved', '-')}", f"{t.get('regressed', '-')}", f"{t['p_value']:.2g} ({t['test']})",
        ])
    for name, v in res.get("loss", {}).items():
        rows.append([name, f"{v['before']:.4f}", f"{v['after']:.4f}", "", "", "", "", ""])
    return rows


HEADER = ["metric", "before", "after", "before 95% CI", "after 95% CI", "improved", "regressed", "p (paired test)"]


def score_table(res: dict[str, Any]) -> list[str]:
    """The before/after table as Markdown lines (none when there is nothing to show)."""
    rows = score_rows(res)
    if not rows:
        return []
    return ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(res: dict[str, Any], summary: dict[str, Any] | None, has_plot: bool) -> str:
    out = ["# sft-ray: before / after", ""]
    facts = _facts(summary)
    if facts:
        out += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in facts] + [""]
    if has_plot:
        out += ["![loss](loss.png)", ""]
    out += [f"Held-out rows scored: {res['n_eval']} from {res.get('eval_data', '?')} (greedy decoding; both models "
            f"get the same prompts, rendered with {res.get('prompt_template', 'the training chat template')})", ""]
    if res.get("not_scored"):
        out += [f"Not scored: {res['not_scored']}.", ""]
    table = score_table(res)
    if table:
        out += table + [""]
    out += ["## Probe questions", ""]
    for p in res["probes"]:
        out += ["### Question", "", *_fence(p["question"]), "", "**before:**", "", *_fence(p["before"]), "",
                "**after:**", "", *_fence(p["after"]), ""]
    if res.get("examples"):
        out += ["## Held-out examples", ""]
        for i, ex in enumerate(res["examples"], 1):
            out += [f"### Example {i}", ""]
            for k in ("prompt", "reference", "before", "after"):
                out += [f"**{k}:**", "", *_fence(ex[k]), ""]
    return "\n".join(out) + "\n"


def to_html(res: dict[str, Any], summary: dict[str, Any] | None, has_plot: bool) -> str:
    e = html.escape
    css = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
           "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;"
           "vertical-align:top}th{background:#f3f3f3}.pair td{width:50%;white-space:pre-wrap}img{max-width:100%}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>sft-ray report</title><style>{css}</style>"
             "</head><body><h1>sft-ray: before / after</h1>"]
    facts = _facts(summary)
    if facts:
        parts.append("<table>" + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in facts) + "</table>")
    if has_plot:
        parts.append("<img src='loss.png' alt='train and eval loss'>")
    parts.append(f"<p>Held-out rows scored: {res['n_eval']} from {e(str(res.get('eval_data', '?')))} (greedy "
                 f"decoding; both models get the same prompts, rendered with "
                 f"{e(res.get('prompt_template', 'the training chat template'))})</p>")
    if res.get("not_scored"):
        parts.append(f"<p>Not scored: {e(res['not_scored'])}.</p>")
    rows = score_rows(res)
    if rows:
        parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in HEADER) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
        parts.append("</table>")
    parts.append("<h2>Probe questions</h2><table class='pair'><tr><th>before</th><th>after</th></tr>")
    for p in res["probes"]:
        parts.append(f"<tr><th colspan='2'>{e(p['question'])}</th></tr>"
                     f"<tr><td>{e(p['before'])}</td><td>{e(p['after'])}</td></tr>")
    parts.append("</table>")
    if res.get("examples"):
        parts.append("<h2>Held-out examples</h2><table><tr><th>prompt</th><th>reference</th><th>before</th>"
                     "<th>after</th></tr>")
        parts += [f"<tr><td>{e(x['prompt'])}</td><td>{e(x['reference'])}</td><td>{e(x['before'])}</td>"
                  f"<td>{e(x['after'])}</td></tr>" for x in res["examples"]]
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write(out_dir: Path, res: dict[str, Any], summary: dict[str, Any] | None = None,
          history: list[dict[str, Any]] | None = None) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = loss_plot(history or [], out_dir / "loss.png")
    payload = {**res, "run": {k: v for k, v in (summary or {}).items() if k != "eval"}}
    paths = {
        "metrics": out_dir / "metrics.json",
        "markdown": out_dir / "report.md",
        "html": out_dir / "report.html",
    }
    paths["metrics"].write_text(json.dumps(finite(payload), indent=1, ensure_ascii=False, default=str, allow_nan=False))
    paths["markdown"].write_text(markdown(res, summary, plot is not None), encoding="utf-8")
    paths["html"].write_text(to_html(res, summary, plot is not None), encoding="utf-8")
    if plot:
        paths["plot"] = plot
    return paths

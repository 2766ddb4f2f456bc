"""``sft-ray train | eval | generate``: one typed config (YAML + key=value overrides) per command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from sft_ray.config import ConfigError, load_config


def _quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def cmd_train(args) -> int:
    from sft_ray.cluster import say
    from sft_ray.train import run

    cfg = load_config(args.config, args.overrides)  # fails here, before Ray starts, on any bad key
    from sft_ray.modeling import resolve_model_path

    resolve_model_path(cfg.model.name)  # and on a model folder that is not there
    if cfg.eval.enabled:
        cfg.eval.check_scorers()
    if cfg.serve.after_train:  # a key variable that is unset would otherwise be found after the whole run
        from sft_ray.serve.deploy import api_key_from_env

        api_key_from_env(cfg.serve)
    t0 = time.time()
    try:
        summary = run(cfg)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (ray job stop, a scheduler): Ray Train stops the workers
        say(f"stopped; the checkpoints in {cfg.storage_path}/{cfg.train.name} are kept: run the same command "
            "to resume (train.resume=false starts over)")
        return 130
    m = summary["metrics"]
    when = "earlier (this run had already finished)" if summary.get("resumed_finished_run") else \
        f"in {summary['train_seconds']}s"
    say(f"trained {m.get('step', summary['plan']['max_steps'])} steps {when} (final loss "
        f"{m.get('loss', float('nan')):.4f}, {m.get('avg_tokens_per_s', 0):.1f} tokens/s); model at {summary['model_dir']}")
    from sft_ray.sources import shown_config

    summary["config"] = shown_config(cfg.model_dump(mode="json"))  # train_summary.json: no URI credentials
    if cfg.eval.enabled:
        summary["eval"] = _evaluate(cfg, summary["model_dir"], summary)  # writes the model card, with the scores
    else:
        _write_card(cfg, summary["model_dir"], summary, None)
    if cfg.export.to:  # last, so that the copy has the model card with the scores
        from sft_ray.export import publish
        from sft_ray.modeling import ModelError

        try:
            summary["exported_to"] = publish(Path(summary["model_dir"]), cfg.export.to)
        except OSError as e:
            raise ModelError(f"export.to={cfg.export.to}: the copy failed: {e}. The model is complete in "
                             f"{summary['model_dir']}; copy it from there") from None
        say(f"model folder copied to {cfg.export.to}")
    summary["total_seconds"] = round(time.time() - t0, 1)
    Path(cfg.output_dir, "train_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    say(f"done in {summary['total_seconds']}s; summary in {Path(cfg.output_dir, 'train_summary.json')}")
    if cfg.serve.after_train:
        return _serve_forever(summary["model_dir"], cfg)
    return 0


def _serve_forever(model_dir: str, cfg) -> int:
    from ray import serve

    from sft_ray import serve as sft_serve
    from sft_ray.cluster import say

    key = sft_serve.api_key_from_env(cfg.serve)
    try:  # Ctrl-C (SIGINT) stops cleanly, also while the app is still starting
        url = sft_serve.start(model_dir, cfg, key)
        say(f"serving {model_dir} at {url} ({'API key required' if key else 'no API key'}); Ctrl-C stops")
        while True:  # short sleeps: the kernel may hand Ctrl-C to one of Ray's threads, and then only a main
            time.sleep(0.5)  # thread that wakes up runs Python's handler (a long sleep once ignored it for 60 s+)
    except KeyboardInterrupt:
        say("stopping")
        serve.shutdown()
    return 0


def cmd_serve(args) -> int:
    overrides = list(args.overrides)
    if args.host:
        overrides.append(f"serve.host={args.host}")
    if args.port:
        overrides.append(f"serve.port={args.port}")
    if args.api_key_env:
        overrides.append(f"serve.api_key_env={args.api_key_env}")
    cfg = load_config(args.config, overrides)
    return _serve_forever(args.model_dir, cfg)


def _evaluate(cfg, model_dir: str, summary: dict | None = None) -> dict:
    from sft_ray import evaluate
    from sft_ray.cluster import init_ray, say
    from sft_ray.modeling import resolve_model_path
    from sft_ray.train import resolve_data

    init_ray(cfg)
    _, eval_specs = resolve_data(cfg)
    say("evaluating the base and the tuned model on the same prompts ...")
    res = evaluate.compare(resolve_model_path(cfg.model.name), model_dir, eval_specs, cfg,
                           Path(cfg.output_dir, "eval"), summary)
    sys.stdout.write(evaluate.render_console(res) + "\n")
    say(f"report: {Path(cfg.output_dir, 'eval', 'report.md')} (also report.html, loss.png, metrics.json)")
    _write_card(cfg, model_dir, summary, res)
    return res["scores"]


def _write_card(cfg, model_dir: str, summary: dict | None, results: dict | None) -> None:
    """The model card (README.md) of the run's own model folder, with the scores when there are any."""
    from sft_ray import model_card
    from sft_ray.cluster import say

    own = Path(cfg.output_dir, "model")
    if Path(model_dir).resolve() != own.resolve():  # `sft-ray eval --model OTHER`: not this run's folder
        say(f"model card not written: {model_dir} is not this run's model folder ({own})")
        return
    path = model_card.write(cfg, summary, results, own)
    say(f"model card: {path} (publish the folder with `hf upload ORG/NAME {own}`)")


def cmd_eval(args) -> int:
    config = args.config
    if Path(config).is_dir():  # a run directory: its saved config.yaml
        config = str(Path(config, "config.yaml"))
    cfg = load_config(config, args.overrides)
    cfg.eval.check_scorers()
    model_dir = args.model or str(Path(cfg.output_dir, "model"))
    from sft_ray.modeling import is_model_dir, resolve_model_path

    if "://" in model_dir:  # e.g. export.to or a run's final_model in a bucket: a checked local copy
        model_dir = resolve_model_path(model_dir)
    if not is_model_dir(model_dir):
        raise SystemExit(f"no trained model at {model_dir} (run `sft-ray train` first or pass --model)")
    summary_file = Path(cfg.output_dir, "train_summary.json")
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    if summary is not None:
        from sft_ray.sources import shown_config

        summary.setdefault("config", shown_config(cfg.model_dump(mode="json")))
    _evaluate(cfg, model_dir, summary)
    return 0


def cmd_data_preview(args) -> int:
    """Rendered examples with the trained tokens marked, plus counts; or --json rows as the trainer sees them."""
    from sft_ray import data
    from sft_ray.modeling import load_tokenizer
    from sft_ray.cluster import init_ray
    from sft_ray.template import IGNORE_INDEX
    from sft_ray.train import resolve_data

    cfg = load_config(args.config, args.overrides)
    train_specs, eval_specs = resolve_data(cfg)
    init_ray(cfg)
    data.warm_workers()
    ds = data.splits(train_specs, eval_specs, cfg)[1 if args.split == "eval" else 0]
    if ds is None:
        raise ConfigError("no eval data configured (set data.eval or data.eval_fraction)")
    ds = ds.materialize()  # one tokenization for the rows shown and the counts
    st = data.validate(ds, args.split)
    if st.rows == 0:  # nothing to show: say which files, and fail
        data.check(st, args.split, "skip", eval_specs if args.split == "eval" and eval_specs else train_specs)
    rows = data.trainable(ds, cfg.data.on_bad_rows, cfg.data.tokenize_cpus)
    if args.json:
        it = rows.iter_rows() if args.n == 0 else rows.limit(args.n).iter_rows()
        for r in it:
            sys.stdout.write(json.dumps({"input_ids": [int(x) for x in r["input_ids"]],
                                         "labels": [int(x) for x in r["labels"]]}) + "\n")
        return 0
    tok = load_tokenizer(cfg.model)
    color = sys.stdout.isatty()
    on, off = ("\033[1;32m", "\033[0m") if color else ("[[", "]]")
    for i, r in enumerate(rows.limit(args.n).iter_rows()):
        out, trained = [], False
        for t, lab in zip(r["input_ids"], r["labels"]):
            now = lab != IGNORE_INDEX
            if now != trained:
                out.append(on if now else off)
                trained = now
            out.append(tok.decode([int(t)]))
        if trained:
            out.append(off)
        sys.stdout.write(f"--- example {i + 1} ({len(r['input_ids'])} tokens; trained tokens between {on}{off}) ---\n")
        sys.stdout.write("".join(out) + "\n")
    sys.stdout.write(f"--- {args.split} data: {st.summary()}\n")
    for err in st.errors:
        sys.stdout.write(f"  bad row: {err}\n")
    return 0


def cmd_generate(args) -> int:
    import torch

    from sft_ray.modeling import load_for_inference, stop_token_ids

    model, tok = load_for_inference(args.model_dir, args.trust_remote_code, float32=True)
    text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                   add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False).to(model.device)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=stop_token_ids(tok, model.generation_config))
    print(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sft-ray", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="fine-tune, export, and compare before/after")
    t.add_argument("config", help="YAML config (e.g. jobs/configs/local-cpu.yaml)")
    t.add_argument("overrides", nargs="*", help="dotted key=value, e.g. train.max_steps=20")
    t.set_defaults(fn=cmd_train)
    e = sub.add_parser("eval", help="compare the base model and a trained model")
    e.add_argument("config", help="YAML config, or a run directory (its config.yaml)")
    e.add_argument("overrides", nargs="*")
    e.add_argument("--model", help="trained model folder (default: {output_dir}/model)")
    e.set_defaults(fn=cmd_eval)
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP API for a model folder on Ray Serve")
    s.add_argument("model_dir", help="exported model folder (or 'embedded')")
    s.add_argument("overrides", nargs="*", help="serve.* keys, e.g. serve.max_replicas=2")
    s.add_argument("--config", help="YAML config (optional)")
    s.add_argument("--host", help="default 127.0.0.1")
    s.add_argument("--port", type=int, help="default 8000")
    s.add_argument("--api-key-env", help="environment variable holding the API key clients must send")
    s.set_defaults(fn=cmd_serve)
    d = sub.add_parser("data", help="inspect the data pipeline")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    pv = dsub.add_parser("preview", help="rendered examples with trained tokens marked, and counts")
    pv.add_argument("config")
    pv.add_argument("overrides", nargs="*")
    pv.add_argument("--n", type=int, default=3, help="rows to show (0 = all, with --json)")
    pv.add_argument("--json", action="store_true", help="one {input_ids, labels} object per row, -100 = masked")
    pv.add_argument("--split", choices=["train", "eval"], default="train")
    pv.set_defaults(fn=cmd_data_preview)
    g = sub.add_parser("generate", help="greedy answer from a model folder ('embedded' = the default model)")
    g.add_argument("model_dir")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--trust-remote-code", action="store_true")
    g.set_defaults(fn=cmd_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow options (sft-ray serve DIR --port 9000 serve.max_replicas=2)
    bad = [x for x in extra if "=" not in x or x.startswith("-")]
    if bad or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    _quiet()
    from sft_ray.data import DataError
    from sft_ray.evaluate import EvalError
    from sft_ray.model_card import ModelCardError
    from sft_ray.modeling import ModelError
    from sft_ray.plan import PlanError
    from sft_ray.sources import SourceError

    try:
        return args.fn(args)
    except ConfigError as e:
        _last_words(str(e))
        return 2
    # the user's data, model or folders, not a bug: no traceback
    except (DataError, SourceError, ModelError, PlanError, ModelCardError, EvalError) as e:
        _last_words(str(e))
        return 1
    except Exception as e:
        from sft_ray.data import find_data_error

        found = find_data_error(e)
        if found is None:
            raise
        # a bad row met while streaming (inside a Ray Data task on a worker): the trace stays in the log,
        # and the file, line and reason are the last line, on their own
        import traceback

        traceback.print_exc()
        _last_words(found)
        return 1


def _last_words(message: str) -> None:
    """The reason a run stopped, as the last thing printed: Ray is shut down first, so that no log line it
    forwards from the workers lands after it."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    sys.stdout.flush()
    sys.stderr.write(f"sft-ray: {message}\n")


if __name__ == "__main__":
    sys.exit(main())

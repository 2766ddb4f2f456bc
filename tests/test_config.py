import os
import re
import time
from pathlib import Path

import pytest

from sft_ray.config import ConfigError, load_config


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  learning_rate: 1e-4\n  num_workers: 4\ndeepspeed:\n  zero_stage: 3\n")
    cfg = load_config(p, ["train.max_steps=7", "data.train=[a.jsonl, b.parquet]", "deepspeed.offload_params=true",
                          "train.use_gpu=false", "model.name=/models/x"])
    assert cfg.train.learning_rate == pytest.approx(1e-4)  # YAML 1.1 would read '1e-4' as a string
    assert cfg.train.num_workers == 4 and cfg.train.max_steps == 7
    assert cfg.data.train == ["a.jsonl", "b.parquet"]
    assert cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.offload_params is True
    assert cfg.train.use_gpu is False and cfg.model.name == "/models/x"
    assert cfg.model.trust_remote_code is False


def test_single_string_becomes_list():
    assert load_config(None, ["data.train=x.jsonl"]).data.train == ["x.jsonl"]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.lerning_rate=1", "train.lerning_rate: unknown key; allowed under train: name, max_steps"),
        ("bogus=1", "bogus: unknown key; allowed under the top level: model, data, train"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage: Input should be 0, 1, 2 or 3"),
        ("train.max_steps=abc", "train.max_steps: Input should be a valid integer"),
        ("train.num_workers=0", "train.num_workers: Input should be greater than 0"),
        ("data.on_bad_rows=ignore", "data.on_bad_rows: Input should be 'error' or 'skip'"),
        ("deepspeed.offload_params=true", "offload_params needs deepspeed.zero_stage=3"),
        ("train.max_steps", "is not key=value"),
        # accepted before and then ignored or misapplied: refused here, on the driver, before Ray starts
        ("model.chat_template=qwen", "model.chat_template: Value error, must be 'chatml' or a Jinja chat template"),
        ("train.lr_scheduler=cosin", "train.lr_scheduler: Input should be 'linear', 'cosine'"),
        ("train.lr_scheduler=cosine_with_min_lr", "train.lr_scheduler: Input should be"),
        ("train.report_to=tensorbord", "unknown 'tensorbord'; known: none, all,"),
        ("seed=-1", "seed: Input should be greater than or equal to 0"),
        ("seed=4294967296", "seed: Input should be less than 4294967296"),
        ("lora.target_modules=[all-linear, q_proj]", "'all-linear' or a list of module names"),
    ],
)
def test_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("train:\n  per_device_batch_size: big\n")
    with pytest.raises(ConfigError, match=r"train\.per_device_batch_size"):
        load_config(wrong)


def test_shipped_configs_validate():
    for path in ("jobs/configs/local-cpu.yaml", "jobs/configs/qwen3-0.6b-zero3.yaml"):
        cfg = load_config(path)
        assert cfg.train.num_workers >= 1
    assert load_config("jobs/configs/qwen3-0.6b-zero3.yaml").deepspeed.zero_stage == 3


def test_cli_rejects_bad_key_before_ray_starts(capsys):
    from sft_ray.cli import main

    assert main(["train", "jobs/configs/local-cpu.yaml", "train.nope=1"]) == 2
    assert "train.nope: unknown key" in capsys.readouterr().err


def test_eval_data_follows_an_overridden_train_set():
    shipped = "jobs/configs/local-cpu.yaml"  # data.train: generated, data.eval: generated
    cfg = load_config(shipped, ["data.train=my.jsonl"])
    assert cfg.data.eval == [] and cfg.data.eval_fraction == pytest.approx(0.1)
    assert cfg.notes and "holding out a seeded 10%" in cfg.notes[0] and "generated" in cfg.notes[0]
    # a built-in task is evaluated on its own held-out split
    cfg = load_config(shipped, ["data.train=generated:reverse"])
    assert cfg.data.eval == ["generated:reverse"] and cfg.data.eval_fraction == 0
    # naming the eval data (or the fraction) keeps it as given
    assert load_config(shipped, ["data.train=my.jsonl", "data.eval=their.jsonl"]).data.eval == ["their.jsonl"]
    cfg = load_config(shipped, ["data.train=my.jsonl", "data.eval_fraction=0.2"])
    assert cfg.data.eval == [] and cfg.data.eval_fraction == pytest.approx(0.2) and "replaces" in cfg.notes[0]
    with pytest.raises(ConfigError, match="both set"):  # the two ways at once are one too many
        load_config(None, ["data.eval=a.jsonl", "data.eval_fraction=0.1"])
    # nothing changes when data.train is not overridden, or overridden with the file's own value
    assert load_config(shipped, []).data.eval == ["generated"]
    assert load_config(shipped, ["data.train=generated"]).data.eval == ["generated"]


def test_unknown_builtin_task_is_named():
    from sft_ray.train import resolve_data

    with pytest.raises(ConfigError, match="unknown built-in task 'nope'"):
        resolve_data(load_config(None, ["data.train=generated:nope", "output_dir=/tmp/sft-ray-test-x"]))


def test_run_identity_ignores_only_result_free_keys():
    from sft_ray import identity

    a = identity.make(load_config(None, []), "d1", 10)
    same = identity.make(load_config(None, ["eval.max_examples=3", "train.save_steps=7", "serve.port=9000",
                                            "output_dir=elsewhere", "train.max_failures=2"]), "d1", 10)
    assert identity.differences(a, same) == []
    other = identity.make(load_config(None, ["train.learning_rate=1e-3", "data.packing=true"]), "d1", 10)
    assert [d.split(":")[0] for d in identity.differences(a, other)] == ["data.packing", "train.learning_rate"]
    assert "tokenized training data" in identity.differences(a, identity.make(load_config(None, []), "d2", 10))[0]
    # a run recorded by an older sft-ray lacks keys added since: at their defaults they change nothing
    older = {**a, "config": {k: v for k, v in a["config"].items() if k != "data.train_reasoning"}}
    assert identity.differences(older, a) == []
    off = identity.make(load_config(None, ["data.train_reasoning=false"]), "d1", 10)
    assert identity.differences(older, off) == ["data.train_reasoning: null -> false"]


@pytest.mark.parametrize("overrides, needle", [
    (["deepspeed.enabled=false", "deepspeed.zero_stage=3"], "deepspeed.enabled=false trains without DeepSpeed, so "
                                                             "zero_stage would be ignored"),
    (["deepspeed.enabled=false", "deepspeed.zero_stage=3", "deepspeed.offload_params=true"],
     "so zero_stage, offload_params would be ignored"),
    (["train.lr_scheduler=constant", "train.warmup_ratio=0.1"], "constant has no warmup"),
    (["serve.backend=vllm", "serve.gpus_per_replica=0.5"], "takes whole GPUs per replica"),
])
def test_combinations_that_would_be_ignored_are_refused(overrides, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(None, overrides)


def test_values_are_what_the_user_typed():
    """A template named in any case is ChatML; module names as one string are a list (peft would read the string
    as one regex); a number typed for a text key is that text; ZeRO settings left alone with DeepSpeed off."""
    cfg = load_config(None, ["model.chat_template=ChatML", "lora.target_modules=q_proj, v_proj", "train.name=2024",
                             "serve.model_name=123", "deepspeed.enabled=false"])
    assert cfg.model.chat_template == "chatml" and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.name == "2024" and cfg.serve.model_name == "123" and not cfg.deepspeed.enabled
    assert load_config(None, ["lora.target_modules=[all-linear]"]).lora.target_modules == "all-linear"
    assert load_config(None, ["model.chat_template={{ messages }}"]).model.chat_template == "{{ messages }}"


def test_vllm_gets_its_gpus_and_batch_from_serve_keys():
    from sft_ray.serve.deploy import vllm_engine_kwargs

    sc = load_config(None, ["serve.backend=vllm", "serve.gpus_per_replica=2", "serve.max_running=48"]).serve
    assert vllm_engine_kwargs(sc) == {"trust_remote_code": False, "max_num_seqs": 48, "tensor_parallel_size": 2,
                                      "enable_prefix_caching": True}
    assert not vllm_engine_kwargs(load_config(None, ["serve.prefix_cache_tokens=0"]).serve)["enable_prefix_caching"]
    assert vllm_engine_kwargs(load_config(None, ["serve.backend=vllm"]).serve, True)["tensor_parallel_size"] == 1


def test_autoscaling_targets_a_replicas_capacity():
    from sft_ray.serve.deploy import deployment_options

    def target(*o):
        sc = load_config(None, ["serve.min_replicas=1", "serve.max_replicas=3", *o]).serve
        return deployment_options(sc)["autoscaling_config"]["target_ongoing_requests"]

    assert target("serve.max_running=24") == 24  # continuous batching: the running batch
    assert target("serve.continuous_batching=false", "serve.max_batch_size=4") == 4  # one generate call
    assert deployment_options(load_config(None, ["serve.min_replicas=2", "serve.max_replicas=2"]).serve) == {
        "ray_actor_options": {"num_cpus": 1.0, "num_gpus": 0.0}, "num_replicas": 2}


@pytest.mark.parametrize("argv", [
    ["train", "jobs/configs/local-cpu.yaml", "serve.after_train=true", "serve.api_key_env=SFT_RAY_UNSET_KEY"],
    ["serve", "{model}", "--api-key-env", "SFT_RAY_UNSET_KEY"],
])
def test_a_key_variable_that_is_unset_stops_every_command_before_ray_starts(argv, tiny_model_dir, monkeypatch, capsys):
    """Fails closed, and at once: `train ... serve.after_train=true` used to find the missing key after the run."""
    import ray

    from sft_ray.cli import main

    monkeypatch.delenv("SFT_RAY_UNSET_KEY", raising=False)
    t0 = time.time()
    assert main([a.format(model=tiny_model_dir) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "api_key_env names 'SFT_RAY_UNSET_KEY', which is unset or empty" in err, err
    assert not ray.is_initialized() and time.time() - t0 < 20


def test_jobs_serve_py_refuses_an_unset_key_variable(tiny_model_dir):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "SFT_RAY_UNSET_KEY"}
    proc = subprocess.run([sys.executable, "jobs/serve.py", "--model-dir", str(tiny_model_dir), "--api-key-env",
                           "SFT_RAY_UNSET_KEY"], capture_output=True, text=True, timeout=120, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "api_key_env names 'SFT_RAY_UNSET_KEY', which is unset or empty" in proc.stdout + proc.stderr


@pytest.mark.parametrize("override, needle", [
    ("model.attn_implementation=flash_attn2", "'flash_attn2' is not an attention implementation transformers knows"),
    ("eval.scorers=[nope]", "'nope' must look like package.module:function"),
])
def test_names_that_would_fail_on_the_workers_are_refused_at_load(override, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(None, [override])
    for ok in ("sdpa", "flash_attention_2", "kernels-community/flash-attn", "paged|eager"):
        assert load_config(None, [f"model.attn_implementation={ok}"]).model.attn_implementation == ok


def test_a_scorer_that_does_not_import_stops_train_and_eval_before_ray_starts(capsys):
    import ray

    from sft_ray.cli import main

    for argv in (["train", "jobs/configs/local-cpu.yaml"], ["eval", "jobs/configs/local-cpu.yaml"]):
        assert main([*argv, "eval.scorers=[no_such_module_x:f]"]) == 2
        err = capsys.readouterr().err
        assert "eval.scorers: 'no_such_module_x:f' cannot be used: ModuleNotFoundError" in err, err
    assert main(["train", "jobs/configs/local-cpu.yaml", "eval.scorers=[sft_ray.evaluate:no_such_fn]"]) == 2
    assert "AttributeError" in capsys.readouterr().err
    assert not ray.is_initialized()
    load_config(None, ["eval.scorers=[sft_ray.evaluate:token_f1]"]).eval.check_scorers()  # a real one passes

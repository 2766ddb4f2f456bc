"""Building and starting the Serve application: replicas and resources from ``serve.*``, the API key from
the environment (fail closed), the entry point for Serve config files, and the vLLM switch for GPU clusters
(ray.serve.llm's OpenAI ingress behind ``guard.Guard``: the same key, body and max_tokens rules)."""

import hashlib
from typing import Any

from ray import serve

from sft_ray.serve.app import OpenAIServer, ServeSettings


def build(model_dir: str, serve_cfg, trust_remote_code: bool = False, api_key: str | None = None):
    """The Serve application for ``model_dir`` (replicas, autoscaling and resources from the config)."""
    from pathlib import Path

    settings = ServeSettings(
        model_name=serve_cfg.model_name or Path(model_dir).name,
        max_tokens_limit=serve_cfg.max_tokens_limit,
        default_max_tokens=serve_cfg.default_max_tokens,
        max_batch_size=serve_cfg.max_batch_size,
        batch_wait_s=serve_cfg.batch_wait_s,
        continuous_batching=serve_cfg.continuous_batching,
        max_running=serve_cfg.max_running,
        prefix_cache_tokens=serve_cfg.prefix_cache_tokens,
        max_body_bytes=serve_cfg.max_body_bytes,
        # only a hash of the key travels to the replicas (and so into Serve's config and logs)
        api_key_sha256=key_sha256(api_key),
        trust_remote_code=trust_remote_code,
        base_model=serve_cfg.base_model,
    )
    return OpenAIServer.options(**deployment_options(serve_cfg)).bind(model_dir, settings.__dict__)


def deployment_options(serve_cfg) -> dict[str, Any]:
    """Resources and replicas of the transformers backend's deployment, from ``serve.*``."""
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": serve_cfg.cpus_per_replica, "num_gpus": serve_cfg.gpus_per_replica},
    }
    if serve_cfg.max_replicas > serve_cfg.min_replicas:
        options["autoscaling_config"] = {"min_replicas": serve_cfg.min_replicas, "max_replicas": serve_cfg.max_replicas,
                                         # a replica's capacity: its running batch, or one generate call
                                         "target_ongoing_requests": serve_cfg.max_running if serve_cfg.continuous_batching
                                         else serve_cfg.max_batch_size}
    else:
        options["num_replicas"] = serve_cfg.min_replicas
    return options


def app_builder(args: dict[str, str]):
    """Entry for Serve config files: ``import_path: sft_ray.serve:app_builder`` with ``args: {model_dir: ...}``.

    Other args are ``serve.*`` config keys (e.g. ``max_tokens_limit: 256``, ``backend: vllm``); the API key is
    read from the environment variable named by ``api_key_env``, and the build fails when that variable is unset
    or empty, for either backend.
    """
    from sft_ray.config import ServeConfig

    args = dict(args)
    model_dir = args.pop("model_dir")
    from pydantic import TypeAdapter, ValidationError

    try:  # true/false, yes/no, 1/0 as YAML and pydantic read them; anything else is refused, not taken for false
        trust = TypeAdapter(bool).validate_python(args.pop("trust_remote_code", False))
    except ValidationError:
        raise ValueError("args.trust_remote_code must be true or false") from None
    cfg = ServeConfig.model_validate(args)
    key = api_key_from_env(cfg)
    if cfg.backend == "vllm":
        check_gpus(cfg)
        return build_vllm(model_dir, cfg, trust, key)
    return build(model_dir, cfg, trust, key)


def check_gpus(serve_cfg) -> None:
    """vLLM needs a GPU per replica: refuse before deploying, with the counts, where the cluster cannot hold the
    replicas it starts with."""
    import ray

    from sft_ray.config import ConfigError

    if not ray.is_initialized():
        ray.init(address="auto")
    gpus = ray.cluster_resources().get("GPU", 0)
    each = max(serve_cfg.gpus_per_replica, 1)
    need = serve_cfg.min_replicas * each  # every replica it starts with; one it cannot place would wait forever
    if gpus < need:
        raise ConfigError(f"serve.backend=vllm needs a GPU per replica; this cluster has {gpus:g} GPUs, and "
                          f"serve.min_replicas={serve_cfg.min_replicas} x {each:g} GPU(s) each need {need:g}. "
                          "Use serve.backend=transformers (CPU or GPU), fewer replicas, or a GPU cluster")


def api_key_from_env(serve_cfg) -> str | None:
    """The API key named by ``api_key_env``, for every way of starting the app (CLI, config file). Fails closed:
    a config that names a key variable never serves without a key."""
    import os

    from sft_ray.config import ConfigError

    if not serve_cfg.api_key_env:
        return None
    key = os.environ.get(serve_cfg.api_key_env, "").strip()
    if not key:
        raise ConfigError(f"api_key_env names {serve_cfg.api_key_env!r}, which is unset or empty where the app is "
                          "built; set it (on a cluster, e.g. in the application's runtime_env), or leave "
                          "api_key_env out to serve without authentication")
    return key


def key_sha256(api_key: str | None) -> str | None:
    """What travels to the replicas instead of the key (and so into Serve's config and logs)."""
    return hashlib.sha256(api_key.encode()).hexdigest() if api_key else None


def guard_options(serve_cfg, api_key: str | None) -> dict[str, Any]:
    """``guard.Guard``'s settings from ``serve.*`` (only a hash of the key)."""
    return {"key_sha256": key_sha256(api_key),
            "max_body_bytes": serve_cfg.max_body_bytes, "max_tokens_limit": serve_cfg.max_tokens_limit,
            "default_max_tokens": serve_cfg.default_max_tokens}


def vllm_engine_kwargs(serve_cfg, trust_remote_code: bool = False) -> dict[str, Any]:
    """vLLM's engine settings from ``serve.*``: its batch (max_running), its GPUs per replica (tensor parallel),
    and its own prefix caching off when ``prefix_cache_tokens=0`` (vLLM sizes that cache from its KV blocks)."""
    return {"trust_remote_code": trust_remote_code, "max_num_seqs": serve_cfg.max_running,
            "tensor_parallel_size": max(1, int(serve_cfg.gpus_per_replica)),
            "enable_prefix_caching": serve_cfg.prefix_cache_tokens > 0}


def build_vllm(model_dir: str, serve_cfg, trust_remote_code: bool = False, api_key: str | None = None):
    """GPU clusters: vLLM through ray.serve.llm (``pip install sft-ray[vllm]``). ``build_openai_app`` wired by hand,
    as ray.serve.llm documents for a custom ingress, so that its FastAPI app gets ``Guard`` in front: the key,
    the body limit and max_tokens hold as on the transformers backend."""
    try:
        from ray.serve.llm import LLMConfig, build_llm_deployment
        from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress
    except ImportError as e:  # vllm missing
        raise RuntimeError("serve.backend=vllm needs vLLM on a GPU node: pip install 'sft-ray[vllm]'") from e
    from pathlib import Path

    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata

    from sft_ray.serve.guard import Guard

    try:  # Ray's own ingress app (its error handling, metrics and request ids), with Guard added outermost
        from ray.llm._internal.serve.core.ingress.ingress import init as ingress_app
    except ImportError:
        from fastapi import FastAPI as ingress_app
    app = ingress_app()
    app.add_middleware(Guard, **guard_options(serve_cfg, api_key))

    deployment: dict[str, Any] = {"autoscaling_config": {"min_replicas": serve_cfg.min_replicas,
                                                         "max_replicas": serve_cfg.max_replicas}}
    llm = LLMConfig(
        model_loading_config={"model_id": serve_cfg.model_name or Path(model_dir).name, "model_source": model_dir},
        deployment_config=deployment,
        engine_kwargs=vllm_engine_kwargs(serve_cfg, trust_remote_code),
    )
    ingress = make_fastapi_ingress(OpenAiIngress, app=app)
    return serve.deployment(ingress, **OpenAiIngress.get_deployment_options([llm])).bind(
        llm_deployments={llm.model_id: build_llm_deployment(llm)},
        model_cards={llm.model_id: to_model_metadata(llm.model_id, llm)},
    )


def start(model_dir: str, cfg, api_key: str | None = None) -> str:
    """Deploy on the Ray cluster (local if none) and return the OpenAI base URL."""
    from pathlib import Path

    from sft_ray.modeling import is_model_dir, resolve_model_path
    from sft_ray.cluster import init_ray

    sc = cfg.serve
    source = model_dir  # a URI stays one: each replica makes its own local copy, on whichever node it runs
    model_dir = resolve_model_path(model_dir)
    if not is_model_dir(model_dir):
        raise FileNotFoundError(f"{model_dir}: not a model folder (no config.json) nor a LoRA adapter "
                                "(no adapter_config.json)")
    if sc.backend == "vllm" and not Path(model_dir, "config.json").is_file():
        raise RuntimeError("serve.backend=vllm serves full models: export with export.merge_lora=true, "
                           "or use the transformers backend for an adapter")
    init_ray(cfg)
    if sc.backend == "vllm":
        check_gpus(sc)
    serve.start(http_options={"host": sc.host, "port": sc.port})
    if sc.backend == "vllm":
        application = build_vllm(model_dir, sc, cfg.model.trust_remote_code, api_key)
    else:
        application = build(source if "://" in source else model_dir, sc, cfg.model.trust_remote_code, api_key)
    serve.run(application, name="sft-ray", route_prefix="/", blocking=False)
    return f"http://{sc.host}:{sc.port}/v1"

"""Ray Serve: an OpenAI-compatible HTTP API for a trained model.

``protocol`` (the OpenAI wire format and its errors) -> ``engine`` (generation with transformers; ``batcher``,
its continuous batching; ``prefix_cache``, the KV of recurring prompt prefixes the batcher starts from;
``stops``, where a stop string ends an answer, for every path) -> ``app``
(the replica's routes, auth, limits, batching, streams) -> ``deploy`` (building and starting the app; the
``sft_ray.serve:app_builder`` entry of Serve config files). On GPU clusters ``serve.backend=vllm`` uses
ray.serve.llm instead of the transformers engine.
"""

from sft_ray.serve.deploy import api_key_from_env, app_builder, build, build_vllm, start
from sft_ray.serve.engine import Engine, GenRequest, GenResult

__all__ = ["Engine", "GenRequest", "GenResult", "api_key_from_env", "app_builder", "build", "build_vllm", "start"]

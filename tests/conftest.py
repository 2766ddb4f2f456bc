"""Shared fixtures: the real SmolLM2 tokenizer, a tiny random model built from a config, local Ray."""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")


@pytest.fixture(scope="session")
def smol_dir():
    from sft_ray.modeling import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def smol_tok(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tok):
    """A 2-layer Llama with random weights and the real tokenizer: fast enough to train in tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(
        vocab_size=len(smol_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=smol_tok.bos_token_id, eos_token_id=smol_tok.eos_token_id, pad_token_id=smol_tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d)
    smol_tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def ray_local():
    """Local Ray per test module, so the job-submission test can run its own `ray start` cluster alone."""
    import ray

    from sft_ray.config import Config
    from sft_ray.cluster import init_ray

    init_ray(Config())
    yield ray
    ray.shutdown()

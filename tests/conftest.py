"""Shared fixtures: one local Ray cluster per test session (loopback only), the tiny model's tokenizer."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local cluster started by this session and stopped by it (never someone else's)."""
    import ray

    from jobs.run.cluster import init_ray

    if ray.is_initialized():
        yield ray
        return
    init_ray(address="local", logical_cpus=16)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from actors.models import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture(scope="session")
def tiny_hd32_model(tmp_path_factory) -> str:
    """A tiny random Llama (2 layers) with head size 32 and SmolLM2's tokenizer, saved as an HF folder:
    vLLM's CPU attention needs head sizes >= 32, and the built-in ``tiny`` model has 16."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from actors.models import ensure_smollm2

    folder = tmp_path_factory.mktemp("tiny-llama-hd32")
    tokenizer = AutoTokenizer.from_pretrained(ensure_smollm2())
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=512)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)

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

    from jobs.cluster import init_ray

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

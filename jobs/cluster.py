"""Connecting a driver to Ray: an existing cluster (RAY_ADDRESS / --address / ray job submit) or an
embedded local one started on the spot."""

from __future__ import annotations

import os

import ray


def init_ray(address: str | None = None, *, namespace: str = "rayalign", logical_cpus: int | None = None,
             dashboard: bool = False, quiet: bool = True) -> dict:
    """Connect to ``address`` (or RAY_ADDRESS, as set by ``ray job submit``), else start a local cluster
    (``address="local"`` forces a local one).

    The local cluster declares at least 8 logical CPUs on small machines: the platform's actors
    mostly take turns (generate, then score, then train), so each can reserve a whole logical CPU
    while torch threads are set explicitly per actor.
    """
    if ray.is_initialized():
        return ray.cluster_resources()
    address = address or os.environ.get("RAY_ADDRESS")
    if address == "local":  # explicitly a fresh local cluster, even if RAY_ADDRESS is set
        address = None
    env_vars = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    for key in ("RAYALIGN_CACHE", "HF_HOME", "HF_HUB_OFFLINE"):
        if key in os.environ:
            env_vars[key] = os.environ[key]
    runtime_env = {"env_vars": env_vars}
    if address:
        ray.init(address=address, namespace=namespace, runtime_env=runtime_env, log_to_driver=not quiet)
    else:
        cpus = logical_cpus or max(os.cpu_count() or 1, 8)
        ray.init(num_cpus=cpus, namespace=namespace, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 runtime_env=runtime_env, log_to_driver=not quiet, _node_ip_address="127.0.0.1")
    return ray.cluster_resources()

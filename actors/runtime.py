"""Process-level setup shared by every actor: threads, seeds, device, quiet logs."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def configure_threads(torch_threads: int | None) -> int:
    """Ray sets OMP_NUM_THREADS to an actor's (often fractional) num_cpus, i.e. one thread.

    A model actor that is doing the work needs the cores, so the count is set explicitly.
    """
    if torch_threads:
        torch.set_num_threads(int(torch_threads))
        os.environ["OMP_NUM_THREADS"] = str(int(torch_threads))
    return torch.get_num_threads()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def pick_device() -> torch.device:
    """The GPU Ray assigned to this actor if any, else CPU."""
    if torch.cuda.is_available():
        try:
            import ray

            if ray.is_initialized() and ray.get_gpu_ids():
                return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES per actor
        except Exception:  # outside Ray: plain process
            pass
        return torch.device("cuda", 0)
    return torch.device("cpu")


def quiet_transformers() -> None:
    """Weight-loading progress bars from every actor drown the driver's progress output."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def rng_state() -> dict:
    """All RNG states of this process, for exact resume."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def describe_actor(role: str, device: torch.device | str = "cpu", **extra) -> dict:
    """Where this actor runs and what it holds (printed by drivers, checked by placement tests)."""
    import socket

    node_id = None
    try:
        import ray

        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
    except Exception:
        pass
    return {"role": role, "pid": os.getpid(), "host": socket.gethostname(), "node_id": node_id,
            "device": str(device), "torch_threads": torch.get_num_threads(), **extra}


def pin_to_cores(cores: list[int]) -> list[int]:
    """Confine every thread of this process (and threads it starts later) to ``cores`` (Linux).

    "One thread per actor" is otherwise loose: an engine's scheduler and tokenizer threads spill onto
    idle cores, so a one-actor baseline quietly uses more than one core.
    """
    import os

    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:  # a thread that ended meanwhile
            pass
    return sorted(os.sched_getaffinity(0))

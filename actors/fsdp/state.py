"""Trainer state on disk: the plain single-actor file and the DCP folder a sharded group writes.

A DCP folder loads into a group of any size (DCP reshards) and into a plain actor; a sharded group also
loads a plain actor's ``trainer_state.pt``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from actors.runtime import rng_state, set_rng_state

TRAINER_STATE = "trainer_state.pt"  # a single actor's model + optimizer + schedule + RNG
DCP_FOLDER = "dcp"                # sharded model + optimizer state, written by torch.distributed.checkpoint
TRAINER_META = "trainer_meta.pt"  # scheduler, step counters, RNG (written by rank 0, last)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        import torch.distributed as dist

        dist.barrier()


def save_sharded_state(actor, folder: str) -> None:
    """DCP checkpoint of the (sharded or plain) model and optimizer + ``trainer_meta.pt`` from rank 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder_path = Path(folder)
    folder_path.mkdir(parents=True, exist_ok=True)
    model_state, optimizer_state = get_state_dict(actor.model, actor.optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder_path / DCP_FOLDER))
    if getattr(actor, "rank", 0) == 0:
        meta = {"scheduler": actor.scheduler.state_dict(), "global_step": actor.global_step,
                "nonfinite_steps": actor.nonfinite_steps, "rng": rng_state(),
                "world_size": getattr(actor, "world_size", 1)}
        target = folder_path / TRAINER_META
        partial = target.with_name(target.name + ".partial")
        torch.save(meta, partial)
        os.replace(partial, target)
    _barrier()


def load_sharded_state(actor, folder: str) -> int:
    """Load a DCP checkpoint written by a group of any size into this actor's (sharded or plain)
    model and optimizer; DCP reshards to the current layout. Returns the global step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder_path = Path(folder)
    model_state, optimizer_state = get_state_dict(actor.model, actor.optimizer)  # the target layout
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(folder_path / DCP_FOLDER), no_dist=not _distributed())
    set_state_dict(actor.model, actor.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    meta = torch.load(folder_path / TRAINER_META, map_location="cpu",
                      weights_only=False)  # our own file: RNG states are numpy/python objects
    _restore_meta(actor, meta)
    return actor.global_step


def _restore_meta(actor, meta: dict) -> None:
    actor.scheduler.load_state_dict(meta["scheduler"])
    actor.global_step = int(meta["global_step"])
    actor.nonfinite_steps = int(meta["nonfinite_steps"])
    set_rng_state(meta["rng"])
    actor.model.eval()


def _load_plain_state_into_sharded(actor, folder: str) -> int:
    """A single actor's ``trainer_state.pt`` (full tensors, optimizer keyed by parameter index) into a
    sharded actor: every rank reads the file and keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    state = torch.load(Path(folder) / TRAINER_STATE, map_location="cpu", weights_only=False)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(actor.model, state["model"], options=options)
    # torch.optim numbers parameters in model.parameters() order (shared ones once), as named_parameters does.
    names = [name for name, p in actor.model.named_parameters() if p.requires_grad]
    optimizer = state["optimizer"]
    by_name = {"state": {names[i]: s for i, s in optimizer["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optimizer["param_groups"]]}
    set_optimizer_state_dict(actor.model, actor.optimizer, by_name, options=options)
    _restore_meta(actor, state)
    return actor.global_step

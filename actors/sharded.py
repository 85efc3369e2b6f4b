"""Sharded training groups: one model held by N Ray actors with FSDP2, driven like a single actor.

A ``ShardedActorGroup`` is a role (``policy``, ``critic``) whose N actors form one
``torch.distributed`` process group (NCCL on GPUs, gloo on CPU) over a 1-D device mesh, and hold one
model with ``fully_shard`` applied to each decoder layer and then to the root. The driver calls it
exactly like an ``ActorGroup``: ``call_all(method, ...)`` sends the call to every rank (arguments put
in the object store once) and returns a one-element list holding ONE ObjectRef for the combined
result, which a zero-CPU Ray task builds from the ranks' results.

Data parallelism, exact to the single-worker math:

- A call's micro-batches are exactly those a single actor would form (same ``micro_batch_size``
  over the same batch or PPO minibatch; DPO micro-batches hold whole pairs), dealt round-robin to
  the ranks. So the loss, a row-weighted mean of micro-batch means, is the same function of the
  weights whatever the world size. Each rank weights its micro-batch losses by rows over the GLOBAL
  row count and FSDP sums (not averages) the gradients over ranks, which gives the single-worker
  gradient. The norm for clipping is the global one (DTensor), and the non-finite check is
  all-reduced, so every rank takes (or skips) the same update.
- FSDP's all-gathers and reduce-scatters need every rank in every pass: a rank with fewer
  micro-batches than others runs idle passes (two tokens, loss weighted 0) to stay in step.
- Metrics are row-weighted sums all-reduced in the actors (rank 0's are returned); per-row outputs
  (``logprobs``, ``values``) are computed by the rank that owns the rows and put back in row order.
- Set ``micro_batch_size`` to at most rows / N so that no rank idles.

Weights: ``named_weights`` gathers full tensors one parameter at a time (never the whole model on an
accelerator) into CPU memory on rank 0; the group hands rank 0's ObjectRef to the driver, so
generators' ``update_weights`` take it unchanged. ``weight_sync_stats`` reports the gather time.

State: ``save_state`` writes a ``torch.distributed.checkpoint`` (DCP) folder of the sharded model and
optimizer states plus a small ``trainer_meta.pt`` (schedule, counters, RNG); DCP reshards on load, so
it loads into a group of any size, and a plain single actor's ``load_state`` reads it too. A sharded
group also loads a plain actor's ``trainer_state.pt``. ``save`` exports an HF folder (rank 0 writes
the gathered weights). DCP folders must be on storage all ranks share (one node, or a shared volume).

Placement: one Ray placement group per group (``PACK`` / ``SPREAD`` / ``STRICT_*``), one bundle per
rank; another role can be colocated in the same bundles (``colocate_with=``), each role taking a
``share`` of every bundle (fractional GPUs on GPU clusters).
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from actors.batch import collate_sequences
from actors.critic import CriticActor
from actors.group import ActorCallError, ActorGroup, ActorResources, _is_large
from actors.optim import TRAINER_STATE
from actors.policy import PolicyActor
from actors.reward import RewardModelActor
from actors.runtime import pick_device, rng_state, set_rng_state

DCP_FOLDER = "dcp"                # sharded model + optimizer state, written by torch.distributed.checkpoint
TRAINER_META = "trainer_meta.pt"  # scheduler, step counters, RNG (written by rank 0, last)
ROW_SHARD = "__row_shard__"       # marks a rank's share of a per-row result (logprobs, values)
STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class FSDPConfig:
    cpu_offload: bool = False          # FSDP2 CPUOffloadPolicy: sharded params, grads and optimizer state on the CPU
    reshard_after_forward: bool = True  # free gathered layers after forward (re-gather in backward)
    backend: str | None = None         # None: nccl on GPUs, gloo on CPU
    timeout_s: float = 1800.0          # collective timeout (a dead rank surfaces after this)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules HF never splits across devices (``_no_split_modules``: decoder layers / blocks)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


class ShardedMixin:
    """The rank-aware parts of a sharded trainable actor; mixed in front of PolicyActor / CriticActor.

    ``__init__`` must call ``_join_process_group`` before the base class builds the model; the base's
    ``setup_optimizer`` call then shards the model first (``fully_shard`` replaces parameters, so the
    optimizer must be built over the sharded ones).
    """

    lockstep = True

    # -- process group and sharding ---------------------------------------------------------------
    def _join_process_group(self, rank: int, world_size: int, master_addr: str, master_port: int,
                            fsdp: FSDPConfig | dict | None, offload_optimizer: bool = False) -> None:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        self.fsdp = FSDPConfig(**fsdp) if isinstance(fsdp, dict) else (fsdp or FSDPConfig())
        self.rank, self.world_size = int(rank), int(world_size)
        device = pick_device()
        # offload_optimizer (the single-device option) maps to FSDP2's CPU offload; on a CPU-only
        # machine everything is on the CPU already, so neither applies there.
        self.cpu_offload = bool(self.fsdp.cpu_offload or offload_optimizer) and device.type != "cpu"
        # Offloaded gradients are CPU DTensors: the global norm for clipping all-reduces on the CPU,
        # which NCCL cannot do, so CPU tensors get gloo alongside NCCL.
        accelerator = "cpu:gloo,cuda:nccl" if self.cpu_offload else "nccl"
        backend = self.fsdp.backend or (accelerator if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{int(master_port)}", rank=self.rank,
                                world_size=self.world_size,
                                timeout=datetime.timedelta(seconds=self.fsdp.timeout_s))
        self.backend = backend
        self.mesh = init_device_mesh(device.type, (self.world_size,))
        self._comm_device = device  # gloo reduces CPU tensors, NCCL device tensors

    def setup_optimizer(self, optimizer) -> None:
        self._shard_model()
        self.offload_optimizer = False  # the single-device wrapper (actors.offload) does not apply: FSDP2 offloads
        super().setup_optimizer(optimizer)

    def _shard_model(self) -> None:
        from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard

        policy = CPUOffloadPolicy() if self.cpu_offload else OffloadPolicy()
        layers = decoder_layers(self.model)
        for layer in layers:
            fully_shard(layer, mesh=self.mesh, reshard_after_forward=self.fsdp.reshard_after_forward,
                        offload_policy=policy)
        fully_shard(self.model, mesh=self.mesh, reshard_after_forward=self.fsdp.reshard_after_forward,
                    offload_policy=policy)
        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                # Each rank's loss is already weighted by rows / GLOBAL rows: gradients must be summed
                # over ranks, not averaged (plain SUM also works on gloo, which has no AVG/PREMUL_SUM).
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
        self.sharded_layers = len(layers)

    def close(self) -> None:
        """Leave the process group (called by ShardedActorGroup.shutdown before the actors are killed)."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    def info(self) -> dict:
        info = super().info()
        info.update(self._describe())
        return info

    def _describe(self) -> dict:
        return {"rank": self.rank, "world_size": self.world_size, "backend": self.backend,
                "sharded_layers": self.sharded_layers, "cpu_offload": self.cpu_offload,
                "placement_group": ray.get_runtime_context().get_placement_group_id() if ray.is_initialized() else None}

    # -- data parallelism (hooks of TrainableMixin) -----------------------------------------------
    def _my_share(self, items: list) -> list:
        """Round-robin: item k goes to rank k % N; padded with ``None`` (idle passes) to ceil(n / N)."""
        mine = list(items[self.rank::self.world_size])
        passes = -(-len(items) // self.world_size)
        return mine + [None] * (passes - len(mine))

    def _all_finite(self, finite: bool) -> bool:
        import torch.distributed as dist

        flag = torch.tensor([1 if finite else 0], dtype=torch.int32, device=self._comm_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _reduce_sums(self, sums: dict[str, float]) -> dict[str, float]:
        """Sum each metric over ranks (values are already weighted by global rows). Rank 0 always has
        a real micro-batch (item 0), so its keys are the full set."""
        import torch.distributed as dist

        keys = [list(sums) if self.rank == 0 else None]
        dist.broadcast_object_list(keys, src=0)
        values = torch.tensor([float(sums.get(k, 0.0)) for k in keys[0]], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(values)
        return dict(zip(keys[0], values.tolist()))

    def _clip_grad_norm(self, max_norm: float) -> float:
        from torch.distributed.tensor import DTensor

        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def _idle_inputs(self) -> dict[str, torch.Tensor]:
        pad = getattr(getattr(self, "tokenizer", None), "pad_token_id", None) or 0
        ids = torch.full((1, 2), pad, dtype=torch.long)
        ones = torch.ones((1, 2), dtype=torch.long)
        return {"input_ids": ids, "attention_mask": ones, "loss_mask": ones}

    def _rows_on_this_rank(self, compute, batch: dict, micro_batch_size: int | None) -> dict:
        """Per-row results for this rank's micro-batches (``compute(sub_batch, micro)``), idle passes to
        keep in step. The rank's chunks are whole micro-batches of the full batch and all but the
        globally last hold exactly ``micro`` rows, so ``compute`` re-forms exactly those chunks."""
        micro = micro_batch_size or self.micro_batch_size
        total = batch["input_ids"].shape[0]
        chunks = [torch.arange(s, min(total, s + micro)) for s in range(0, total, micro)]
        share = self._my_share(chunks)
        mine = [c for c in share if c is not None]
        rows = torch.cat(mine) if mine else torch.zeros(0, dtype=torch.long)
        result = compute({k: v[rows] for k, v in batch.items()}, micro) if mine else None
        with torch.no_grad():
            for _ in range(len(share) - len(mine)):
                self._idle_pass()
        return {ROW_SHARD: rows, "rows_total": total, "result": result}

    # -- full weights -----------------------------------------------------------------------------
    def _gather_full_state(self) -> dict[str, torch.Tensor]:
        """Full CPU tensors on rank 0 ({} elsewhere), gathered one tensor at a time; tied parameters
        are gathered once and appear under each of their names (as in a plain state_dict)."""
        from torch.distributed.tensor import DTensor

        start = time.perf_counter()
        out: dict[str, torch.Tensor] = {}
        done: dict[int, torch.Tensor] = {}
        nbytes = 0
        with torch.no_grad():
            # keep_vars: the parameter objects themselves, so a tied pair is one object under two names.
            for name, value in self.model.state_dict(keep_vars=True).items():
                key = id(value)
                if key in done:
                    if self.rank == 0:
                        out[name] = done[key]
                    continue
                if isinstance(value, DTensor):
                    if value.device != self._comm_device:  # CPU-offloaded shard: collectives run on the device
                        value = value.to(self._comm_device)
                    full = value.full_tensor()
                else:
                    full = value
                if self.rank == 0:
                    cpu = full.detach().to("cpu", copy=True)
                    out[name] = done[key] = cpu
                    nbytes += cpu.numel() * cpu.element_size()
                else:
                    done[key] = None
                del full
        self.last_weight_gather = {"seconds": time.perf_counter() - start, "tensors": len(out), "bytes": nbytes}
        return out

    def weight_sync_stats(self) -> dict:
        """Time and size of the last full-weight gather (``named_weights`` or ``save``)."""
        return dict(getattr(self, "last_weight_gather", {}))

    def weights_checksum(self) -> float:
        import torch.distributed as dist

        with torch.no_grad():
            local = sum((p.to_local() if hasattr(p, "to_local") else p).double().sum() for p in self.model.parameters())
            total = torch.tensor([float(local)], dtype=torch.float64, device=self._comm_device)
            dist.all_reduce(total)
        return float(total.item())

    # -- training state ---------------------------------------------------------------------------
    def save_state(self, folder: str) -> str:
        save_sharded_state(self, folder)
        return str(Path(folder) / DCP_FOLDER)

    def load_state(self, folder: str) -> int:
        if (Path(folder) / DCP_FOLDER).is_dir():
            return load_sharded_state(self, folder)
        if (Path(folder) / TRAINER_STATE).exists():
            return _load_plain_state_into_sharded(self, folder)
        raise FileNotFoundError(f"{folder}: neither a sharded ({DCP_FOLDER}/) nor a plain ({TRAINER_STATE}) state")


# -- state functions (also used by a plain actor to read a sharded checkpoint) --------------------
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


# -- the sharded actors ---------------------------------------------------------------------------
class ShardedPolicyActor(ShardedMixin, PolicyActor):
    """One rank of an FSDP2-sharded policy. Same methods as PolicyActor; results of per-row methods
    are a rank's share (the group combines them)."""

    def __init__(self, model: str, *, rank: int, world_size: int, master_addr: str, master_port: int,
                 fsdp: FSDPConfig | dict | None = None, **kwargs):
        if kwargs.get("lora"):
            raise ValueError("policy: LoRA is not supported with a sharded policy (num_workers > 1) yet")
        self._join_process_group(rank, world_size, master_addr, master_port, fsdp,
                                 bool(kwargs.get("offload_optimizer")))
        super().__init__(model, **kwargs)  # loads the model; its setup_optimizer call shards it first

    def _idle_pass(self):
        logits = self._logits(self._idle_inputs())
        return logits.float().sum() * 0.0, {}

    @torch.no_grad()
    def logprobs(self, batch, micro_batch_size: int | None = None) -> dict:
        return self._rows_on_this_rank(super().logprobs, batch, micro_batch_size)

    def named_weights(self) -> dict[str, torch.Tensor] | None:
        """Full weights on rank 0 (None on the others; the group returns rank 0's result)."""
        weights = self._gather_full_state()
        return weights if self.rank == 0 else None

    def save(self, path: str) -> str:
        """An HF folder (safetensors + tokenizer) that AutoModelForCausalLM.from_pretrained loads."""
        weights = self._gather_full_state()
        if self.rank == 0:
            folder = Path(path)
            folder.mkdir(parents=True, exist_ok=True)
            # transformers writes the architecture without FSDP2's class-name prefix and takes the
            # gathered state dict as given.
            self.model.save_pretrained(folder, state_dict=weights)
            self.tokenizer.save_pretrained(folder)
        _barrier()
        return str(path)


class _ShardedScalarHead(ShardedMixin):
    """The sharded ScalarHeadModel roles' shared part (critic, reward model): their idle pass."""

    def _idle_pass(self):
        inputs = {k: v.to(self.device) for k, v in self._idle_inputs().items()}
        return self.model(inputs["input_ids"], inputs["attention_mask"]).sum() * 0.0, {}


class ShardedCriticActor(_ShardedScalarHead, CriticActor):
    """One rank of an FSDP2-sharded critic (value model)."""

    def __init__(self, model: str, *, rank: int, world_size: int, master_addr: str, master_port: int,
                 fsdp: FSDPConfig | dict | None = None, **kwargs):
        if kwargs.get("lora"):
            raise ValueError("critic: LoRA is not supported with a sharded critic (num_workers > 1) yet")
        self._join_process_group(rank, world_size, master_addr, master_port, fsdp,
                                 bool(kwargs.get("offload_optimizer")))
        super().__init__(model, **kwargs)

    @torch.no_grad()
    def values(self, batch, micro_batch_size: int | None = None) -> dict:
        return self._rows_on_this_rank(super().values, batch, micro_batch_size)

    def save(self, path: str) -> str:
        return _save_scalar_head_model(self, path)


class ShardedRewardModelActor(_ShardedScalarHead, RewardModelActor):
    """One rank of an FSDP2-sharded learned reward model while it trains (``jobs.reward``). Bradley-Terry
    steps deal the pair micro-batches to the ranks; ``score`` returns this rank's rows (combined in
    order by the group); ``eval_rm`` sums correct pairs and margins over the ranks."""

    def __init__(self, *, rank: int, world_size: int, master_addr: str, master_port: int,
                 fsdp: FSDPConfig | dict | None = None, **kwargs):
        if kwargs.get("kind", "learned") != "learned" or kwargs.get("optimizer") is None:
            raise ValueError("reward: a sharded reward model (num_workers > 1) is a learned one being trained "
                             "(kind 'learned' and an optimizer); a frozen scorer runs on one actor")
        if kwargs.get("lora"):
            raise ValueError("reward: LoRA is not supported with a sharded reward model (num_workers > 1) yet")
        self._join_process_group(rank, world_size, master_addr, master_port, fsdp,
                                 bool(kwargs.get("offload_optimizer")))
        super().__init__(**kwargs)

    @torch.no_grad()
    def score(self, prompt_ids, response_ids) -> dict:
        start = time.perf_counter()
        batch = collate_sequences(prompt_ids, response_ids, self.tokenizer.pad_token_id)
        shard = self._rows_on_this_rank(self._score_batch, batch, None)
        if shard["result"] is not None:
            shard["result"]["seconds"] = torch.tensor(time.perf_counter() - start)
        return shard

    def save(self, path: str) -> str:
        return _save_scalar_head_model(self, path, tokenizer=self.tokenizer)


def _save_scalar_head_model(actor, path: str, tokenizer=None) -> str:
    """A sharded ScalarHeadModel (critic, reward model) as ``ScalarHeadModel.save_pretrained`` writes it:
    the HF backbone folder, the head's safetensors and its normalisation, gathered on rank 0."""
    from safetensors.torch import save_file

    from actors.value_model import HEAD_META, HEAD_WEIGHTS

    weights = actor._gather_full_state()
    if actor.rank == 0:
        import json

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        backbone = {k[len("backbone."):]: v for k, v in weights.items() if k.startswith("backbone.")}
        head = {k[len("head."):]: v.contiguous() for k, v in weights.items() if k.startswith("head.")}
        actor.model.backbone.save_pretrained(folder, state_dict=backbone)
        save_file(head, str(folder / HEAD_WEIGHTS))
        (folder / HEAD_META).write_text(json.dumps({"reward_mean": actor.model.reward_mean,
                                                    "reward_std": actor.model.reward_std}))
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    _barrier()
    return str(path)


SHARDED_CLASSES: dict[type, type] = {PolicyActor: ShardedPolicyActor, CriticActor: ShardedCriticActor,
                                     RewardModelActor: ShardedRewardModelActor}


# -- combining the ranks' results -----------------------------------------------------------------
def combine_results(*results: Any) -> Any:
    """Rank 0's result (metrics were all-reduced in the actors), or per-row shards put back in order."""
    first = results[0]
    if not (isinstance(first, dict) and ROW_SHARD in first):
        return first
    total = first["rows_total"]
    combined: dict[str, Any] = {}
    for shard in results:
        rows, result = shard[ROW_SHARD], shard["result"]
        if result is None:
            continue
        for key, value in result.items():
            if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == len(rows):
                if key not in combined:
                    combined[key] = value.new_zeros((total, *value.shape[1:]))
                combined[key][rows] = value
            elif key == "seconds":  # the slowest rank's time is the call's time
                combined[key] = value if key not in combined else torch.maximum(torch.as_tensor(combined[key]),
                                                                                torch.as_tensor(value))
            else:
                combined.setdefault(key, value)
    return combined


def _combine_fail_fast(refs: list) -> Any:
    """Wait for the ranks' results, raising as soon as one fails: its peers would otherwise sit in a
    collective until the process-group timeout before their own results (and this one) resolved."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready[0])  # re-raises a rank's error (e.g. ActorDiedError) at once
    return combine_results(*ray.get(list(refs)))


_combine = ray.remote(num_cpus=0)(_combine_fail_fast)


def _rendezvous_address() -> tuple[str, int]:
    """An address and a free port on the node of rank 0's bundle (for init_process_group)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return ray.util.get_node_ip_address(), port


_rendezvous = ray.remote(num_cpus=0)(_rendezvous_address)


# -- placement ------------------------------------------------------------------------------------
class GroupPlacement:
    """A placement group with one bundle per rank, shared by colocated roles (each takes a share of
    every bundle). Removed when the last role using it shuts down."""

    def __init__(self, bundles: list[dict[str, float]], strategy: str, role: str, timeout_s: float):
        from ray.util.placement_group import placement_group

        if strategy not in STRATEGIES:
            raise ValueError(f"{role}: placement strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.bundles, self.strategy = bundles, strategy
        self.group = placement_group(bundles, strategy=strategy, name=f"{role}-placement")
        self.claimed = 0.0
        self.users: set[str] = set()
        try:
            ray.get(self.group.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            ray.util.remove_placement_group(self.group)
            raise ActorCallError(f"{role}: could not place {len(bundles)} bundles {bundles[0]} with strategy "
                                 f"{strategy} within {timeout_s:.0f} s (not enough resources in the cluster?)") from exc

    def claim(self, role: str, share: float) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"{role}: share must be in (0, 1], got {share}")
        if self.claimed + share > 1 + 1e-9:
            raise ValueError(f"{role}: cannot take {share} of each bundle, {1 - self.claimed:.2f} is left "
                             f"(roles sharing it: {sorted(self.users)})")
        self.claimed += share
        self.users.add(role)

    def release(self, role: str) -> None:
        self.users.discard(role)
        if not self.users and self.group is not None:
            ray.util.remove_placement_group(self.group)
            self.group = None

    def strategy_for(self, rank: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(placement_group=self.group, placement_group_bundle_index=rank)


# -- the group ------------------------------------------------------------------------------------
class ShardedActorGroup(ActorGroup):
    """A role held by ``num_workers`` FSDP2 ranks behind the ActorGroup interface.

    ``call_all(method, ...)`` returns ``[ref]``: one ObjectRef for the combined result (rank 0's
    result after every rank finished; per-row results merged in row order; for ``named_weights``
    rank 0's own ref, so the full weights are not copied again). ``run_one`` / ``run_all`` resolve
    it (``run_all`` returns a one-element list, like ``call_all``). ``call_each`` / ``map_shards``
    make no sense for one sharded model and raise. A rank that dies fails the combined result at
    once (its peers are left in a collective; ``shutdown`` kills them). Ranks are never restarted
    singly: recovery is the driver's (recreate the group, ``load_state``).
    """

    def __init__(self, actor_cls: type, role: str, *, num_workers: int, resources: ActorResources | None = None,
                 init_kwargs: dict[str, Any] | None = None, strategy: str = "PACK",
                 colocate_with: "ShardedActorGroup | None" = None, share: float = 1.0,
                 fsdp: FSDPConfig | dict | None = None, call_timeout_s: float = 1800.0,
                 placement_timeout_s: float = 300.0):
        if num_workers < 1:
            raise ValueError(f"{role}: num_workers must be >= 1, got {num_workers}")
        actor_cls = SHARDED_CLASSES.get(actor_cls, actor_cls)
        if not issubclass(actor_cls, ShardedMixin):
            raise ValueError(f"{role}: {actor_cls.__name__} has no sharded version "
                             f"(known: {', '.join(c.__name__ for c in SHARDED_CLASSES)})")
        self.role = role
        self.resources = resources or ActorResources()
        if self.resources.max_restarts:
            raise ValueError(f"{role}: a sharded group cannot restart single ranks (max_restarts must be 0)")
        self.call_timeout_s = call_timeout_s
        self.names = [f"{role}-{i}" for i in range(num_workers)]
        gpus = self.resources.resolved_gpus()
        cpus = float(self.resources.num_cpus)
        if colocate_with is None:
            bundle = {"CPU": cpus, "GPU": gpus, **self.resources.resources}
            bundle = {k: float(v) for k, v in bundle.items() if v}
            if not bundle:
                raise ValueError(f"{role}: a sharded group needs num_cpus > 0 or GPUs to reserve its bundles")
            self.placement = GroupPlacement([dict(bundle) for _ in range(num_workers)], strategy, role,
                                            placement_timeout_s)
        else:
            self.placement = colocate_with.placement
            if self.placement.group is None or len(self.placement.bundles) < num_workers:
                raise ValueError(f"{role}: cannot colocate {num_workers} workers with {colocate_with.role} "
                                 f"({len(self.placement.bundles)} bundles)")
        self.placement.claim(role, share)
        self.share = share
        bundle = self.placement.bundles[0]
        self.gpus_per_actor = bundle.get("GPU", 0.0) * share
        fsdp_config = FSDPConfig(**fsdp) if isinstance(fsdp, dict) else (fsdp or FSDPConfig())
        kwargs = dict(init_kwargs or {})
        kwargs.setdefault("torch_threads", self.resources.torch_threads)
        kwargs["fsdp"] = asdict(fsdp_config)
        self.started = time.perf_counter()
        self.actors = []
        try:
            address, port = ray.get(_rendezvous.options(scheduling_strategy=self.placement.strategy_for(0)).remote(),
                                    timeout=placement_timeout_s)
            remote_cls = ray.remote(actor_cls)
            custom = {k: v * share for k, v in bundle.items() if k not in ("CPU", "GPU")}
            self.actors = [
                remote_cls.options(
                    name=name, num_cpus=bundle.get("CPU", 0.0) * share, num_gpus=self.gpus_per_actor,
                    resources=custom, max_restarts=0, scheduling_strategy=self.placement.strategy_for(rank),
                ).remote(rank=rank, world_size=num_workers, master_addr=address, master_port=port, **kwargs)
                for rank, name in enumerate(self.names)
            ]
        except Exception:
            self.placement.release(role)
            raise

    # -- calls ------------------------------------------------------------------------------------
    def call_all(self, method: str, *args, **kwargs) -> list[ray.ObjectRef]:
        args = [ray.put(a) if _is_large(a) else a for a in args]
        refs = [getattr(actor, method).remote(*args, **kwargs) for actor in self.actors]
        if method == "named_weights":
            return [refs[0]]
        return [_combine.remote(refs)]  # refs inside a list: passed unresolved, awaited in the task

    def run_one(self, method: str, *args, timeout_s: float | None = None, **kwargs):
        return self.get(self.call_all(method, *args, **kwargs)[0], method, timeout_s)

    def run_all(self, method: str, *args, timeout_s: float | None = None, **kwargs) -> list:
        return [self.run_one(method, *args, timeout_s=timeout_s, **kwargs)]

    def call_each(self, method: str, per_actor_args, **kwargs):
        raise NotImplementedError(f"{self.role}: a sharded group holds one model; use call_all / run_one")

    def map_shards(self, method: str, items, *args, timeout_s: float | None = None, **kwargs):
        raise NotImplementedError(f"{self.role}: a sharded group holds one model; use call_all / run_one")

    def wait_ready(self, timeout_s: float = 600.0) -> list[dict]:
        """Every rank's info() once its model is loaded and sharded (one dict per rank)."""
        infos = self.get([actor.info.remote() for actor in self.actors], "info", timeout_s)
        if self.resources.pin_cores:
            for info, cores in zip(infos, self.pin_cores()):
                info["cpu_cores"] = cores
        return infos

    def shutdown(self) -> None:
        """Leave the process group on every rank, kill the actors, release the placement group."""
        if self.actors:
            try:
                ray.get([actor.close.remote() for actor in self.actors], timeout=15)
            except Exception:  # a dead rank: its peers' sockets close when they are killed
                pass
        super().shutdown()
        if getattr(self, "placement", None) is not None:
            self.placement.release(self.role)


def training_group(actor_cls: type, role: str, num_workers: int = 1, *, resources: ActorResources | None = None,
                   init_kwargs: dict[str, Any] | None = None, strategy: str = "PACK",
                   colocate_with: ShardedActorGroup | None = None, share: float = 1.0,
                   fsdp: FSDPConfig | dict | None = None, call_timeout_s: float = 1800.0) -> ActorGroup:
    """The driver's handle on a trainable role: a plain one-actor ``ActorGroup`` for one worker (today's
    behaviour), an FSDP2 ``ShardedActorGroup`` for more (or when colocating with a sharded group)."""
    if num_workers == 1 and colocate_with is None:
        return ActorGroup(actor_cls, role, resources=resources, init_kwargs=init_kwargs, call_timeout_s=call_timeout_s)
    return ShardedActorGroup(actor_cls, role, num_workers=num_workers, resources=resources, init_kwargs=init_kwargs,
                             strategy=strategy, colocate_with=colocate_with, share=share, fsdp=fsdp,
                             call_timeout_s=call_timeout_s)


__all__ = ["FSDPConfig", "GroupPlacement", "ShardedActorGroup", "ShardedCriticActor", "ShardedPolicyActor",
           "ShardedRewardModelActor",
           "combine_results", "decoder_layers", "load_sharded_state", "save_sharded_state",
           "training_group"]

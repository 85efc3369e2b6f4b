"""The rank-aware half of a sharded trainable actor: process group, ``fully_shard``, global reductions,
idle passes, weight gathering and sharded state. Mixed in front of PolicyActor / CriticActor / RewardModelActor."""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch

from actors.fsdp.state import (DCP_FOLDER, TRAINER_STATE, _load_plain_state_into_sharded, load_sharded_state,
                               save_sharded_state)
from actors.runtime import pick_device

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
                # Each rank's loss is already weighted by its share of the GLOBAL total (rows, or response
                # tokens for PPO's policy loss): gradients must be summed
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

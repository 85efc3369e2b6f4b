"""A sharded group driven like one actor: placement, rendezvous, and the ranks' results combined into one."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import ray
import torch

from actors.fsdp.mixin import ROW_SHARD, STRATEGIES, FSDPConfig, ShardedMixin
from actors.fsdp.roles import SHARDED_CLASSES
from actors.group import ActorCallError, ActorGroup, ActorResources, _is_large, register_actors


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
            register_actors(role, self.names, self.actors)
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

    def submit(self, method: str, *args, **kwargs) -> ray.ObjectRef:
        """The group's one answer: rank 0's weights for ``named_weights``, else the ranks' results combined."""
        return self.call_all(method, *args, **kwargs)[0]

    def run_one(self, method: str, *args, timeout_s: float | None = None, **kwargs):
        return self.get(self.submit(method, *args, **kwargs), method, timeout_s)

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

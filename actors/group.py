"""A role's actors behind one handle: create, fan a call out, shard a list across them, gather in order.

The driver talks to a role (``policy``, ``generator``, ...) through an ``ActorGroup`` whatever its
size, so a role can grow from one actor to a data-parallel or sharded group without the driver's
code changing. Every blocking gather has a timeout and names the role and method when it fails.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import ray
from ray.exceptions import GetTimeoutError, RayActorError


@dataclass
class ActorResources:
    num_cpus: float = 1.0          # logical CPUs Ray reserves (the embedded cluster oversubscribes)
    num_gpus: float | str = "auto"  # "auto": one GPU each (or gpu_fraction) when the cluster has GPUs, else none
    gpu_fraction: float | None = None  # with "auto" on a GPU cluster: this share of a GPU (roles colocated on one)
    torch_threads: int | None = None
    resources: dict[str, float] = field(default_factory=dict)  # custom node resources, e.g. {"trainer": 1}
    pin_cores: bool = False        # give actor i its own block of torch_threads cores (one node, Linux)
    max_restarts: int = 0          # Ray restarts a dead actor this often (frozen roles: nothing to restore)
    max_task_retries: int = 0      # and re-runs the calls that were in flight on it

    def resolved_gpus(self) -> float:
        if self.num_gpus != "auto":
            return float(self.num_gpus)
        if ray.cluster_resources().get("GPU", 0) < 1:
            return 0.0
        return 1.0 if self.gpu_fraction is None else float(self.gpu_fraction)


class ActorCallError(RuntimeError):
    """A remote call failed, died or timed out; the message names the role, actor and method."""


# actor id (hex) -> (role, name) of every actor a group created in this driver, so that an error about a
# dead actor names that actor whichever group's gather saw it.
_CREATED: dict[str, tuple[str, str]] = {}


def register_actors(role: str, names: Sequence[str], actors: Sequence) -> None:
    for name, actor in zip(names, actors):
        _CREATED[actor._actor_id.hex()] = (role, name)


def describe_actor_error(exc: RayActorError, unknown: str) -> str:
    role_name = _CREATED.get(getattr(exc, "actor_id", None) or "")
    return f"actor '{role_name[1]}' of role '{role_name[0]}'" if role_name else unknown


class ActorGroup:
    def __init__(self, actor_cls: type, role: str, *, num_actors: int = 1, resources: ActorResources | None = None,
                 init_kwargs: dict[str, Any] | None = None, indexed_names: bool | None = None,
                 call_timeout_s: float = 1800.0):
        if num_actors < 1:
            raise ValueError(f"{role}: num_actors must be >= 1, got {num_actors}")
        self.role = role
        self.resources = resources or ActorResources()
        self.call_timeout_s = call_timeout_s
        indexed = num_actors > 1 if indexed_names is None else indexed_names
        self.names = [f"{role}-{i}" if indexed else role for i in range(num_actors)]
        kwargs = dict(init_kwargs or {})
        kwargs.setdefault("torch_threads", self.resources.torch_threads)
        remote_cls = ray.remote(actor_cls)
        self.started = time.perf_counter()
        self.gpus_per_actor = self.resources.resolved_gpus()
        self.actors = [
            remote_cls.options(
                name=name, num_cpus=self.resources.num_cpus, num_gpus=self.gpus_per_actor,
                resources=dict(self.resources.resources), max_restarts=self.resources.max_restarts,
                max_task_retries=self.resources.max_task_retries if self.resources.max_restarts else 0,
            ).remote(**kwargs)
            for name in self.names
        ]
        register_actors(role, self.names, self.actors)

    def pin_cores(self) -> list[list[int]]:
        """Actor i keeps to cores [i*t, (i+1)*t) with t = torch_threads (wrapping around the machine)."""
        import os

        per = max(1, int(self.resources.torch_threads or 1))
        count = os.cpu_count() or 1
        blocks = [[(i * per + k) % count for k in range(per)] for i in range(len(self.actors))]
        return self.get([actor.__ray_call__.remote(_pin, block) for actor, block in zip(self.actors, blocks)],
                        "pin_cores", 60)

    def __len__(self) -> int:
        return len(self.actors)

    # -- calls ------------------------------------------------------------------------------------
    def call_all(self, method: str, *args, **kwargs) -> list[ray.ObjectRef]:
        """The same call on every actor (arguments put in the object store once)."""
        args = [ray.put(a) if _is_large(a) else a for a in args]
        return [getattr(actor, method).remote(*args, **kwargs) for actor in self.actors]

    def call_each(self, method: str, per_actor_args: Sequence[tuple], **kwargs) -> list[ray.ObjectRef]:
        if len(per_actor_args) != len(self.actors):
            raise ValueError(f"{self.role}.{method}: {len(per_actor_args)} argument sets for {len(self.actors)} actors")
        return [getattr(actor, method).remote(*args, **kwargs) for actor, args in zip(self.actors, per_actor_args)]

    def get(self, refs, method: str = "call", timeout_s: float | None = None):
        timeout = timeout_s or self.call_timeout_s
        try:
            return ray.get(refs, timeout=timeout)
        except GetTimeoutError as exc:
            raise ActorCallError(f"{self.role}.{method} did not finish within {timeout:.0f} s") from exc
        except RayActorError as exc:
            raise ActorCallError(f"{self.role}.{method}: {self.describe_dead(exc)} died: {exc}") from exc

    def describe_dead(self, exc: RayActorError) -> str:
        """Which actor an ActorDiedError is about, by the name and role it was created with, so a dead
        critic awaited next to the policy's refs is reported as the critic, not as the policy."""
        return describe_actor_error(exc, f"an actor awaited by role '{self.role}'")

    def submit(self, method: str, *args, **kwargs) -> ray.ObjectRef:
        """The role's one answer, as one ObjectRef: the single actor's, or a sharded group's combined result.
        A group of several independent actors has no single answer: use ``call_all`` (every actor's) or
        ``map_shards`` (a list split across them)."""
        if len(self.actors) != 1:
            raise ValueError(f"{self.role}.{method}: submit needs a one-actor role, this one has {len(self.actors)} "
                             f"(use call_all for every actor's answer, or map_shards)")
        return self.call_all(method, *args, **kwargs)[0]

    def run_all(self, method: str, *args, timeout_s: float | None = None, **kwargs) -> list:
        return self.get(self.call_all(method, *args, **kwargs), method, timeout_s)

    def run_one(self, method: str, *args, timeout_s: float | None = None, **kwargs):
        """``submit`` and wait: the role's one answer."""
        return self.get(self.submit(method, *args, **kwargs), method, timeout_s)

    def shard(self, items: Sequence) -> list[list]:
        """Contiguous, near-equal shards, one per actor (some may be empty if items < actors)."""
        n = len(self.actors)
        base, extra = divmod(len(items), n)
        shards, start = [], 0
        for i in range(n):
            stop = start + base + (1 if i < extra else 0)
            shards.append(list(items[start:stop]))
            start = stop
        return shards

    def map_shards(self, method: str, items: Sequence, *args, timeout_s: float | None = None, **kwargs) -> list:
        """Split ``items`` across the actors, call ``method(shard, *args)`` on each, return results in order."""
        shards = self.shard(items)
        busy = [(actor, shard) for actor, shard in zip(self.actors, shards) if shard]
        refs = [getattr(actor, method).remote(shard, *args, **kwargs) for actor, shard in busy]
        return self.get(refs, method, timeout_s)

    def wait_ready(self, timeout_s: float = 600.0) -> list[dict]:
        """Block until every actor has loaded its model; returns each actor's info()."""
        infos = self.run_all("info", timeout_s=timeout_s)
        if self.resources.pin_cores:
            for info, cores in zip(infos, self.pin_cores()):
                info["cpu_cores"] = cores
        return infos

    def process_seconds(self, timeout_s: float = 30.0) -> list[float]:
        """CPU seconds each actor's process has used so far (user + system, all threads)."""
        refs = [actor.__ray_call__.remote(_process_cpu_seconds) for actor in self.actors]
        return self.get(refs, "process_seconds", timeout_s)

    def shutdown(self) -> None:
        """Kill the actors, first booking their CPU seconds and device seconds in ``COMPUTE_LEDGER``."""
        if self.actors:
            try:
                cpu = sum(self.process_seconds())
            except ActorCallError:
                cpu = float("nan")  # an actor already died: its time is unknown, not zero
            lifetime = time.perf_counter() - self.started
            COMPUTE_LEDGER.book(self.role, cpu, lifetime * self.gpus_per_actor * len(self.actors))
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []


def _pin(_actor, cores: list[int]) -> list[int]:
    from actors.runtime import pin_to_cores

    return pin_to_cores(cores)


def _process_cpu_seconds(_actor) -> float:
    return time.process_time()


class ComputeLedger:
    """Compute spent by actors this driver created, by role: CPU seconds of their processes and
    device seconds (lifetime × GPUs held). Drivers read it for their summaries; jobs.compare takes
    differences around each stage."""

    def __init__(self):
        self.cpu_s: dict[str, float] = {}
        self.device_s: dict[str, float] = {}

    def book(self, role: str, cpu_s: float, device_s: float) -> None:
        self.cpu_s[role] = self.cpu_s.get(role, 0.0) + cpu_s
        self.device_s[role] = self.device_s.get(role, 0.0) + device_s

    def snapshot(self) -> dict[str, float]:
        return {"cpu_s": sum(self.cpu_s.values()), "device_s": sum(self.device_s.values())}


COMPUTE_LEDGER = ComputeLedger()


def _is_large(value: Any) -> bool:
    """Tensors and batches go through the object store once instead of once per actor."""
    import torch

    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(isinstance(v, torch.Tensor) for v in value.values())
    return False

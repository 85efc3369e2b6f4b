"""Connecting a driver to Ray: an existing cluster (RAY_ADDRESS / --address / ray job submit) or an
embedded local one started on the spot."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import stat
from pathlib import Path

import ray

# Imported here, not inside the functions: under `ray job submit` the job's working-dir copy can be
# re-extracted while the driver's ray.init runs, and a module first imported after it is not found
# (tests/test_platform.py::test_submitted_dpo_job_succeeds_with_outputs_and_logs).
from actors.fsdp.group import training_group
from actors.fsdp.mixin import STRATEGIES, FSDPConfig
from actors.group import ActorResources
from jobs.run.config import ConfigError

# The default token file Ray reads when neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH is set.
DEFAULT_TOKEN_PATH = Path.home() / ".ray" / "auth_token"


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
    # Under `ray job submit` Ray merges this with the job's runtime_env and fails on any key both set.
    env_vars = driver_env_vars(env_vars, os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))
    runtime_env = {"env_vars": env_vars} if env_vars else None
    if address:
        try:
            ray.init(address=address, namespace=namespace, runtime_env=runtime_env, log_to_driver=not quiet)
        except ConnectionError as exc:
            if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
                raise
            # Ray reports a refused token only as a failed connection.
            raise ConnectionError(
                f"{exc}. If the cluster uses token authentication (clusters `make cluster-up` starts do), "
                "export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH=<token file> (or RAY_AUTH_TOKEN)") from exc
    else:
        secure_token_file()
        cpus = logical_cpus or max(os.cpu_count() or 1, 8)
        ray.init(num_cpus=cpus, namespace=namespace, include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 runtime_env=runtime_env, log_to_driver=not quiet, _node_ip_address="127.0.0.1")
    return ray.cluster_resources()


def driver_env_vars(wanted: dict[str, str], job_config_json: str | None) -> dict[str, str]:
    """The env vars a driver may add to its runtime_env: those a submitted job's runtime_env does not set."""
    if not job_config_json:
        return dict(wanted)
    try:
        job_env = (json.loads(job_config_json).get("runtime_env") or {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        job_env = {}
    return {k: v for k, v in wanted.items() if k not in job_env}


def secure_token_file() -> Path | None:
    """Make the token file a local cluster will use private (0600), creating it if missing.

    Ray turns token authentication on for clusters ``ray.init()`` starts and writes a missing token
    with the process umask (world-readable here). Nothing is done when the token comes from
    RAY_AUTH_TOKEN or authentication is explicitly disabled. Returns the file's path, never its content.
    """
    if os.environ.get("RAY_AUTH_MODE", "token").lower() == "disabled" or os.environ.get("RAY_AUTH_TOKEN"):
        return None
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or DEFAULT_TOKEN_PATH).expanduser()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # created concurrently by another process: fall through to the check
            pass
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))
    info = path.stat()
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO) and info.st_uid == os.getuid():
        path.chmod(0o600)
    return path


ROLES = ("policy", "reference", "reward", "critic", "generator", "judge")


def check_placement(placement: dict, roles: tuple[str, ...] = ROLES, key: str = "placement") -> None:
    """``{role: {custom_resource: amount}}``: known roles, resource names as text, amounts >= 0.

    ``GPU`` is the one built-in name taken: the share of a GPU the role asks for on a GPU cluster (e.g.
    ``{policy: {GPU: 0.5}, reference: {GPU: 0.5}}`` puts both on one device; ignored without GPUs)."""
    if not isinstance(placement, dict):
        raise ConfigError(f"{key}: expected a mapping of role -> {{resource: amount}}, got {placement!r}")
    for role, wanted in placement.items():
        if role not in roles:
            raise ConfigError(f"{key}.{role}: unknown role (valid: {', '.join(roles)})")
        if not isinstance(wanted, dict):
            raise ConfigError(f"{key}.{role}: expected a mapping of resource -> amount, got {wanted!r}")
        for name, amount in wanted.items():
            if name in ("CPU", "memory", "object_store_memory"):
                raise ConfigError(f"{key}.{role}.{name}: built-in resources are set elsewhere; "
                                  "placement takes GPU (a share of a GPU) and custom node resources such as 'trainer'")
            if name == "GPU" and (isinstance(amount, bool) or not isinstance(amount, (int, float))
                                  or not 0 < amount <= 1):
                raise ConfigError(f"{key}.{role}.GPU: the share of one GPU this role takes, in (0, 1]; got {amount!r}")
            if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
                raise ConfigError(f"{key}.{role}.{name}: expected a number >= 0, got {amount!r}")


def role_resources(base: ActorResources, placement: dict, role: str) -> ActorResources:
    """``base`` plus the custom node resources ``placement`` asks for ``role`` (pins it to such nodes),
    and its GPU share where given."""
    wanted = {name: float(amount) for name, amount in (placement.get(role) or {}).items()}
    if not wanted:
        return base
    gpu = wanted.pop("GPU", None)
    resources = dataclasses.replace(base, resources={**base.resources, **wanted})
    return resources if gpu is None else dataclasses.replace(resources, gpu_fraction=gpu)


WEIGHT_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class TrainingRoleConfig:
    """How a trainable role (policy, critic) is laid out: one actor, or an FSDP2-sharded group of
    ``num_workers`` actors in a Ray placement group (``actors.fsdp``)."""

    num_workers: int = 1
    strategy: str = "PACK"          # placement of the group's bundles: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    fsdp: dict = dataclasses.field(default_factory=dict)  # actors.fsdp.mixin.FSDPConfig: cpu_offload, reshard_after_forward, backend
    colocate_with: str | None = None  # share the bundles (and GPUs) of another sharded role, e.g. critic with policy
    share: float = 1.0              # the fraction of each bundle this role takes when colocated
    # Memory savers and adapters (actors.worker): {} / False = off.
    dtype: str = "float32"          # weights: float32 | bfloat16 | float16 (e.g. a LoRA policy's frozen base in bf16)
    lora: dict = dataclasses.field(default_factory=dict)  # peft LoRA: r, alpha, dropout, target_modules
    gradient_checkpointing: bool = False  # recompute decoder-layer activations in the backward pass
    packing: bool = False           # padding-free micro-batches (position ids restart per sequence)
    offload_optimizer: bool = False  # optimizer state on the CPU (FSDP2 groups: CPUOffloadPolicy); no-op on CPU
    # The critic only: its embeddings and lowest K decoder layers stay frozen (a shorter backward, no optimizer
    # state for them). A cheaper critic, not the same one: the values come from the upper layers' features.
    freeze_layers: int = 0
    torch_threads: int | None = None  # this role's torch threads (default: the run's torch_threads)

    def actor_options(self) -> dict:
        """The keyword arguments these options become for the role's actor (PolicyActor, CriticActor, ...)."""
        return {"dtype": self.dtype, "lora": dict(self.lora) or None, "gradient_checkpointing": self.gradient_checkpointing,
                "packing": self.packing, "offload_optimizer": self.offload_optimizer,
                **({"freeze_layers": self.freeze_layers} if self.freeze_layers else {})}

    def validate(self, key: str, roles: tuple[str, ...] = ()) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"{key}.num_workers must be >= 1, got {self.num_workers}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"{key}.strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        valid = {f.name for f in dataclasses.fields(FSDPConfig)}
        unknown = sorted(set(self.fsdp) - valid)
        if unknown:
            raise ConfigError(f"unknown config key '{key}.fsdp.{unknown[0]}' (valid: {', '.join(sorted(valid))})")
        if self.colocate_with is not None and self.colocate_with not in roles:
            raise ConfigError(f"{key}.colocate_with must be one of {', '.join(roles) or '(none here)'}, "
                              f"got {self.colocate_with!r}")
        if not 0 < self.share <= 1:
            raise ConfigError(f"{key}.share must be in (0, 1], got {self.share}")
        if self.freeze_layers < 0:
            raise ConfigError(f"{key}.freeze_layers must be >= 0, got {self.freeze_layers}")
        if self.freeze_layers and (key != "critic" or self.num_workers > 1):
            raise ConfigError(f"{key}.freeze_layers: only a single-actor critic takes it (critic.freeze_layers, "
                              f"critic.num_workers 1)")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ConfigError(f"{key}.torch_threads must be >= 1, got {self.torch_threads}")
        if self.dtype not in WEIGHT_DTYPES:
            raise ConfigError(f"{key}.dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {self.dtype!r}")
        if self.lora:
            from actors.models import lora_config

            if self.num_workers > 1 or self.colocate_with:
                raise ConfigError(f"{key}.lora: LoRA needs a single-actor {key} (num_workers 1, no colocate_with): "
                                  f"sharded LoRA groups are not supported yet")
            try:
                lora_config(self.lora)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{key}.lora: {exc}") from None


def build_training_group(actor_cls: type, role: str, layout: TrainingRoleConfig, *, resources: ActorResources,
                         init_kwargs: dict, call_timeout_s: float, colocate_with=None):
    """A plain ActorGroup for one worker, an FSDP2 ShardedActorGroup for more (same driver code)."""
    init_kwargs = {**init_kwargs, **layout.actor_options()}
    if layout.torch_threads:
        resources = dataclasses.replace(resources, torch_threads=layout.torch_threads)
    return training_group(actor_cls, role, layout.num_workers, resources=resources, init_kwargs=init_kwargs,
                          strategy=layout.strategy, colocate_with=colocate_with, share=layout.share,
                          fsdp=dict(layout.fsdp) or None, call_timeout_s=call_timeout_s)

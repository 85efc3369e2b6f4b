"""Direct Preference Optimization (and its variants) over the actor fleet.

    python -m jobs.dpo --preset dpo_smollm2 --data jsonl:pairs.jsonl [key.sub=value ...]

Reference log-probs are computed once by a ReferenceActor and cached; the PolicyActor runs one
forward pass over chosen+rejected per micro-batch and accumulates to ``batch_size`` pairs.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from actors.math.batch import collate_pairs
from actors.math.dpo_losses import REFERENCE_FREE_VARIANTS, VARIANTS
from actors.group import ActorGroup, ActorResources
from actors.models import load_tokenizer
from actors.optim import OptimizerConfig
from actors.policy import PolicyActor
from actors.reference import ReferenceActor
from actors.runtime import rng_state, set_rng_state
from jobs.run.batching import EncodedPair, TokenizeConfig, encode_pairs
from jobs.run.cluster import TrainingRoleConfig, build_training_group, check_placement, init_ray, role_resources
from jobs.run.snapshots import check_snapshot_steps, save_snapshot_if_due, saved_snapshots
from jobs.run.checkpoint import CheckpointConfig, CheckpointWriter, check_resume, load_driver_state, resolve_resume
from jobs.run.config import ConfigError, check_model, run_cli, save_config
from jobs.data.source import DataConfig, load_pair_splits
from jobs.run.faults import FaultConfig, FaultInjector, NonFiniteGuard, run_with_recovery
from jobs.run.metrics import MetricsLogger
from jobs.run.sampler import LoopState, ShuffledBatches, check_step_plan, plan_steps, supervised_steps
from jobs.run.reference_cache import reference_logps


@dataclass
class DPOLossConfig:
    variant: str = "sigmoid"      # see actors.math.dpo_losses.VARIANTS
    beta: float = 0.1
    label_smoothing: float = 0.0  # cdpo / robust
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"loss.variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if not self.beta > 0:
            raise ConfigError(f"loss.beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"loss.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


@dataclass
class DPOConfig:
    run_name: str = "dpo"
    output_dir: str = "runs"
    seed: int = 0
    model: str = "smollm2"
    reference_model: str | None = None  # default: the starting policy
    data: DataConfig = field(default_factory=DataConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    loss: DPOLossConfig = field(default_factory=DPOLossConfig)
    # The DPO paper: RMSprop, lr 1e-6, 150 warmup steps, batch 64.
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(name="rmsprop", lr=1e-6, warmup_steps=150))
    batch_size: int = 64           # pairs per optimizer step
    micro_batch_size: int = 8      # pairs per forward pass (gradient accumulation in between)
    epochs: int = 1
    max_steps: int | None = None
    eval_every: int = 50           # steps; 0 = only at the end
    autocast_bf16: bool = False
    reference_mode: str = "precompute"  # precompute (once, cached on disk) | on_the_fly (every batch)
    torch_threads: int | None = None  # per actor; default: all cores (actors take turns)
    address: str | None = None     # Ray address; default RAY_ADDRESS or a local cluster
    # Custom node resources per role, pinning it to nodes that offer them, e.g. {policy: {trainer: 1}}
    placement: dict[str, dict[str, float]] = field(default_factory=dict)
    policy: TrainingRoleConfig = field(default_factory=TrainingRoleConfig)  # num_workers > 1: FSDP2 group
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    snapshot_steps: list[int] = field(default_factory=list)  # save the policy (HF folder) after these steps too
    faults: FaultConfig = field(default_factory=FaultConfig)

    def validate(self) -> None:
        self.policy.validate("policy")
        self.checkpoint.validate()
        check_snapshot_steps("snapshot_steps", self.snapshot_steps, self.max_steps or 10**9)
        self.faults.validate()
        self.loss.validate()
        self.optimizer.validate()
        self.tokenize.validate()
        self.data.validate()
        check_step_plan(self)
        if self.reference_mode not in ("precompute", "on_the_fly"):
            raise ConfigError(f"reference_mode must be precompute or on_the_fly, got {self.reference_mode!r}")
        for key in ("model", "reference_model"):
            check_model(key, getattr(self, key))
        check_placement(self.placement, ("policy", "reference"))
        if self.policy.lora and self.reference_model not in (None, self.model):
            raise ConfigError(f"reference_model: with policy.lora the reference is the policy's own base model "
                              f"(adapters disabled), so it cannot be {self.reference_model!r}; drop reference_model")


def run_dir(config) -> Path:
    return Path(config.output_dir) / config.run_name


def _batch(pairs: list[EncodedPair], pad_id: int):
    return collate_pairs([p.prompt_ids for p in pairs], [p.chosen_ids for p in pairs],
                         [p.rejected_ids for p in pairs], pad_id)


class ReferenceLogps:
    """Reference log-probs by pair index: precomputed once (and cached on disk), or asked per batch.

    ``method``: the actor method that gives them: ``logprobs`` of a ReferenceActor, or
    ``reference_logprobs`` of a LoRA policy (its base model with the adapters disabled)."""

    def __init__(self, reference, model: str, pairs: list[EncodedPair], pad_id: int, mode: str,
                 method: str = "logprobs", needed: list[int] | None = None):
        self.reference, self.pairs, self.pad_id, self.mode, self.method = reference, pairs, pad_id, mode, method
        self.cached = False
        self.seconds = 0.0
        # ``needed``: the pair indices the run will ever ask for (a short run draws a fraction of a large
        # set; the demo's 24 steps x 16 use 384 of 3,672 pairs). Only those are precomputed.
        self.needed = list(range(len(pairs))) if needed is None else list(needed)
        if reference is not None and mode == "precompute" and self.needed:
            start = time.perf_counter()
            self.chosen, self.rejected, self.cached = reference_logps(
                reference, model, [pairs[i] for i in self.needed], pad_id, method=method)
            self.position = torch.full((len(pairs),), -1, dtype=torch.long)  # pair index -> row of the cache
            self.position[torch.tensor(self.needed, dtype=torch.long)] = torch.arange(len(self.needed))
            self.seconds = time.perf_counter() - start

    def __call__(self, index: list[int]):
        if self.reference is None:
            return None, None
        if self.mode == "precompute":
            rows = self.position[torch.tensor(index, dtype=torch.long)]
            if bool((rows < 0).any()):
                raise RuntimeError("reference log-probs were precomputed for the pairs this run's steps draw; "
                                   f"pair {index[int((rows < 0).nonzero()[0])]} is not among them")
            return self.chosen[rows], self.rejected[rows]
        start = time.perf_counter()
        sums = self.reference.run_one(self.method, _batch([self.pairs[i] for i in index], self.pad_id))["sum"]
        self.seconds += time.perf_counter() - start
        return sums[: len(index)], sums[len(index):]


def evaluate(policy, pairs, reference: ReferenceLogps, loss: dict, pad_id: int, micro: int, chunk: int = 64) -> dict:
    """Held-out preference accuracy, margins and loss, averaged over all eval pairs."""
    totals: dict[str, float] = {}
    for start in range(0, len(pairs), chunk):
        part = pairs[start:start + chunk]
        rc, rr = reference(list(range(start, start + len(part))))
        metrics = policy.run_one("eval_dpo", _batch(part, pad_id), rc, rr, loss, micro)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v * (1.0 if k == "tokens" else len(part) / len(pairs))
    return {f"eval/{k}": v for k, v in totals.items() if k != "tokens"}


def train(config: DPOConfig) -> dict:
    """Run DPO end to end (resuming and recovering from dead actors as configured); returns the summary
    written to ``summary.json``."""
    out = run_dir(config)
    tokenizer = load_tokenizer(config.model)
    train_pairs, eval_pairs, report = load_pair_splits(config.data, config.seed)
    train_enc, train_counts = encode_pairs(tokenizer, train_pairs, config.tokenize)
    eval_enc, _ = encode_pairs(tokenizer, eval_pairs, config.tokenize)
    if not train_enc:
        raise ConfigError(f"data.train: no usable pairs in {config.data.train!r} after validation and tokenization")
    print(f"[data] {len(train_enc)} train / {len(eval_enc)} eval pairs; {json.dumps(report)}; tokenize {json.dumps(train_counts)}")
    resume_from = resolve_resume(out, config.checkpoint.resume)
    save_config(config, out)  # the first write, once config and data are checked: a failed start writes nothing
    init_ray(config.address, namespace=f"rayalign-{config.run_name}")
    faults = FaultInjector(config.faults)
    return run_with_recovery(
        lambda start, recoveries: _train_attempt(config, tokenizer.pad_token_id, train_enc, eval_enc, start,
                                                 recoveries, faults),
        run_dir=out, resume_from=resume_from, max_recoveries=config.faults.max_recoveries)


def _train_attempt(config: DPOConfig, pad_id: int, train_enc, eval_enc, resume_from: Path | None,
                   recoveries: int, faults: FaultInjector) -> dict:
    out = run_dir(config)
    resources = ActorResources(torch_threads=config.torch_threads)
    frozen = dataclasses.replace(resources, max_restarts=config.faults.frozen_role_restarts,
                                 max_task_retries=config.faults.frozen_role_restarts)
    common = {"seed": config.seed, "autocast_bf16": config.autocast_bf16, "micro_batch_size": config.micro_batch_size}
    timeout = config.faults.call_timeout_s
    groups: dict[str, ActorGroup] = {}
    try:
        groups["policy"] = policy = build_training_group(
            PolicyActor, "policy", config.policy, resources=role_resources(resources, config.placement, "policy"),
            call_timeout_s=timeout,
            init_kwargs={"model": config.model, "optimizer": dataclasses.asdict(config.optimizer), **common})
        reference, method, reference_from = None, "logprobs", None
        if config.loss.variant in REFERENCE_FREE_VARIANTS:
            pass
        elif config.policy.lora:  # the LoRA policy is its own reference: its base, adapters disabled
            reference, method, reference_from = policy, "reference_logprobs", "policy with LoRA adapters disabled"
        else:
            reference_from = "reference actor"
            groups["reference"] = reference = ActorGroup(
                ReferenceActor, "reference", resources=role_resources(frozen, config.placement, "reference"),
                call_timeout_s=timeout, init_kwargs={"model": config.reference_model or config.model, **common})
        policy.wait_ready()
        roles = sorted(groups)  # the actors this run started (a LoRA policy needs no reference actor)
        ref_model = config.reference_model or config.model
        if reference is not None:
            reference.wait_ready()
        # Same model, same pairs: a LoRA policy's adapter-disabled log-probs share the reference cache.
        steps_per_epoch, total_steps = plan_steps(len(train_enc), config.batch_size, config.epochs, config.max_steps)
        batches = ShuffledBatches(len(train_enc), config.batch_size, config.seed)
        ref_train = ReferenceLogps(reference, ref_model, train_enc, pad_id, config.reference_mode, method,
                                   needed=batches.indices_within(total_steps))
        ref_eval = ReferenceLogps(reference, ref_model, eval_enc, pad_id, config.reference_mode, method)
        if reference is not None and config.reference_mode == "precompute":
            print(f"[reference] log-probs of {len(ref_train.needed)} training pairs (of {len(train_enc)}: those "
                  f"{total_steps} steps draw) and {len(eval_enc)} held-out pairs "
                  f"{'loaded from cache' if ref_train.cached else 'computed'} in {ref_train.seconds + ref_eval.seconds:.1f} s"
                  + (" (LoRA policy, adapters disabled)" if method == "reference_logprobs" else ""))
            if "reference" in groups:
                groups.pop("reference").shutdown()  # no longer needed: its memory is free for the policy
            reference = None

        loss = dataclasses.asdict(config.loss)
        guard = NonFiniteGuard(config.faults.max_nonfinite_in_row)
        loop, rows, wall_before = LoopState(), None, 0.0
        if resume_from is not None:
            check_resume(resume_from, config)
            driver = load_driver_state(resume_from)
            policy.run_one("load_state", str(resume_from / "policy"))
            batches.load_state_dict(driver["batches"])
            guard.load_state_dict(driver["guard"])
            loop, rows, wall_before = LoopState(**driver["loop"]), driver["metrics"], driver["wall_s"]
            set_rng_state(driver["rng"])
            print(f"[resume] from {resume_from} at step {loop.step}")
        logger = MetricsLogger(out, resume_rows=rows)
        writer = CheckpointWriter(out, config.checkpoint.keep, config)
        start_all = time.perf_counter()

        def train_step(index: list[int], step: int) -> dict:
            faults.maybe_kill(step, groups)
            rc, rr = ref_train(index)
            if faults.poison(step):
                rc = torch.full((len(index),), float("nan")) if rc is None else rc * float("nan")
            return policy.run_one("train_dpo", _batch([train_enc[i] for i in index], pad_id), rc, rr, loss,
                                  config.micro_batch_size)

        check_snapshot_steps("snapshot_steps", config.snapshot_steps, total_steps)

        def after_step(state: LoopState) -> None:
            save_snapshot_if_due(policy, out, state.step, config.snapshot_steps)
            every = config.checkpoint.every
            due = (every and state.step % every == 0) or state.step == total_steps
            if due and not guard.in_row:  # never checkpoint in the middle of a run of skipped updates
                driver_state = {"loop": dataclasses.asdict(state), "batches": batches.state_dict(),
                                "guard": guard.state_dict(), "metrics": logger.rows, "rng": rng_state(),
                                "wall_s": wall_before + time.perf_counter() - start_all}
                writer.write(state.step, lambda tmp: [_save_part(policy, tmp, "policy")], driver_state)

        loop = supervised_steps(
            desc=f"dpo[{config.loss.variant}]", total_steps=total_steps, steps_per_epoch=steps_per_epoch,
            batches=batches, train_step=train_step,
            evaluate=(lambda: evaluate(policy, eval_enc, ref_eval, loss, pad_id, config.micro_batch_size))
            if eval_enc else None, eval_every=config.eval_every, logger=logger, state=loop, after_step=after_step,
            guard=guard,
            postfix={"loss": ("loss", ".4f"), "acc": ("rewards/accuracies", ".2f"), "margin": ("rewards/margins", ".3f"),
                     "tok_s": ("perf/tokens_per_s", ".0f")})
        logger.close()
        checkpoint = out / "checkpoint"
        policy.run_one("save", str(checkpoint))
        save_config(config, checkpoint)
        reference_checksum = (reference.run_one("weights_checksum")
                              if reference is not None and method == "logprobs" else None)
    finally:
        for group in groups.values():
            group.shutdown()
    summary = {"steps": total_steps, "train_pairs": len(train_enc), "eval_pairs": len(eval_enc),
               "tokens_trained": loop.tokens, "wall_s": wall_before + time.perf_counter() - start_all,
               "reference_pairs": len(ref_train.needed),
               "reference_s": ref_train.seconds + ref_eval.seconds, "reference_checksum_end": reference_checksum,
               "roles": roles, "reference_from": reference_from,
               "checkpoint": str(checkpoint), "snapshots": saved_snapshots(out, config.snapshot_steps),
               "resumed_from": str(resume_from) if resume_from else None,
               "recoveries": recoveries, "faults_injected": faults.killed, "nonfinite_skipped_steps": guard.skipped_steps,
               "final": {k: v for k, v in logger.rows[-1].items()} if logger.rows else {}, **loop.last_eval}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"[done] {total_steps} steps; checkpoint {checkpoint}; metrics {logger.jsonl_path}")
    return summary


def _save_part(group: ActorGroup, folder: Path, name: str) -> str:
    group.run_one("save_state", str(folder / name))
    return name


def main(argv=None) -> int:
    return run_cli(DPOConfig, train, "python -m jobs.dpo", __doc__, argv, "key.sub=value overrides, e.g. loss.beta=0.5")


if __name__ == "__main__":
    raise SystemExit(main())

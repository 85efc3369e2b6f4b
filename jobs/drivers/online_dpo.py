"""Online (iterative) DPO over the PPO fleet minus the critic: the policy labels its own fresh samples.

    python -m jobs.online_dpo --preset online_dpo_tiny [key.sub=value ...]

One round: k samples per prompt from the CURRENT policy on the generation group -> scores by the reward
(a learned reward model, or a gold scorer: online-DPO-GT) -> per prompt, its best and worst sample as one
pair (ties and empty responses skipped; actors.math.online_pairs) -> the reference's log-probs of those
pairs (a fixed ReferenceActor, or a LoRA policy's adapter-disabled base) -> ``dpo_steps_per_round``
DPO steps (``train_dpo``, jobs.dpo's loss family) on them -> the new weights pushed to the generators.
Guo et al. 2024 ("Direct Language Model Alignment from Online AI Feedback") take one step per round;
more steps per round on each round's pairs is Xiong et al. 2024's iterative DPO. Checkpoints (every K
rounds), exact resume, NaN guards, the fleet and its evaluation are PPO's.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from actors.generation import generate_sharded
from actors.math.batch import collate_pairs
from actors.math.dpo_losses import REFERENCE_FREE_VARIANTS
from actors.math.online_pairs import best_worst_pairs
from actors.optim import OptimizerConfig
from actors.sampling import Completion, SamplingConfig
from jobs.data.source import DataConfig
from jobs.drivers.dpo import DPOLossConfig
from jobs.drivers.ppo import Fleet, build_fleet, evaluate
from jobs.drivers.ppo_config import RewardConfig, check_on_policy_run
from jobs.run.batching import TokenizeConfig
from jobs.run.snapshots import saved_snapshots
from jobs.run.checkpoint import CheckpointConfig
from jobs.run.cluster import TrainingRoleConfig
from jobs.run.config import ConfigError, run_cli
from jobs.run.faults import FaultConfig, FaultInjector
from jobs.run.prompt_run import run_prompt_job
from jobs.run.step_loop import open_policy_loop, save_policy_only


@dataclass
class OnlineDPOConfig:
    run_name: str = "online_dpo"
    output_dir: str = "runs"
    seed: int = 0
    model: str = "smollm2"             # the starting policy (an SFT checkpoint in the full pipeline)
    reference_model: str | None = None  # default: the starting policy (fixed for the whole run)
    data: DataConfig = field(default_factory=DataConfig)
    tokenize: TokenizeConfig = field(default_factory=lambda: TokenizeConfig(max_prompt_length=64, max_length=128))
    rollout: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=48))
    samples_per_prompt: int = 4        # k; the best and the worst of them make a prompt's pair (k >= 2)
    prompts_per_round: int = 16
    rounds: int = 20                   # sample -> label -> DPO steps -> weight sync; checkpoints count rounds
    dpo_steps_per_round: int = 1       # optimizer steps on each round's pairs (1: Guo et al.'s online DPO)
    min_gap: float = 0.0               # a prompt whose best and worst scores differ by no more gives no pair
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: DPOLossConfig = field(default_factory=DPOLossConfig)
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=5e-7))  # TRL's online DPO lr
    micro_batch_size: int = 8          # pairs per forward pass (the round's pairs are one optimizer step)
    num_generators: int = 1
    generation_backend: str = "auto"   # hf | vllm | auto
    generation_options: dict[str, Any] = field(default_factory=dict)
    eval_every: int = 10               # rounds; 0 = only at the start and the end
    eval_prompts: int = 32
    eval_samples_per_prompt: int = 1
    eval_scorer: str | None = "vader"  # gold scorer for evaluation (independent of the training reward)
    torch_threads: int | None = None
    address: str | None = None
    placement: dict[str, dict[str, float]] = field(default_factory=dict)
    policy: TrainingRoleConfig = field(default_factory=TrainingRoleConfig)  # lora: the base is the reference
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    snapshot_steps: list[int] = field(default_factory=list)  # save the policy (HF folder) after these rounds too
    faults: FaultConfig = field(default_factory=FaultConfig)

    def validate(self) -> None:
        if self.samples_per_prompt < 2:
            raise ConfigError(f"samples_per_prompt must be >= 2 (a pair needs a best and a worst sample), "
                              f"got {self.samples_per_prompt}")
        for key in ("prompts_per_round", "dpo_steps_per_round", "micro_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.min_gap < 0:
            raise ConfigError(f"min_gap must be >= 0, got {self.min_gap}")
        check_on_policy_run(self, "rounds", ("policy", "reference", "reward", "generator", "judge"))
        self.loss.validate()


def usable(c: Completion) -> bool:
    """A response with at least one token besides its stop token (an immediate EOS has nothing to prefer)."""
    return len(c.response_ids) > (1 if c.finish_reason == "stop" else 0)


def round_metrics(steps: list[dict]) -> dict:
    """The round's DPO steps as one row: losses and rewards averaged, tokens and update time summed, the last lr,
    ``skipped_nonfinite`` set when any step was skipped."""
    if not steps:
        return {"skipped_nonfinite": 0.0}
    row = {k: sum(s[k] for s in steps) / len(steps) for k in steps[0]}
    row.update({"tokens": sum(s["tokens"] for s in steps), "lr": steps[-1]["lr"],
                "skipped_nonfinite": max(s["skipped_nonfinite"] for s in steps)})
    if "timing_s/update" in row:
        row["timing_s/update"] = sum(s["timing_s/update"] for s in steps)
    return row


def train(config: OnlineDPOConfig) -> dict:
    """Run online DPO end to end (resuming and recovering from dead actors as configured); returns the summary
    written to ``summary.json``."""
    return run_prompt_job(config, _train_attempt)


def _label_round(fleet: Fleet, config: OnlineDPOConfig, completions: list[Completion], pad_id: int):
    """Scores of the round's samples, its pairs (chosen, rejected rows) and their DPO batch with the fixed
    reference's summed log-probs (None for reference-free variants or a round without pairs)."""
    scores = fleet.reward.run_one("score", [c.prompt_ids for c in completions],
                                  [c.response_ids for c in completions])["scores"]
    labels = scores.clone()
    if config.reward.missing_eos_penalty is not None:
        labels = labels - config.reward.missing_eos_penalty * torch.tensor(
            [float(c.finish_reason != "stop") for c in completions])
    if config.reward.clip is not None:
        labels = labels.clamp(-config.reward.clip, config.reward.clip)
    pairs = best_worst_pairs(labels.tolist(), [usable(c) for c in completions], config.samples_per_prompt,
                             config.min_gap)
    if not pairs:
        return scores, labels, pairs, None, None, None
    batch = collate_pairs([completions[w].prompt_ids for w, _ in pairs],
                          [completions[w].response_ids for w, _ in pairs],
                          [completions[l].response_ids for _, l in pairs], pad_id)
    if config.loss.variant in REFERENCE_FREE_VARIANTS:
        return scores, labels, pairs, batch, None, None
    sums = (fleet.reference or fleet.policy).get(fleet.reference_logprobs(batch), "reference logprobs")["sum"]
    return scores, labels, pairs, batch, sums[: len(pairs)], sums[len(pairs):]


def _train_attempt(config: OnlineDPOConfig, pad_id: int, train_ids, eval_ids, resume_from: Path | None,
                   recoveries: int, faults: FaultInjector) -> dict:
    out = Path(config.output_dir) / config.run_name
    fleet = build_fleet(config, critic=False, micro_batch_size=config.micro_batch_size)
    try:
        loss = dataclasses.asdict(config.loss)
        k = config.samples_per_prompt
        state = {"round": 0, "tokens_generated": 0, "tokens_trained": 0, "pairs": 0, "dpo_steps": 0,
                 "first_eval": {}, "last_eval": {}}
        loop = open_policy_loop(config, out, fleet, len(train_ids), config.prompts_per_round, "round", config.rounds,
                                state, resume_from, lambda: evaluate(fleet, eval_ids, config, pad_id))
        state, prompt_batches, guard = loop.state, loop.prompt_batches, loop.guard
        run_eval = (lambda: evaluate(fleet, eval_ids, config, pad_id)) if eval_ids else None
        if resume_from is None:
            print(f"[eval] round 0: {json.dumps({key: round(v, 4) for key, v in state['first_eval'].items()})}")
        bar = tqdm(range(state["round"] + 1, config.rounds + 1), desc=f"online_dpo[{config.loss.variant}]",
                   unit="round", dynamic_ncols=True, initial=state["round"], total=config.rounds)
        for step in bar:
            t_step = time.perf_counter()
            index = prompt_batches.next()
            faults.maybe_kill(step, fleet.groups())
            timing: dict[str, float] = {}

            t0 = time.perf_counter()
            sampling = dataclasses.replace(config.rollout, n=k, seed=config.seed * 100_003 + step)
            completions = generate_sharded(fleet.generators, [train_ids[i] for i in index], sampling)
            # best_worst_pairs reads rows g·k … g·k + k − 1 as prompt g's samples: make that order explicit
            completions = sorted(completions, key=lambda c: (c.prompt_index, c.sample_index))
            timing["generate"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            scores, labels, pairs, batch, ref_chosen, ref_rejected = _label_round(fleet, config, completions, pad_id)
            timing["label"] = time.perf_counter() - t0
            if batch is not None and faults.poison(step):
                ref_chosen = (torch.full((len(pairs),), float("nan")) if ref_chosen is None
                              else ref_chosen * float("nan"))

            t0 = time.perf_counter()
            steps = [fleet.policy.run_one("train_dpo", batch, ref_chosen, ref_rejected, loss, config.micro_batch_size)
                     for _ in range(config.dpo_steps_per_round if batch is not None else 0)]
            timing["update_actor"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            if steps:  # no pairs, no update: the generators already hold these weights
                fleet.push_weights(step)
            timing["sync_weights"] = time.perf_counter() - t0
            timing["step"] = time.perf_counter() - t_step

            dpo = round_metrics(steps)
            generated = sum(len(c.response_ids) for c in completions)
            state["tokens_generated"] += generated
            state["tokens_trained"] += int(dpo.get("tokens", 0))
            state["pairs"] += len(pairs)
            state["dpo_steps"] += len(steps)
            chosen, rejected = [w for w, _ in pairs], [l for _, l in pairs]
            metrics = {**{key: v for key, v in dpo.items() if key not in ("tokens", "timing_s/update")},
                       "reward/score_mean": float(scores.mean()), "reward/score_std": float(scores.std()),
                       "reward/chosen_score_mean": float(labels[chosen].mean()) if pairs else 0.0,
                       "reward/rejected_score_mean": float(labels[rejected].mean()) if pairs else 0.0,
                       "pairs/used": float(len(pairs)), "pairs/skipped_prompts": float(len(index) - len(pairs)),
                       "response_length/mean": generated / len(completions),
                       "perf/tokens_per_s": generated / timing["step"],
                       **{f"timing_s/{key}": v for key, v in timing.items()}}
            loop.end_step(step, index, metrics, run_eval, save_policy_only(fleet.policy))
            bar.set_postfix(score=f"{metrics['reward/score_mean']:+.3f}", pairs=len(pairs),
                            margin=f"{metrics.get('rewards/margins', 0.0):.3f}")
        checkpoint = loop.finish()
        weight_sync = "lora_adapters" if fleet.adapter_sync else ("merged_lora" if config.policy.lora else "full")
    finally:
        fleet.shutdown()
    summary = {"method": "online_dpo", "reward_kind": config.reward.kind, "rounds": config.rounds,
               "steps": state["dpo_steps"], "pairs": state["pairs"], "checkpoint": str(checkpoint),
               "snapshots": saved_snapshots(out, config.snapshot_steps),
               "wall_s": loop.wall_s(), "tokens_generated": state["tokens_generated"],
               "tokens_trained": state["tokens_trained"], "start": state["first_eval"], "end": state["last_eval"],
               "recoveries": recoveries, "resumed_from": str(resume_from) if resume_from else None,
               "faults_injected": faults.killed, "nonfinite_skipped_steps": guard.skipped_steps,
               "weight_sync": weight_sync, "roles": sorted(fleet.groups())}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"[eval] start {json.dumps(state['first_eval'])}\n[eval] end   {json.dumps(state['last_eval'])}")
    print(f"[done] {config.rounds} rounds ({state['dpo_steps']} DPO steps on {state['pairs']} pairs); "
          f"checkpoint {checkpoint}")
    return summary


def main(argv=None) -> int:
    return run_cli(OnlineDPOConfig, train, "python -m jobs.online_dpo", __doc__, argv,
                   "key.sub=value overrides, e.g. loss.beta=0.1 samples_per_prompt=4")


if __name__ == "__main__":
    raise SystemExit(main())

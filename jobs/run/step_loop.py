"""The bookkeeping every on-policy driver (PPO, critic-free RL, online DPO) does after each step.

After a step's update the driver hands its metrics to ``StepLoop.end_step``, which does, in this order:
the non-finite guard, the evaluation when due, the metrics row, the step counter, a policy snapshot when
``snapshot_steps`` asks for one, and a checkpoint when due (never inside a run of skipped updates, so a
resume starts from finite weights). ``finish`` writes the final policy folder and its config. One copy
of this order keeps the three drivers' resume behaviour the same.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from actors.runtime import rng_state
from jobs.run.checkpoint import CheckpointWriter
from jobs.run.config import save_config
from jobs.run.faults import NonFiniteGuard
from jobs.run.metrics import MetricsLogger
from jobs.run.prompt_run import resume_policy_run
from jobs.run.sampler import ShuffledBatches
from jobs.run.snapshots import save_snapshot_if_due

# save_actors(folder) -> the role names it saved (CheckpointWriter's contract)
SaveActors = Callable[[Path], list]


def save_policy_only(policy) -> SaveActors:
    """The checkpoint of a critic-free run: the policy's full training state."""

    def save_actors(folder: Path) -> list[str]:
        policy.run_one("save_state", str(folder / "policy"))
        return ["policy"]

    return save_actors


@dataclass
class StepLoop:
    config: Any                      # the driver's config: eval_every, snapshot_steps, checkpoint.every
    out: Path                        # the run folder
    policy: Any                      # the policy's actor group (snapshots, the final save)
    prompt_batches: ShuffledBatches
    guard: NonFiniteGuard
    writer: CheckpointWriter
    logger: MetricsLogger
    state: dict                      # the driver's counters, saved in every checkpoint
    counter: str                     # the state key of the loop counter ("step", "round")
    last: int                        # the final step: evaluated and checkpointed whatever the intervals
    wall_before: float = 0.0         # wall seconds spent before a resume
    started: float = field(default_factory=time.perf_counter)

    def wall_s(self) -> float:
        return self.wall_before + time.perf_counter() - self.started

    def eval_due(self, step: int) -> bool:
        every = self.config.eval_every
        return bool(every and step % every == 0) or step == self.last

    def checkpoint_due(self, step: int) -> bool:
        every = self.config.checkpoint.every
        return bool(every and step % every == 0) or step == self.last

    def end_step(self, step: int, index, metrics: dict, run_eval: Callable[[], dict] | None,
                 save_actors: SaveActors, **driver_state) -> None:
        """Close step ``step`` (prompts ``index``): ``run_eval`` is called when due (None: no eval prompts);
        ``driver_state`` (e.g. the KL controller's state) is saved in the checkpoint beside the common keys."""
        self.guard.observe(step, index, metrics)
        if run_eval is not None and self.eval_due(step):
            self.state["last_eval"] = run_eval()
            metrics.update(self.state["last_eval"])
        self.logger.log(step, metrics)
        self.state[self.counter] = step
        save_snapshot_if_due(self.policy, self.out, step, self.config.snapshot_steps)
        if self.checkpoint_due(step) and not self.guard.in_row:
            self.writer.write(step, save_actors, {
                "state": self.state, "batches": self.prompt_batches.state_dict(), "guard": self.guard.state_dict(),
                **driver_state, "metrics": self.logger.rows, "rng": rng_state(), "wall_s": self.wall_s()})

    def finish(self) -> Path:
        """Close the metrics and save the trained policy (an HF folder) with the run's config."""
        self.logger.close()
        checkpoint = self.out / "checkpoint"
        self.policy.run_one("save", str(checkpoint))
        save_config(self.config, checkpoint)
        return checkpoint


def open_policy_loop(config, out: Path, fleet, num_prompts: int, per_step: int, counter: str, last: int,
                     state: dict, resume_from: Path | None, evaluate: Callable[[], dict]) -> StepLoop:
    """The loop of a critic-free run (critic-free RL, online DPO): prompt order, guard, checkpoint writer and
    metrics, continued from ``resume_from`` when given (``state`` is then the checkpoint's), else started
    with ``evaluate()`` logged as row 0."""
    prompt_batches = ShuffledBatches(num_prompts, per_step, config.seed)
    guard = NonFiniteGuard(config.faults.max_nonfinite_in_row)
    writer = CheckpointWriter(out, config.checkpoint.keep, config)
    rows, wall_before = None, 0.0
    if resume_from is not None:
        state, rows, wall_before = resume_policy_run(resume_from, config, fleet, prompt_batches, guard, counter)
    loop = StepLoop(config, out, fleet.policy, prompt_batches, guard, writer, MetricsLogger(out, resume_rows=rows),
                    state, counter, last, wall_before)
    if resume_from is None:
        state["first_eval"] = state["last_eval"] = evaluate()
        loop.logger.log(0, state["first_eval"])
    return loop

"""Faults a long run must survive: non-finite updates, dead actors, and (for testing) injected ones.

- ``NonFiniteGuard`` counts skipped non-finite updates and stops a run after too many in a row.
- ``run_with_recovery`` runs a training attempt; when an actor dies (``ActorCallError``) it tears the
  attempt's actors down and starts a new attempt from the run's latest checkpoint, up to
  ``faults.max_recoveries`` times. Frozen roles (reference, reward, judge) are also restarted by Ray
  itself (``frozen_role_restarts``) with their in-flight calls retried, so their loss costs no rollback.
- ``FaultInjector`` kills an actor's process with SIGKILL at a chosen step, once per run, and marks
  steps whose inputs are poisoned with NaN: the same code paths a real crash or overflow takes.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from jobs.run.config import ConfigError


@dataclass
class FaultConfig:
    max_nonfinite_in_row: int = 3  # abort after this many skipped (non-finite) updates in a row
    max_recoveries: int = 2        # times a run recreates dead actors and resumes from its latest checkpoint
    call_timeout_s: float = 1800.0  # a remote call that blocks longer than this fails, naming role and method
    frozen_role_restarts: int = 3  # Ray restarts of a dead frozen actor (reference, reward, judge): no rollback
    # Chaos testing: SIGKILL the process of one actor of a role at the start of a step, once ("critic@3"),
    # and poison the inputs of these steps so their loss is NaN (reference log-probs for DPO, advantages for PPO).
    kill_at_step: str | None = None
    nan_at_steps: list[int] = field(default_factory=list)

    def validate(self) -> None:
        if self.max_nonfinite_in_row < 1:
            raise ConfigError(f"faults.max_nonfinite_in_row must be >= 1, got {self.max_nonfinite_in_row}")
        if self.max_recoveries < 0:
            raise ConfigError(f"faults.max_recoveries must be >= 0, got {self.max_recoveries}")
        if not self.call_timeout_s > 0:
            raise ConfigError(f"faults.call_timeout_s must be > 0, got {self.call_timeout_s}")
        if self.frozen_role_restarts < 0:
            raise ConfigError(f"faults.frozen_role_restarts must be >= 0, got {self.frozen_role_restarts}")
        if self.kill_at_step is not None:
            role, _, step = self.kill_at_step.partition("@")
            if not role or not step.isdigit() or int(step) < 1:
                raise ConfigError(f"faults.kill_at_step must look like ROLE@STEP (e.g. critic@3), got {self.kill_at_step!r}")
        if any(s < 1 for s in self.nan_at_steps):
            raise ConfigError(f"faults.nan_at_steps must hold steps >= 1, got {self.nan_at_steps}")

    def kill_target(self) -> tuple[str, int] | None:
        if not self.kill_at_step:
            return None
        role, _, step = self.kill_at_step.partition("@")
        return role, int(step)


class NonFiniteAbort(RuntimeError):
    """Too many non-finite updates in a row; the last good checkpoint is left as it was."""


class NonFiniteGuard:
    """Watches each step's ``skipped_nonfinite`` flag (set by the actor when the loss or the gradient
    was not finite and the update was skipped): logs the step and its batch rows, counts the skips,
    and raises ``NonFiniteAbort`` after ``max_in_row`` skipped steps in a row, before the step is
    logged or checkpointed, so the last checkpoint on disk stays the last good one."""

    def __init__(self, max_in_row: int = 3):
        self.max_in_row = max_in_row
        self.in_row = 0
        self.total = 0
        self.skipped_steps: list[int] = []

    def observe(self, step: int, batch_rows, metrics: dict) -> None:
        if not metrics.get("skipped_nonfinite"):
            self.in_row = 0
            return
        self.in_row += 1
        self.total += 1
        self.skipped_steps.append(step)
        rows = list(batch_rows)
        shown = ", ".join(str(r) for r in rows[:16]) + (", ..." if len(rows) > 16 else "")
        print(f"[nonfinite] step {step}: non-finite loss or gradient, update skipped "
              f"({self.in_row} in a row, {self.total} in all); batch rows [{shown}]")
        metrics["nonfinite/skipped_total"] = float(self.total)
        if self.in_row >= self.max_in_row:
            raise NonFiniteAbort(f"step {step}: {self.in_row} non-finite updates in a row "
                                 f"(faults.max_nonfinite_in_row={self.max_in_row}); stopping with the last "
                                 "checkpoint left as it was")

    def state_dict(self) -> dict:
        return {"in_row": self.in_row, "total": self.total, "skipped_steps": list(self.skipped_steps)}

    def load_state_dict(self, state: dict) -> None:
        self.in_row, self.total = int(state["in_row"]), int(state["total"])
        self.skipped_steps = list(state["skipped_steps"])


class FaultInjector:
    """Chaos testing from the config: kill one actor process of a role at a step (once per run, even
    when the step is replayed after the recovery), and NaN-poisoned steps."""

    def __init__(self, config: FaultConfig):
        self.target = config.kill_target()
        self.nan_steps = set(config.nan_at_steps)
        self.killed: list[dict] = []

    def maybe_kill(self, step: int, groups: dict) -> None:
        if self.target is None or self.killed:
            return
        role, at = self.target
        if step != at:
            return
        group = groups.get(role)
        if group is None:
            raise ConfigError(f"faults.kill_at_step: this run has no role {role!r} (roles: {', '.join(sorted(groups))})")
        actor = group.actors[0]
        pid = group.get(actor.__ray_call__.remote(_pid), f"{role} pid", 60)
        print(f"[fault] step {step}: SIGKILL to {group.names[0]} (pid {pid})")
        try:
            # Not retried: a role Ray restarts (max_task_retries) would otherwise be killed again and again.
            group.get(actor.__ray_call__.options(max_task_retries=0).remote(_kill_self), f"{role} kill", 60)
        except Exception:  # the call dies with its process: that is the point
            pass
        self.killed.append({"role": role, "step": step, "pid": pid})

    def poison(self, step: int) -> bool:
        return step in self.nan_steps


def _pid(_actor) -> int:
    return os.getpid()


def _kill_self(_actor) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def run_with_recovery(attempt, *, run_dir: str | Path, resume_from: Path | None, max_recoveries: int):
    """``attempt(resume_from, recoveries) -> result`` builds its actors, trains, and shuts its actors
    down in a ``finally``. When an actor dies mid-attempt, the next attempt starts from the newest
    checkpoint of the run (or from the beginning when there is none yet)."""
    from actors.group import ActorCallError
    from jobs.run.checkpoint import list_checkpoints

    recoveries = 0
    while True:
        try:
            return attempt(resume_from, recoveries)
        except ActorCallError as exc:
            if recoveries >= max_recoveries:
                raise ActorCallError(f"{exc} (gave up after {recoveries} recoveries; faults.max_recoveries="
                                     f"{max_recoveries})") from exc
            recoveries += 1
            found = list_checkpoints(run_dir)
            resume_from = found[-1] if found else None
            print(f"[recovery {recoveries}/{max_recoveries}] {exc}\n[recovery] recreating the actors and resuming "
                  f"from {resume_from or 'the start (no checkpoint yet)'}")

"""Policy snapshots at chosen steps: HF folders that an evaluation loads like any final checkpoint.

A run's intermediate policies are points of a reward-vs-KL frontier as much as its final one: with
``snapshot_steps: [10, 20]`` a training job saves ``<run>/snapshots/step_000010/`` (the same HF
folder as ``<run>/checkpoint``) after those steps, and lists them in its summary. Unlike the
resumable checkpoints (``jobs.run.checkpoint``: optimizer and RNG state too, pruned to ``keep``),
snapshots hold the policy's weights only and are never pruned.
"""

from __future__ import annotations

from pathlib import Path

from jobs.run.config import ConfigError

SNAPSHOTS = "snapshots"


def snapshot_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / SNAPSHOTS / f"step_{step:06d}"


def check_snapshot_steps(key: str, steps: list[int], total_steps: int) -> None:
    """Every snapshot step within 1..total_steps (the final step is the run's own checkpoint)."""
    bad = [s for s in steps if not 1 <= s <= total_steps]
    if bad:
        raise ConfigError(f"{key}: steps must be in 1..{total_steps} (the run's steps), got {bad}")
    if len(set(steps)) != len(steps):
        raise ConfigError(f"{key}: repeated steps in {steps}")


def save_snapshot_if_due(policy, run_dir: str | Path, step: int, steps: list[int]) -> str | None:
    """Save the policy (``policy.run_one("save", folder)``, an HF folder) when ``step`` is a snapshot step."""
    if step not in steps:
        return None
    folder = snapshot_path(run_dir, step)
    policy.run_one("save", str(folder))
    return str(folder)


def saved_snapshots(run_dir: str | Path, steps: list[int]) -> dict[str, str]:
    """{step: folder} of the requested snapshots on disk (a resumed run keeps the ones saved before it
    was interrupted). Keys are strings so the summary survives a JSON round trip unchanged."""
    found = {}
    for step in sorted(steps):
        folder = snapshot_path(run_dir, step)
        if (folder / "config.json").exists():
            found[str(step)] = str(folder)
    return found

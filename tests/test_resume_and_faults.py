"""Checkpoints, exact resume, recovery from killed actors, and non-finite updates (tiny model, real Ray).

"Interrupted" here means what happens on a real machine: an actor process gets SIGKILL at the start
of a step (``faults.kill_at_step``), and either the run resumes on its own (``faults.max_recoveries``)
or it stops and a second run continues it with ``checkpoint.resume=latest``. Each such run is compared
with an uninterrupted run of the same config: metrics and final weights must be bitwise equal
(everything on CPU is seeded and deterministic here, so no tolerance is needed).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from actors.group import ActorCallError
from jobs.run.checkpoint import CheckpointWriter, list_checkpoints, load_driver_state, read_manifest, resolve_resume
from jobs.run.config import ConfigError, build_config
from jobs.drivers.dpo import DPOConfig
from jobs.drivers.dpo import train as train_dpo
from jobs.run.faults import FaultConfig, NonFiniteAbort, NonFiniteGuard
from jobs.drivers.ppo import PPOConfig
from jobs.drivers.ppo import train as train_ppo
from jobs.run.sampler import ShuffledBatches

VOLATILE = ("timing_s/", "perf/")  # wall-clock measurements differ between any two runs


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if not k.startswith(VOLATILE)} for row in rows]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoint" / "model.safetensors"))


def _assert_same_run(a: Path, b: Path) -> None:
    ma, mb = _metrics(a), _metrics(b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for ra, rb in zip(ma, mb):
        assert ra.keys() == rb.keys(), ra["step"]
        for key in ra:
            same = ra[key] == rb[key] or (isinstance(ra[key], float) and math.isnan(ra[key]) and math.isnan(rb[key]))
            assert same, f"step {ra['step']} {key}: {ra[key]} != {rb[key]}"
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


# -- units: checkpoint folders, data position, the non-finite guard -----------------------------------
def test_interrupted_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    writer = CheckpointWriter(tmp_path, keep=2, config={"lr": 1})

    def save_ok(folder):
        (folder / "policy").mkdir()
        (folder / "policy" / "state.bin").write_bytes(b"ok")
        return ["policy"]

    def save_crashes(folder):
        (folder / "policy").mkdir()
        (folder / "policy" / "state.bin").write_bytes(b"half")
        raise OSError("disk full")

    writer.write(2, save_ok, {"step": 2})
    with pytest.raises(OSError, match="disk full"):
        writer.write(4, save_crashes, {"step": 4})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002"]
    latest = resolve_resume(tmp_path, "latest")
    assert latest.name == "step_000002" and load_driver_state(latest) == {"step": 2}
    assert read_manifest(latest)["parts"] == ["policy"]
    # The next successful write publishes its step and clears the half-written folder of the dead writer.
    for step in (4, 6, 8):
        writer.write(step, save_ok, {"step": step})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000006", "step_000008"]


def test_resume_from_a_folder_without_manifest_is_refused(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(ConfigError, match="no manifest.json"):
        resolve_resume(tmp_path, str(tmp_path / "half"))
    assert resolve_resume(tmp_path, "latest") is None  # nothing yet: a fresh start
    with pytest.raises(ConfigError, match="checkpoint.resume: no checkpoint folder"):
        build_config(DPOConfig, "dpo_tiny", [f"checkpoint.resume={tmp_path / 'missing'}"])


def test_data_position_round_trips_and_refuses_a_different_dataset():
    a = ShuffledBatches(10, 4, seed=3)
    for _ in range(3):
        a.next()
    state = a.state_dict()
    b = ShuffledBatches(10, 4, seed=3)
    b.load_state_dict(state)
    assert [a.next() for _ in range(6)] == [b.next() for _ in range(6)]
    with pytest.raises(ValueError, match="the data or batch size changed"):
        ShuffledBatches(11, 4, seed=3).load_state_dict(state)


def test_guard_counts_skips_and_aborts_after_too_many_in_a_row():
    guard = NonFiniteGuard(max_in_row=2)
    guard.observe(1, [0, 1], {"skipped_nonfinite": 1.0})
    guard.observe(2, [2, 3], {"skipped_nonfinite": 0.0})
    guard.observe(3, [4, 5], {"skipped_nonfinite": 1.0})
    with pytest.raises(NonFiniteAbort, match="step 4: 2 non-finite updates in a row"):
        guard.observe(4, [6, 7], {"skipped_nonfinite": 1.0})
    assert guard.skipped_steps == [1, 3, 4] and guard.total == 3


@pytest.mark.parametrize("kill", ["policy", "policy@", "@3", "policy@0"])
def test_malformed_fault_injection_is_rejected(kill):
    with pytest.raises(ConfigError, match="faults.kill_at_step"):
        FaultConfig(kill_at_step=kill).validate()


# -- DPO ----------------------------------------------------------------------------------------------
DPO_ARGS = ["max_steps=6", "checkpoint.every=2", "eval_every=3"]


def _dpo(tmp_path, name, *extra):
    return build_config(DPOConfig, "dpo_tiny", [f"output_dir={tmp_path}", f"run_name={name}", *DPO_ARGS, *extra])


@pytest.fixture(scope="module")
def dpo_reference(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo_resume")
    summary = train_dpo(_dpo(out, "full"))
    return out, summary


@pytest.mark.slow
def test_dpo_writes_checkpoints_and_prunes_to_keep(dpo_reference):
    out, summary = dpo_reference
    names = [p.name for p in list_checkpoints(out / "full")]
    assert names == ["step_000004", "step_000006"]  # keep=2 of 2, 4, 6
    manifest = read_manifest(out / "full" / "checkpoints" / "step_000006")
    assert manifest["step"] == 6 and manifest["parts"] == ["policy"]
    state = load_driver_state(out / "full" / "checkpoints" / "step_000006")
    assert state["loop"]["step"] == 6 and len(state["metrics"]) == 6
    assert summary["recoveries"] == 0


@pytest.mark.slow
def test_dpo_interrupted_then_resumed_equals_the_uninterrupted_run(dpo_reference):
    out, _ = dpo_reference
    # The policy process is killed at step 5 and the run is not allowed to recover: it stops.
    with pytest.raises(ActorCallError, match="policy.train_dpo: actor 'policy' of role 'policy' died"):
        train_dpo(_dpo(out, "cut", "faults.kill_at_step=policy@5", "faults.max_recoveries=0"))
    assert [p.name for p in list_checkpoints(out / "cut")] == ["step_000002", "step_000004"]
    summary = train_dpo(_dpo(out, "cut", "checkpoint.resume=latest"))
    assert summary["resumed_from"].endswith("step_000004")
    _assert_same_run(out / "full", out / "cut")


def _raw_scalar_events(folder: Path) -> list[tuple[str, int]]:
    """(tag, step) of every scalar event in every event file, as any reader of the files sees them."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [(value.tag, event.step) for path in sorted(folder.glob("events.out.tfevents.*"))
            for event in EventFileLoader(str(path)).Load() if event.HasField("summary") for value in event.summary.value]


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
            if not tag.startswith(VOLATILE)}


@pytest.mark.slow
def test_resume_leaves_metrics_and_tensorboard_as_an_uninterrupted_run(dpo_reference, tmp_path):
    """Resuming a finished run from its step-4 checkpoint: the steps after 4 written by the first pass are
    dropped from metrics.jsonl, metrics.csv and TensorBoard's event files, so every step is there once, with
    the uninterrupted run's values (a raw reader of the event files sees each (tag, step) once, not only
    TensorBoard's own purging reader)."""
    import pandas as pd

    out, _ = dpo_reference
    again = tmp_path / "again"
    shutil.copytree(out / "full", again)
    train_dpo(_dpo(tmp_path, "again", f"checkpoint.resume={again}/checkpoints/step_000004"))
    _assert_same_run(out / "full", again)
    assert [r["step"] for r in _metrics(again)] == [1, 2, 3, 4, 5, 6]
    csv_a, csv_b = pd.read_csv(out / "full" / "metrics.csv"), pd.read_csv(again / "metrics.csv")
    assert list(csv_b["step"]) == [1, 2, 3, 4, 5, 6] and list(csv_a.columns) == list(csv_b.columns)
    stable = [c for c in csv_a.columns if not c.startswith(VOLATILE)]
    pd.testing.assert_frame_equal(csv_a[stable], csv_b[stable])
    raw = _raw_scalar_events(again / "tensorboard")
    assert len(raw) == len(set(raw)), sorted(k for k in raw if raw.count(k) > 1)[:4]
    assert sorted(raw) == sorted(_raw_scalar_events(out / "full" / "tensorboard"))
    assert _scalars(again / "tensorboard") == _scalars(out / "full" / "tensorboard")


@pytest.mark.slow
def test_dpo_recovers_from_a_killed_policy_on_its_own(dpo_reference):
    out, _ = dpo_reference
    summary = train_dpo(_dpo(out, "killed", "faults.kill_at_step=policy@5"))
    assert summary["recoveries"] == 1 and summary["faults_injected"][0]["role"] == "policy"
    _assert_same_run(out / "full", out / "killed")


@pytest.mark.slow
def test_dpo_injected_nan_is_skipped_counted_and_aborts_in_a_row(ray_cluster, tmp_path):
    summary = train_dpo(_dpo(tmp_path, "nan", "faults.nan_at_steps=[3]"))
    assert summary["nonfinite_skipped_steps"] == [3]
    rows = {r["step"]: r for r in _metrics(tmp_path / "nan")}
    assert rows[3]["skipped_nonfinite"] == 1.0 and rows[3]["nonfinite/skipped_total"] == 1.0
    assert math.isnan(rows[3]["loss"]) and all(rows[s]["skipped_nonfinite"] == 0.0 for s in (1, 2, 4, 5, 6))

    with pytest.raises(NonFiniteAbort, match="step 5: 3 non-finite updates in a row"):
        train_dpo(_dpo(tmp_path, "abort", "checkpoint.every=1", "faults.nan_at_steps=[3,4,5]"))
    # The last checkpoint is the last good step's, complete and loadable; nothing was written after it.
    latest = resolve_resume(tmp_path / "abort", "latest")
    assert latest.name == "step_000002" and load_driver_state(latest)["loop"]["step"] == 2
    assert (latest / "policy" / "trainer_state.pt").exists()


# -- PPO ----------------------------------------------------------------------------------------------
PPO_ARGS = ["steps=5", "checkpoint.every=2", "prompts_per_step=8", "eval_every=0", "eval_prompts=8"]


def _ppo(tmp_path, name, *extra):
    return build_config(PPOConfig, "ppo_tiny", [f"output_dir={tmp_path}", f"run_name={name}", *PPO_ARGS, *extra])


@pytest.fixture(scope="module")
def ppo_reference(ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_resume")
    summary = train_ppo(_ppo(out, "full"))
    return out, summary


@pytest.mark.slow
def test_ppo_interrupted_then_resumed_equals_the_uninterrupted_run(ppo_reference):
    out, full = ppo_reference
    with pytest.raises(ActorCallError, match="critic"):
        train_ppo(_ppo(out, "cut", "faults.kill_at_step=critic@4", "faults.max_recoveries=0"))
    summary = train_ppo(_ppo(out, "cut", "checkpoint.resume=latest"))
    assert summary["resumed_from"].endswith("step_000002")
    assert summary["kl_coef_final"] == full["kl_coef_final"]
    _assert_same_run(out / "full", out / "cut")
    critic_a = torch.load(out / "full" / "checkpoints" / "step_000005" / "critic" / "trainer_state.pt", weights_only=False)
    critic_b = torch.load(out / "cut" / "checkpoints" / "step_000005" / "critic" / "trainer_state.pt", weights_only=False)
    assert all(torch.equal(critic_a["model"][k], critic_b["model"][k]) for k in critic_a["model"])


# Stateful roles (policy, critic, generator) are recreated and restored from the latest checkpoint
# (a recovery); frozen roles (reference, reward, judge) are restarted by Ray with their calls retried.
@pytest.mark.slow
# CI covers a recovered stateful role (policy, critic) and a restarted frozen one (reward); the other three
# take the same two paths and run with -m extended.
@pytest.mark.parametrize("role, recoveries", [
    ("policy", 1), ("critic", 1), pytest.param("generator", 1, marks=pytest.mark.extended),
    pytest.param("reference", 0, marks=pytest.mark.extended), ("reward", 0),
    pytest.param("judge", 0, marks=pytest.mark.extended)])
def test_ppo_survives_a_killed_actor_of_each_role(ppo_reference, role, recoveries):
    out, _ = ppo_reference
    summary = train_ppo(_ppo(out, f"kill-{role}", f"faults.kill_at_step={role}@4"))
    assert summary["faults_injected"][0]["role"] == role
    assert summary["recoveries"] == recoveries
    _assert_same_run(out / "full", out / f"kill-{role}")


@pytest.mark.slow
def test_ppo_injected_nan_is_skipped_and_counted(ray_cluster, tmp_path):
    summary = train_ppo(_ppo(tmp_path, "nan", "steps=3", "faults.nan_at_steps=[2]"))
    assert summary["nonfinite_skipped_steps"] == [2]
    rows = {r["step"]: r for r in _metrics(tmp_path / "nan")}
    assert rows[2]["skipped_nonfinite"] == 1.0 and rows[1]["skipped_nonfinite"] == 0.0

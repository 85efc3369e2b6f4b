"""Policy snapshots: which steps are accepted, and what a run's summary lists after a restart."""

from pathlib import Path

import pytest

from jobs.run.config import ConfigError
from jobs.run.snapshots import check_snapshot_steps, save_snapshot_if_due, saved_snapshots, snapshot_path


class _Policy:
    """Stands in for a policy group's ``run_one("save", folder)``: writes the HF folder's config.json."""

    def __init__(self):
        self.saved = []

    def run_one(self, method, folder):
        assert method == "save"
        snapshot = Path(folder)
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text("{}")
        self.saved.append(folder)


def test_snapshot_steps_must_lie_inside_the_run():
    check_snapshot_steps("ppo.snapshot_steps", [1, 5, 10], 10)
    with pytest.raises(ConfigError, match=r"ppo.snapshot_steps: steps must be in 1..10 \(the run's steps\), got \[0, 11\]"):
        check_snapshot_steps("ppo.snapshot_steps", [0, 5, 11], 10)
    with pytest.raises(ConfigError, match="repeated"):
        check_snapshot_steps("snapshot_steps", [2, 2], 10)


def test_only_due_steps_are_saved_and_the_summary_lists_what_is_on_disk(tmp_path):
    policy = _Policy()
    for step in range(1, 7):
        save_snapshot_if_due(policy, tmp_path, step, [2, 4, 6])
    assert policy.saved == [str(snapshot_path(tmp_path, s)) for s in (2, 4, 6)]
    # A run restarted after step 4 lists the snapshots its first life saved, and no others.
    assert saved_snapshots(tmp_path, [2, 4, 6, 8]) == {"2": str(snapshot_path(tmp_path, 2)),
                                                       "4": str(snapshot_path(tmp_path, 4)),
                                                       "6": str(snapshot_path(tmp_path, 6))}

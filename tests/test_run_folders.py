"""Run folders are never silently reused (issue 21 points 1 and 2), through the real command line.

One tiny DPO run, started by ``python -m jobs.dpo``'s own ``main`` in this process (the session's Ray
cluster), leaves a finished run folder. Every start below that must not touch it is checked by hashing
every file in the folder before and after: a refused rerun, a resume with a changed config, and starts
that fail on a bad data file or config value with ``--resume`` / ``--overwrite``. ``--overwrite`` moves
the old run aside whole (a second real run); ``jobs.compare``'s rule (same config continues) is checked
on its real command line with the experiment itself replaced (tests/test_compare.py runs it).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from jobs.drivers import compare, dpo
from jobs.run.config import save_config
from jobs.run.run_folder import list_checkpoints

FIXTURES = Path(__file__).parent / "fixtures"
HINT = " [traceback: --debug or RAYALIGN_DEBUG=1]\n"
RUN_ARGS = ["max_steps=4", "checkpoint.every=2", "eval_every=2"]


def tree_hashes(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256) and every sub-folder (-> "dir")."""
    found = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        found[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _argv(root: Path, data: Path, *extra: str) -> list[str]:
    return ["--preset", "dpo_tiny", f"output_dir={root}", "run_name=run", "--data", f"jsonl:{data}", *RUN_ARGS, *extra]


def _refused(capsys, argv: list[str], monkeypatch) -> str:
    """The one stderr line (hint removed) of a start that must stop before anything is written or started."""
    monkeypatch.setattr(dpo, "init_ray", lambda *a, **k: pytest.fail("init_ray was called"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        dpo.main(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith(HINT), err
    return err.removesuffix(HINT)


@pytest.fixture(scope="module")
def finished(ray_cluster, tmp_path_factory):
    """A finished run (checkpoints at steps 2 and 4), made by the real CLI, and the data file it read."""
    root = tmp_path_factory.mktemp("run_folders")
    data = root / "pairs.jsonl"
    shutil.copy(FIXTURES / "sentiment_pairs.jsonl", data)
    assert dpo.main(_argv(root, data)) == 0
    folder = root / "run"
    assert [p.name for p in list_checkpoints(folder)] == ["step_000002", "step_000004"]
    return root, data, folder


def test_rerun_of_a_finished_folder_is_refused_and_names_the_ways_on(finished, capsys, monkeypatch):
    root, data, folder = finished
    before = tree_hashes(folder)
    line = _refused(capsys, _argv(root, data), monkeypatch)
    assert line == (f"run folder error: {folder} already holds a run (config.yaml, metrics.jsonl, metrics.csv, "
                    "summary.json, checkpoints/, checkpoint/, tensorboard/); continue it with --resume, start a new "
                    "one with run_name=<new name>, or move it aside with --overwrite (to run.old-<time>)")
    assert tree_hashes(folder) == before
    assert sorted(p.name for p in root.iterdir()) == ["pairs.jsonl", "run"]


def test_resume_with_a_changed_config_is_refused_naming_the_keys(finished, capsys, monkeypatch):
    root, data, folder = finished
    before = tree_hashes(folder)
    # torch_threads and micro_batch_size do not change what is computed: not listed.
    line = _refused(capsys, _argv(root, data, "--resume", "loss.beta=0.5", "max_steps=6", "torch_threads=2",
                                  "micro_batch_size=4"), monkeypatch)
    assert line == (f"run folder error: --resume: the config differs from the one {folder}/checkpoints/step_000004 "
                    "was written with (loss.beta: 0.1 -> 0.5; max_steps: 4 -> 6); resume with the same values, or "
                    "start a new run without --resume under a new run_name=<name>")
    assert tree_hashes(folder) == before


def test_overwrite_and_resume_together_are_refused(finished, capsys, monkeypatch):
    root, data, folder = finished
    line = _refused(capsys, _argv(root, data, "--resume", "--overwrite"), monkeypatch)
    assert line.startswith(f"run folder error: --overwrite and --resume contradict each other: --resume continues "
                           f"the run in {folder}")


BAD_ROW = b'{"prompt": "Q?", "chosen": " \\n ", "rejected": "B."}\n'


@pytest.mark.parametrize("how", ["resume_bad_data", "overwrite_bad_data", "resume_bad_config", "overwrite_bad_config"])
def test_a_failed_start_leaves_the_folder_byte_for_byte(finished, capsys, monkeypatch, how):
    """Config and data are checked before the first write: a start that fails leaves every file of the run
    as it was (a resume may change torch_threads, which must not reach config.yaml either), nothing is
    moved aside, and a new run_name that fails creates no folder at all."""
    root, data, folder = finished
    before = tree_hashes(folder)
    flag = "--resume" if how.startswith("resume") else "--overwrite"
    good = data.read_bytes()
    try:
        if how.endswith("bad_data"):
            data.write_bytes(good + BAD_ROW)  # the run's own data file, now with a bad row 97
            expected = f"data error: {data}: row 97, field 'chosen': empty text"
            extra = [flag, "torch_threads=2"]
        else:
            expected = "config error: loss.beta must be > 0, got -1.0"
            extra = [flag, "loss.beta=-1"]
        assert _refused(capsys, _argv(root, data, *extra), monkeypatch) == expected
        assert tree_hashes(folder) == before
        assert sorted(p.name for p in root.iterdir()) == ["pairs.jsonl", "run"]
        if how.endswith("bad_data"):  # the same failure in a new folder writes nothing
            assert _refused(capsys, _argv(root, data, "run_name=fresh"), monkeypatch) == expected
            assert not (root / "fresh").exists()
    finally:
        data.write_bytes(good)


def test_overwrite_moves_the_old_run_aside_whole(finished, tmp_path):
    """A second real run with --overwrite: the old run lies under run.old-<time> exactly as it was, and the
    new folder holds only the new run's files (its one checkpoint, its two metrics rows)."""
    root, data, folder = finished
    copy = tmp_path / "run"
    shutil.copytree(folder, copy)  # the module's run stays in place for the other tests
    before = tree_hashes(copy)
    assert dpo.main(["--preset", "dpo_tiny", f"output_dir={tmp_path}", "run_name=run", "--data", f"jsonl:{data}",
                     "max_steps=2", "checkpoint.every=0", "eval_every=0", "--overwrite"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and tree_hashes(aside[0]) == before
    assert [p.name for p in list_checkpoints(copy)] == ["step_000002"]
    assert (copy / "metrics.jsonl").read_text().count("\n") == 2


# -- jobs.compare: the same config continues (its finished stages are skipped); another one is refused ----
def test_compare_continues_the_same_config_and_refuses_another(tmp_path, capsys, monkeypatch):
    started = []

    def experiment(config):  # run_experiment's first write, then what a rerun would find
        save_config(config, Path(config.output_dir) / config.run_name)
        started.append(config.dpo_betas)

    monkeypatch.setattr(compare, "run_experiment", experiment)
    argv = ["--preset", "compare_tiny", f"output_dir={tmp_path}", "run_name=cmp"]
    assert compare.main(argv) == 0
    (tmp_path / "cmp" / "stages").mkdir()
    assert compare.main(argv + ["torch_threads=1"]) == 0  # same computation: continues
    before = tree_hashes(tmp_path / "cmp")
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        compare.main(argv + ["dpo_betas=[0.2]"])
    assert caught.value.code == 2
    betas = started[0]
    assert capsys.readouterr().err == (
        f"run folder error: {tmp_path}/cmp holds a run with a different config (dpo_betas: {betas!r} -> [0.2]); "
        f"rerun the same config to continue it, start a new one with run_name=<new name>, or move it aside "
        f"with --overwrite (to cmp.old-<time>){HINT}")
    assert tree_hashes(tmp_path / "cmp") == before and len(started) == 2
    assert compare.main(argv + ["dpo_betas=[0.2]", "--overwrite"]) == 0
    assert started[-1] == [0.2]
    assert [p.name.startswith("cmp.old-") for p in sorted(tmp_path.iterdir())] == [False, True]


def test_a_folder_from_before_a_section_existed_continues_until_the_section_is_used(tmp_path, capsys, monkeypatch):
    """A comparison started by an earlier version has no `ppo_gt` key in its config.yaml; the new field's
    empty default computes what that version computed, so the same preset continues, and a value in the
    new section is a change like any other."""
    import yaml

    monkeypatch.setattr(compare, "run_experiment",
                        lambda config: save_config(config, Path(config.output_dir) / config.run_name))
    argv = ["--preset", "compare_tiny", f"output_dir={tmp_path}", "run_name=cmp"]
    assert compare.main(argv) == 0
    (tmp_path / "cmp" / "stages").mkdir()
    saved = tmp_path / "cmp" / "config.yaml"
    old = yaml.safe_load(saved.read_text())
    assert old.pop("ppo_gt") == {}
    saved.write_text(yaml.safe_dump(old))  # as the earlier version wrote it
    assert compare.main(argv) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        compare.main(argv + ["ppo_gt.snapshot_steps=[]"])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "(ppo_gt.snapshot_steps: '<unset>' -> [])" in err, err

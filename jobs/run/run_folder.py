"""Run folders are never silently reused: what ``python -m jobs.<name>`` checks before it writes anything.

A folder "holds a run" when it has any of :data:`RUN_FILES` (``config.yaml``, ``metrics.jsonl``,
``checkpoints/`` ...). Starting a job there is refused with one line (:class:`RunFolderError`, exit 2)
unless the command says what to do with the old run:

- ``--resume`` / ``--resume-from PATH``: continue it; refused when the saved config differs from the
  requested one on a key that changes the computation (:func:`computation_diff` lists them, old -> new);
- a new ``run_name=...``: another folder;
- ``--overwrite``: the old run is moved aside whole to ``<folder>.old-<YYYYmmdd-HHMMSS>`` (never deleted,
  never mixed with the new files), at the new run's first write, i.e. after its config and data were
  checked, so a start that fails validation leaves the folder exactly as it was.

``jobs.compare`` (``same_config_continues``) caches finished stages in its folder: a rerun with the same
config continues it; a different config is refused the same way.

The check is the command line's (:func:`jobs.run.config.run_cli`); a driver's ``train()`` called from
Python (tests, ``jobs.compare``'s stages) writes where it is told. This module imports nothing from the
project but :mod:`jobs.run.cli`, so ``jobs.run.config`` and ``jobs.run.checkpoint`` can both use it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from jobs.run.cli import UserError

MANIFEST = "manifest.json"
PREFIX = "step_"
CONFIG_FILE = "config.yaml"
RUN_FILES = ("config.yaml", "metrics.jsonl", "metrics.csv", "summary.json", "checkpoints", "checkpoint",
             "tensorboard", "stages", "report.html")

# Keys that do not change what a run computes, so a resume may change them: where the run lives and
# connects, how its checkpoints and fault handling are set, and how the same computation is laid out
# or fitted into memory (a sharded checkpoint resumes on another world size by design).
IGNORED_TOP = {"run_name", "output_dir", "address", "checkpoint", "placement"}
IGNORED_PATHS = {"faults.kill_at_step", "faults.max_recoveries", "faults.call_timeout_s", "faults.frozen_role_restarts"}
IGNORED_ANYWHERE = {"torch_threads", "num_workers", "strategy", "colocate_with", "share", "fsdp",
                    "gradient_checkpointing", "offload_optimizer", "packing", "micro_batch_size"}


class RunFolderError(UserError):
    """A start that would reuse or mix up an existing run: one line, exit 2, nothing written."""

    label = "run folder error"


# -- checkpoints on disk (the pure path part; jobs.run.checkpoint writes and loads them) ---------------
def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (with a manifest), oldest first. Temporary folders are ignored."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / MANIFEST).exists()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def read_manifest(folder: str | Path) -> dict:
    return json.loads((Path(folder) / MANIFEST).read_text())


# -- what a folder holds, and how two configs differ ----------------------------------------------------
def run_contents(folder: str | Path) -> list[str]:
    """The run files present in ``folder`` (folders with a trailing ``/``); empty when it holds no run."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [name + ("/" if (folder / name).is_dir() else "") for name in RUN_FILES if (folder / name).exists()]


def _flatten(data, prefix: str = "") -> dict:
    if not isinstance(data, dict) or (prefix and not data):
        return {prefix: data}
    flat: dict = {}
    for key, value in data.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _ignored(key: str) -> bool:
    parts = key.split(".")
    return parts[0] in IGNORED_TOP or key in IGNORED_PATHS or any(p in IGNORED_ANYWHERE for p in parts)


def computation_diff(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every key (dotted) whose value differs and that changes the computation.

    A key that one side lacks and the other leaves empty (``{}`` or None) is no change: a field added
    since the run started, whose empty default keeps the computation as it was (a run folder written by
    the earlier version continues), or an empty section beside the keys now set inside it."""
    a, b = _flatten(old), _flatten(new)
    missing = "<unset>"

    def empty_on_one_side(key: str) -> bool:
        return (key not in a and b[key] in ({}, None)) or (key not in b and a[key] in ({}, None))

    return [f"{key}: {a.get(key, missing)!r} -> {b.get(key, missing)!r}"
            for key in sorted(set(a) | set(b))
            if not _ignored(key) and a.get(key, missing) != b.get(key, missing) and not empty_on_one_side(key)]


def _saved_config(path: Path) -> dict | None:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def checkpoint_config(checkpoint: Path) -> dict | None:
    """The config a checkpoint was written with: its manifest's, else its run folder's ``config.yaml``."""
    saved = read_manifest(checkpoint).get("config")
    return saved if isinstance(saved, dict) else _saved_config(checkpoint.parent.parent / CONFIG_FILE)


# -- the check before a start ---------------------------------------------------------------------------
def check_start(folder: str | Path, config: dict, *, resume: str | None = None, resumable: bool = False,
                overwrite: bool = False, same_config_continues: bool = False) -> None:
    """Refuse (RunFolderError) a start that would reuse ``folder``'s run without being told how; reads only.

    ``config``: the requested config as plain data (what ``config.yaml`` will hold); ``resume``:
    ``checkpoint.resume`` (``latest`` or a checkpoint folder); ``resumable``: the job takes ``--resume``."""
    folder = Path(folder)
    new_name = "start a new one with run_name=<new name>"
    aside = f"move it aside with --overwrite (to {folder.name}.old-<time>)"
    if resume:
        if overwrite:
            raise RunFolderError(f"--overwrite and --resume contradict each other: --resume continues the run in "
                                 f"{folder}, --overwrite moves it aside to start afresh; give one")
        _check_resume(folder, config, resume)
        return
    contents = run_contents(folder)
    if not contents or overwrite:
        return
    if same_config_continues:
        saved = _saved_config(folder / CONFIG_FILE)
        diff = computation_diff(saved, config) if saved is not None else ["config.yaml: missing or unreadable"]
        if not diff:
            return  # the same experiment: continue it (finished stages are skipped)
        raise RunFolderError(f"{folder} holds a run with a different config ({'; '.join(diff)}); rerun the same "
                             f"config to continue it, {new_name}, or {aside}")
    ways = (f"continue it with --resume, {new_name}, or {aside}" if resumable else f"{new_name}, or {aside}")
    raise RunFolderError(f"{folder} already holds a run ({', '.join(contents)}); {ways}")


def _check_resume(folder: Path, config: dict, resume: str) -> None:
    if resume == "latest":
        found = list_checkpoints(folder)
        source = found[-1] if found else folder / CONFIG_FILE
    else:
        source = Path(resume)
        if not (source / MANIFEST).exists():
            return  # the driver refuses it (checkpoint.resume: ... has no manifest.json) before writing
    saved = checkpoint_config(source) if source.name != CONFIG_FILE else _saved_config(source)
    if saved is None:
        return  # nothing saved to compare with (a fresh folder: --resume starts afresh)
    diff = computation_diff(saved, config)
    if diff:
        raise RunFolderError(f"--resume: the config differs from the one {source} was written with "
                             f"({'; '.join(diff)}); resume with the same values, or start a new run without "
                             f"--resume under a new run_name=<name>")


# -- --overwrite: the old run moves aside at the new run's first write ------------------------------------
_MOVE_ASIDE: set[Path] = set()


def move_aside(folder: str | Path) -> Path:
    """Rename ``folder`` to ``<folder>.old-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3`` ... if taken); never deletes."""
    folder = Path(folder)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = folder.with_name(f"{folder.name}.old-{stamp}"), 1
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.old-{stamp}-{n}")
    os.rename(folder, target)
    return target


@contextmanager
def overwriting(folder: str | Path) -> Iterator[None]:
    """While this is open, the first :func:`before_first_write` of ``folder`` moves its old run aside."""
    key = Path(folder).absolute()
    _MOVE_ASIDE.add(key)
    try:
        yield
    finally:
        _MOVE_ASIDE.discard(key)


def before_first_write(folder: str | Path) -> Path | None:
    """Called by the writers of a run folder (``save_config``, ``MetricsLogger``) before they write: under
    ``--overwrite``, moves the old run aside once and returns where it went."""
    key = Path(folder).absolute()
    if key not in _MOVE_ASIDE:
        return None
    _MOVE_ASIDE.discard(key)
    if not run_contents(folder):
        return None
    moved = move_aside(folder)
    print(f"[run] --overwrite: the previous run in {folder} was moved to {moved}", flush=True)
    return moved

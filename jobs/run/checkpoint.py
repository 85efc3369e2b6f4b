"""Run checkpoints: folders written atomically with a manifest, found again for ``--resume``, pruned.

A checkpoint is ``<run>/checkpoints/step_000010/``: one sub-folder per trainable actor (its
``save_state``), ``driver.pt`` (data-loader position, KL controller, driver RNG, metrics so far) and
``manifest.json`` (step, files, config hash), written last. The folder is built under a temporary
name and renamed into place only when complete, so an interrupted write leaves the previous
checkpoint as the latest loadable one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from jobs.run.config import ConfigError, config_dict, config_hash, plain_config
# The path helpers live with the run-folder check (which reads checkpoints before anything is written);
# they are re-exported here, where checkpoints are written and loaded.
from jobs.run.run_folder import (MANIFEST, PREFIX, checkpoint_config, checkpoints_root,  # noqa: F401
                                 computation_diff, list_checkpoints, read_manifest)

DRIVER_STATE = "driver.pt"


@dataclass
class CheckpointConfig:
    every: int = 0                 # steps between checkpoints; 0 = only at the end
    keep: int = 2                  # newest checkpoints kept on disk (older ones are deleted)
    resume: str | None = None      # "latest" (the run's newest checkpoint) or a checkpoint folder

    def validate(self) -> None:
        if self.every < 0:
            raise ConfigError(f"checkpoint.every must be >= 0, got {self.every}")
        if self.keep < 1:
            raise ConfigError(f"checkpoint.keep must be >= 1, got {self.keep}")
        if self.resume not in (None, "", "latest") and not Path(self.resume).is_dir():
            raise ConfigError(f"checkpoint.resume: no checkpoint folder at {self.resume!r}")


def resolve_resume(run_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint folder to resume from, None to start fresh (``latest`` with no checkpoint yet)."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    folder = Path(resume)
    if not (folder / MANIFEST).exists():
        raise ConfigError(f"checkpoint.resume: {folder} has no {MANIFEST} (an incomplete or foreign folder)")
    return folder


def training_config_hash(config) -> str:
    """The config's hash without the sections that may change between an interrupted run and its
    resumption (checkpointing and fault handling)."""
    return config_hash({k: v for k, v in config_dict(config).items() if k not in ("checkpoint", "faults")})


def check_resume(folder: Path, config) -> dict:
    """The manifest of the checkpoint to resume from; warns, naming the keys, when the config changed on a
    key that changes the computation (the command line refuses such a resume before it starts)."""
    manifest = read_manifest(folder)
    saved = checkpoint_config(folder)
    if saved is not None:
        diff = computation_diff(saved, plain_config(config))
    else:  # a checkpoint written before manifests held the config
        diff = ["(keys unknown)"] if manifest.get("config_hash") != training_config_hash(config) else []
    if diff:
        print(f"[resume] warning: the config differs from the one {folder} was written with ({'; '.join(diff)}); "
              "the resumed run is not a continuation of the same experiment")
    return manifest


class CheckpointWriter:
    """Writes ``step_N`` folders for one run: actors save into the temporary folder, then the driver
    state and the manifest, then one rename publishes it; older ones beyond ``keep`` are pruned."""

    def __init__(self, run_dir: str | Path, keep: int, config):
        self.root = checkpoints_root(run_dir)
        self.keep = keep
        self.config_hash = training_config_hash(config)
        self.config = plain_config(config)  # what --resume compares the requested config with

    def write(self, step: int, save_actors, driver_state: dict[str, Any]) -> Path:
        """``save_actors(tmp_folder) -> list of sub-folder names`` saves every trainable actor's state."""
        start = time.perf_counter()
        final = self.root / f"{PREFIX}{step:06d}"
        tmp = self.root / f".tmp-{PREFIX}{step:06d}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        parts = list(save_actors(tmp))
        torch.save(driver_state, tmp / DRIVER_STATE)
        manifest = {"step": step, "parts": parts, "driver_state": DRIVER_STATE, "config_hash": self.config_hash,
                    "config": self.config,
                    "written_at": time.time(), "write_s": time.perf_counter() - start}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if final.exists():  # a rerun of the same step (after a recovery): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        self.prune()
        return final

    def prune(self) -> list[Path]:
        found = list_checkpoints(self.root.parent)
        removed = found[:-self.keep] if len(found) > self.keep else []
        for folder in removed:
            shutil.rmtree(folder, ignore_errors=True)
        for stale in self.root.glob(f".tmp-{PREFIX}*"):  # left by a writer that died mid-write
            if not stale.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(stale, ignore_errors=True)
        return removed


def load_driver_state(folder: str | Path) -> dict:
    return torch.load(Path(folder) / DRIVER_STATE, map_location="cpu", weights_only=False)


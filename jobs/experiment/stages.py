"""The comparison's stages: each a job or step cached under ``stages/<name>-<hash of its config>``.

``StageRunner.run`` runs a stage once per config (``stage.json`` marks it finished, written
atomically), so a rerun of the same experiment skips every finished stage and reruns an interrupted
one; ``run_job`` turns a training job (SFT, reward model, PPO, DPO, ...) into such a stage, its
config built from the comparison's choices and the preset's section for that job.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from actors.group import COMPUTE_LEDGER
from jobs.run.config import build_config, config_hash


@dataclass
class StageResult:
    name: str
    folder: Path
    summary: dict
    compute: dict          # wall_s, cpu_s (driver + actors), device_s
    skipped: bool


class StageRunner:
    """Runs a stage once per config: ``stages/<name>-<hash>/stage.json`` marks it finished."""

    def __init__(self, root: Path):
        self.root = root / "stages"
        self.results: dict[str, StageResult] = {}

    def run(self, name: str, key: Any, fn: Callable[[Path], dict]) -> StageResult:
        folder = self.root / f"{name}-{config_hash(key)}"
        marker = folder / "stage.json"
        if marker.exists():
            record = json.loads(marker.read_text())
            result = StageResult(name, folder, record["summary"], record["compute"], True)
            print(f"[stage] {name}: finished earlier, skipped ({folder.name})")
        else:
            print(f"[stage] {name}: running ({folder.name})")
            folder.mkdir(parents=True, exist_ok=True)
            before, cpu0, t0 = dict(COMPUTE_LEDGER.snapshot()), time.process_time(), time.perf_counter()
            summary = fn(folder)
            after = COMPUTE_LEDGER.snapshot()
            compute = {"wall_s": time.perf_counter() - t0,
                       "cpu_s": time.process_time() - cpu0 + after["cpu_s"] - before["cpu_s"],
                       "device_s": after["device_s"] - before["device_s"]}
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps({"name": name, "summary": summary, "compute": compute}, indent=2, default=float))
            tmp.rename(marker)  # atomic: a stage interrupted mid-way is rerun, never half-trusted
            result = StageResult(name, folder, summary, compute, False)
            print(f"[stage] {name}: done in {compute['wall_s']:.0f} s")
        self.results[name] = result
        return result


# The comparison's choices that a stage's section may change: resources, not the experiment (a stage whose
# actors work one at a time, such as the reward model's or DPO's, can use every core).
SECTION_MAY_OVERRIDE = ("torch_threads",)


def job_config(cls, base: dict, overrides: dict | None):
    """A job's config from the comparison's choices (``base``, which win over the section except for
    SECTION_MAY_OVERRIDE) and the preset's section (``overrides``)."""
    overrides = dict(overrides or {})
    base = {k: v for k, v in base.items() if not (k in SECTION_MAY_OVERRIDE and k in overrides)}
    merged = deep_merge(overrides, base)
    return build_config(cls, None, [f"{k}={json.dumps(v)}" for k, v in _flatten(merged).items()])


def deep_merge(low: dict, high: dict) -> dict:
    """``low`` with ``high``'s values on top, nested dicts merged key by key (lists and scalars replaced)."""
    out = dict(low)
    for key, value in high.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _flatten(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value and key not in ("columns",):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_job(runner: StageRunner, name: str, cls, base: dict, overrides: dict | None, train: Callable) -> StageResult:
    """A job (sft / reward / ppo / dpo) as a stage: its config hash names the folder it writes into."""
    config = job_config(cls, {**base, "run_name": name, "output_dir": ""}, overrides)

    def go(folder: Path) -> dict:
        return train(dataclasses.replace(config, output_dir=str(folder.parent), run_name=folder.name))

    return runner.run(name, config, go)

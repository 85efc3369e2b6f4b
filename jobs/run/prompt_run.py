"""The start every on-policy driver shares (PPO, critic-free RL, online DPO): prompts, run folder, cluster.

Prompts are read, tokenised and checked, and a resume point looked up, before the first write
(``config.yaml``), so a bad data spec leaves an existing run folder as it was; then the cluster starts
and the driver's training attempt runs under ``run_with_recovery`` (dead stateful actors are rebuilt
from the latest checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from actors.models import load_tokenizer
from actors.runtime import set_rng_state
from jobs.data.source import load_prompt_splits
from jobs.run.batching import encode_prompt
from jobs.run.checkpoint import check_resume, load_driver_state, resolve_resume
from jobs.run.cluster import init_ray
from jobs.run.config import ConfigError, save_config
from jobs.run.faults import FaultInjector, run_with_recovery

# attempt(config, pad_id, train_ids, eval_ids, resume_from, recoveries, faults) -> summary
Attempt = Callable[..., dict]


def run_prompt_job(config, attempt: Attempt) -> dict:
    """Read and encode ``config.data``'s prompt splits (eval capped at ``config.eval_prompts``), write the
    resolved config, start Ray and run ``attempt`` with recovery; returns its summary."""
    out = Path(config.output_dir) / config.run_name
    tokenizer = load_tokenizer(config.model)
    train_prompts, eval_prompts, report = load_prompt_splits(config.data, config.seed)

    def encode(records) -> list[list[int]]:
        limit = config.tokenize.max_prompt_length
        return [encode_prompt(tokenizer, r.prompt, config.tokenize)[-limit:] for r in records]

    train_ids, eval_ids = encode(train_prompts), encode(eval_prompts)[: config.eval_prompts]
    if not train_ids:
        raise ConfigError(f"data.train: no prompts in {config.data.train!r}")
    print(f"[data] {len(train_ids)} train / {len(eval_ids)} eval prompts; {json.dumps(report)}")
    resume_from = resolve_resume(out, config.checkpoint.resume)
    save_config(config, out)  # the first write, once config and data are checked: a failed start writes nothing
    init_ray(config.address, namespace=f"rayalign-{config.run_name}")
    faults = FaultInjector(config.faults)
    pad_id = tokenizer.pad_token_id
    return run_with_recovery(
        lambda start, recoveries: attempt(config, pad_id, train_ids, eval_ids, start, recoveries, faults),
        run_dir=out, resume_from=resume_from, max_recoveries=config.faults.max_recoveries)


def resume_policy_run(resume_from: Path, config, fleet, prompt_batches, guard, counter: str) -> tuple[dict, list, float]:
    """Continue a critic-free run (critic-free RL, online DPO) from a checkpoint: the policy's full training
    state, the generators given its weights, the prompt order, the non-finite guard and the driver's RNG.
    Returns the driver's saved ``state`` (its loop counter under ``counter``), the metric rows so far and
    the wall seconds already spent."""
    check_resume(resume_from, config)
    driver = load_driver_state(resume_from)
    fleet.policy.run_one("load_state", str(resume_from / "policy"))
    fleet.push_weights(driver["state"][counter])
    prompt_batches.load_state_dict(driver["batches"])
    guard.load_state_dict(driver["guard"])
    set_rng_state(driver["rng"])
    print(f"[resume] from {resume_from} at {counter} {driver['state'][counter]}")
    return driver["state"], driver["metrics"], driver["wall_s"]

"""LoRA through the drivers: `policy.lora` in DPO and PPO runs with no reference actor (the policy's base,
adapters disabled, is the reference), exact resume of adapter state, merged checkpoints, and adapter-only
weight sync into a LoRA-enabled vLLM generator."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from jobs.run.config import ConfigError, build_config
from jobs.drivers.dpo import DPOConfig
from jobs.drivers.dpo import train as train_dpo
from jobs.drivers.ppo import PPOConfig
from jobs.drivers.ppo import train as train_ppo

pytestmark = pytest.mark.slow
LORA = "policy.lora={r: 8, alpha: 16}"


def _rows(run):
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _close(a: float, b: float, rel: float = 1e-5, abs_: float = 1e-6) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def test_lora_dpo_uses_the_adapter_disabled_policy_as_reference_and_resumes(ray_cluster, tmp_path):
    args = [f"output_dir={tmp_path}", "max_steps=6", "eval_every=3", "checkpoint.every=3", LORA,
            "optimizer.lr=1e-2"]
    # On the fly: every batch's reference log-probs come from the policy actor, mid-training, adapters off.
    live = train_dpo(build_config(DPOConfig, "dpo_tiny", [*args, "run_name=live", "reference_mode=on_the_fly"]))
    # Precomputed before any update (or read from the cache a separate ReferenceActor filled: same key).
    pre = train_dpo(build_config(DPOConfig, "dpo_tiny", [*args, "run_name=pre"]))
    assert live["roles"] == pre["roles"] == ["policy"]  # no reference actor was started
    assert live["reference_from"] == "policy with LoRA adapters disabled"
    a, b = _rows(tmp_path / "live"), _rows(tmp_path / "pre")
    assert a[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: the policy starts at its reference
    assert a[6]["loss"] < a[1]["loss"] - 0.05  # the adapters learn
    for step in range(1, 7):  # the mid-training reference still equals the untrained base model
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
            assert _close(a[step][key], b[step][key]), (step, key, a[step][key], b[step][key])
    # Resume the adapter run from its step-3 checkpoint: the same steps 4..6, exactly.
    resumed = train_dpo(build_config(DPOConfig, "dpo_tiny", [*args, "run_name=live", "reference_mode=on_the_fly",
                                                            "checkpoint.resume=latest"]))
    assert resumed["resumed_from"].endswith("step_000006")  # latest: the run had finished
    again = train_dpo(build_config(DPOConfig, "dpo_tiny", [
        *args, "run_name=live", "reference_mode=on_the_fly",
        f"checkpoint.resume={tmp_path}/live/checkpoints/step_000003"]))
    assert again["final"]["loss"] == a[6]["loss"]
    # The checkpoint: merged weights for AutoModelForCausalLM, the adapter alone beside them.
    folder = tmp_path / "live" / "checkpoint"
    assert json.loads((folder / "adapter" / "adapter_config.json").read_text())["r"] == 8
    merged = AutoModelForCausalLM.from_pretrained(folder)
    assert not any("lora" in k for k in merged.state_dict())


def test_lora_ppo_runs_without_a_reference_actor(ray_cluster, tmp_path):
    args = [f"output_dir={tmp_path}", "run_name=lora", "steps=3", "prompts_per_step=8", "eval_every=0",
            "eval_prompts=8", "generation_backend=hf", LORA, "optimizer.lr=1e-2"]
    summary = train_ppo(build_config(PPOConfig, "ppo_tiny", args))
    assert "reference" not in summary["roles"] and summary["weight_sync"] == "merged_lora"
    rows = _rows(tmp_path / "lora")
    assert rows[0]["eval/kl"] == 0.0  # before training the policy is exactly its own reference
    assert rows[1]["objective/kl"] == 0.0
    for step in (1, 2, 3):
        assert rows[step]["actor/ratio_max_dev_first_minibatch"] == 0.0
        assert rows[step]["rollout/logprob_diff"] < 1e-4  # the HF generator got the merged weights
    assert rows[3]["objective/kl"] > 1e-4 and summary["end"]["eval/kl"] > 1e-4  # the adapters moved the policy
    assert (tmp_path / "lora" / "checkpoint" / "adapter" / "adapter_model.safetensors").exists()


def test_lora_options_are_checked_in_the_config():
    with pytest.raises(ConfigError, match="policy.lora: unknown lora option"):
        build_config(DPOConfig, "dpo_tiny", ["policy.lora={rank: 8}"])
    with pytest.raises(ConfigError, match="policy.lora: LoRA needs a single-actor policy"):
        build_config(DPOConfig, "dpo_tiny", [LORA, "policy.num_workers=2"])
    with pytest.raises(ConfigError, match="reference_model: with policy.lora"):
        build_config(PPOConfig, "ppo_tiny", [LORA, "reference_model=smollm2"])
    with pytest.raises(ConfigError, match="policy.lora: lora.r must be >= 1"):
        build_config(DPOConfig, "dpo_tiny", ["policy.lora={r: 0}"])


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_lora_ppo_syncs_only_adapters_into_vllm(ray_cluster, tmp_path, tiny_hd32_model):
    args = [f"output_dir={tmp_path}", "run_name=lora_vllm", f"model={tiny_hd32_model}", "steps=2",
            "prompts_per_step=4", "eval_every=0", "eval_prompts=4", "generation_backend=vllm",
            "generation_options={max_model_len: 128, kv_cache_gib: 0.25}", LORA, "optimizer.lr=1e-2"]
    summary = train_ppo(build_config(PPOConfig, "ppo_tiny", args))
    assert summary["weight_sync"] == "lora_adapters"
    rows = _rows(tmp_path / "lora_vllm")
    # Step 2's rollout was sampled by vLLM with the adapter synced after step 1.
    assert rows[2]["rollout/logprob_diff"] < 1e-4 and rows[2]["objective/kl"] > 0.0
    assert torch.isfinite(torch.tensor(rows[2]["actor/pg_loss"]))

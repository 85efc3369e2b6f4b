"""The benchmark plumbing (not its figures: speed and memory targets are read from `python -m jobs.bench`,
never asserted in tests): each subcommand's JSON has the fields the README quotes."""

from __future__ import annotations

import json
import os

import pytest

from jobs.bench import core_scaling, main


@pytest.mark.skipif((os.cpu_count() or 1) < 2 or not hasattr(os, "sched_setaffinity"),
                    reason="needs two cores and Linux CPU affinity")
def test_core_scaling_reports_one_and_two_core_rates():
    result = core_scaling(seconds=0.3)
    for kind in ("stream", "matmul"):
        entry = result[kind]
        assert entry["one_core"] > 0 and len(entry["two_cores"]) == 2 and all(v > 0 for v in entry["two_cores"])
        assert entry["scaling_2_vs_1"] == pytest.approx(sum(entry["two_cores"]) / entry["one_core"])


def test_memory_bench_runs_each_setting_in_its_own_process(tmp_path, capsys):
    out = tmp_path / "memory.json"
    assert main(["memory", "--model", "tiny", "--settings", "gradient_checkpointing,packing", "--pairs", "2",
                 "--seq-len", "24", "--prompt-len", "8", "--micro-pairs", "2", "--steps", "2", "--threads", "1",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    settings = [r["setting"] for r in result["settings"]]
    assert settings == ["baseline", "gradient_checkpointing", "packing"]  # the baseline is always measured first
    base, checkpointed, packed = result["settings"]
    assert result["ratios"]["baseline"] == 1.0 and all(r["peak_rss_mib"] > 0 for r in result["settings"])
    # The savers change memory, not the math: same losses as the baseline (float tolerance).
    for other in (checkpointed, packed):
        assert other["losses"] == pytest.approx(base["losses"], abs=1e-5)
    assert base["losses"][0] == pytest.approx(0.6931472, abs=1e-6)  # the reference is the starting policy
    assert packed["tokens_per_step"] < packed["padded_tokens_per_step"]  # the batch really has padding


def test_dpo_peer_bench_runs_trl_and_this_project_on_the_same_pairs(tmp_path):
    pytest.importorskip("trl", reason="the TRL peer needs trl (the Makefile installs it with the test dependencies)")
    out = tmp_path / "peer.json"
    assert main(["dpo", "--peer", "trl", "--model", "tiny", "--pairs", "2", "--seq-len", "16", "--prompt-len", "6",
                 "--micro-pairs", "1", "--repeats", "1", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("rayalign_tokens_per_s", "trl_tokens_per_s", "ratio_vs_trl", "rayalign_mfu", "trl_mfu",
                "matmul_gflops_fp32", "rayalign_first_step_s", "trl_first_step_s"):
        assert result[key] > 0, key
    assert result["ratio_vs_trl"] == pytest.approx(result["rayalign_tokens_per_s"] / result["trl_tokens_per_s"])
    # Same ids on both sides: the same token count per step, and 1 warm-up + 1 timed step each.
    assert result["rayalign"]["tokens_per_step"] == result["trl"]["tokens_per_step"] > 0
    assert len(result["rayalign"]["step_seconds"]) == len(result["trl"]["step_seconds"]) == 2
    ours, trl = result["rayalign_first_step"], result["trl_first_step"]
    # Both start from the same weights with the reference equal to them: loss log 2, rewards 0.
    assert ours["loss"] == pytest.approx(0.6931472, abs=1e-6)
    # The same DPO on the same fp32 ids: summed response log-probs (~-130 over ~20 tokens) agree to fp32
    # rounding of a 2-layer forward (ulp(130) ~ 1e-5, summed over ~20 terms), so 1e-3 is ample.
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert ours[key] == pytest.approx(trl[key], abs=1e-3), key
    assert ours["logps/chosen"] < 0 and ours["logps/rejected"] < 0


def test_dpo_peer_bench_honours_bf16_on_both_sides():
    pytest.importorskip("trl", reason="the TRL peer needs trl")
    from types import SimpleNamespace

    from jobs.bench import matmul_gflops
    from jobs.benchmarks.trl_peer import bench_dpo_peer

    def run(bf16):
        args = SimpleNamespace(model="tiny", pairs=2, seq_len=16, prompt_len=6, micro_pairs=2, repeats=1, threads=1,
                               bf16=bf16, beta=0.1)
        return bench_dpo_peer(args, lambda **kw: matmul_gflops(seconds=0.2, **kw))

    fp32, bf16 = run(False), run(True)
    assert bf16["bf16_autocast"] is True and bf16["matmul_gflops_bf16"] > 0 and "matmul_gflops_fp32" in fp32
    for side in ("rayalign_first_step", "trl_first_step"):
        # The switch reaches each side's forward: bf16 rounding moves the summed log-probs off fp32's.
        assert bf16[side]["logps/chosen"] != fp32[side]["logps/chosen"], side
    # Both sides still agree to bf16 rounding (8 mantissa bits: relative 4e-3 per logit, under 1.0
    # absolute over a sum of ~20 log-probs near -6 each).
    assert bf16["rayalign_first_step"]["logps/chosen"] == pytest.approx(bf16["trl_first_step"]["logps/chosen"], abs=1.0)


@pytest.mark.slow
@pytest.mark.extended  # ~3 min; the bench's other smoke tests run in CI
def test_ppo_compare_bench_runs_today_and_fast_settings_at_both_sizes(tmp_path):
    """`jobs.bench ppo --compare` at tiny size: both settings at both sizes on the same prompts, tokens and
    epochs, each step's phases and the ratios in the JSON (no timed assertions), and a lever alone."""
    out = tmp_path / "ppo.json"
    assert main(["ppo", "--compare", "--model", "tiny", "--backend", "hf", "--steps", "2", "--threads", "1",
                 "--prompts", "2", "--new-tokens", "4", "--epochs", "1", "--minibatch", "2",
                 "--demo-prompts", "2", "--demo-new-tokens", "3", "--demo-epochs", "1", "--demo-minibatch", "2",
                 "--fast", "lora,critic_freeze", "--levers", "critic_freeze", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    settings = result["settings"]
    assert sorted(settings) == ["fast_bench_size", "fast_demo_size", "today_bench_size", "today_demo_size"]
    for size in ("bench_size", "demo_size"):
        today, fast = settings[f"today_{size}"], settings[f"fast_{size}"]
        for key in ("prompts", "new_tokens", "epochs", "minibatch"):
            assert today[key] == fast[key], key
        assert len(today["all_steps_s"]) == len(fast["all_steps_s"]) == 2  # one warm-up, one timed step
        assert result[f"speedup_{size}"] == pytest.approx(today["step_s"] / fast["step_s"])
        assert sum(fast["phase_share"].values()) == pytest.approx(1.0, abs=1e-6) or fast["phase_s"]["other"] == 0
        # LoRA: the policy is its own reference (no ReferenceActor); merged weights reach the HF generator.
        assert "reference" in today["roles"] and "reference" not in fast["roles"]
        assert today["weight_sync"] == "full" and fast["weight_sync"] == "merged_lora"
    assert settings["today_bench_size"]["new_tokens"] == 4 and settings["today_demo_size"]["new_tokens"] == 3
    assert result["sync_share_demo_size"] == settings["fast_demo_size"]["phase_share"]["sync_weights"]
    assert "critic.freeze_layers=1" in result["fast_overrides"]
    lever = result["levers_alone_demo_size"]["critic_freeze"]
    assert lever["speedup_vs_today"] > 0 and isinstance(lever["pays"], bool)


def test_sync_bench_pushes_both_formats_to_a_generator(tmp_path, ray_cluster):
    """`jobs.bench sync` at tiny size: each format pushed to a real generator each round, the generator's
    reload timed apart from the transfer (no timed assertions: the ratio is the bench's figure)."""
    out = tmp_path / "sync.json"
    assert main(["sync", "--model", "tiny", "--backend", "hf", "--rounds", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert sorted(result["runs"]) == ["torch_pickle", "weight_dict"]
    for rows in result["runs"].values():
        assert len(rows) == 2
        for row in rows:
            assert row["wall_s"] == pytest.approx(row["reload_s"] + row["transfer_s"])
    assert result["speedup_wall"] == pytest.approx(result["median"]["torch_pickle"]["wall_s"]
                                                   / result["median"]["weight_dict"]["wall_s"])

"""GPU presets and the analytic memory estimator (jobs.memory_estimate): fast, no Ray, no GPU.

The estimator's parameter counts are checked exactly against real models (the built-ins, and the hub
architectures built on the meta device), its activation formula against the bytes autograd actually
saves in a CPU training forward of SmolLM2, and every gpu_* preset against its header and its driver.
"""

from __future__ import annotations

import contextlib
import json
import re

import pytest
import torch

from jobs.run.cluster import TrainingRoleConfig
from jobs.run.config import PRESETS, build_config
from jobs.drivers.dpo import DPOConfig
from jobs.memory_estimate import (ARCHITECTURES, GIB, Arch, Request, activation_bytes, activation_parts, architecture,
                                  entry, estimate, gpu_figures, gpu_presets, main, pack, trainable_role)
from jobs.drivers.ppo import PPOConfig

GPU_PRESETS = gpu_presets()

# Published totals (model cards / safetensors metadata), independent of the formula.
PUBLISHED_PARAMS = {"Qwen/Qwen2.5-1.5B-Instruct": 1_543_714_304, "Qwen/Qwen2.5-7B-Instruct": 7_615_616_512,
                    "meta-llama/Llama-3.2-1B-Instruct": 1_235_814_400,
                    "meta-llama/Llama-3.2-3B-Instruct": 3_212_749_824,
                    "meta-llama/Llama-3.1-8B-Instruct": 8_030_261_248}


def _driver(name: str):
    return PPOConfig if name.startswith("gpu_ppo_") else DPOConfig


def test_the_required_gpu_presets_exist():
    assert {"gpu_dpo_qwen1_5b_full", "gpu_dpo_llama8b_lora", "gpu_dpo_llama8b_fsdp", "gpu_ppo_llama1b_lora",
            "gpu_ppo_llama8b_fsdp"} <= set(GPU_PRESETS)


@pytest.mark.parametrize("name", GPU_PRESETS)
def test_gpu_preset_builds_validates_and_names_a_known_architecture(name):
    config = build_config(_driver(name), name)  # validate() runs check_model: hub ids pass offline
    assert config.model in ARCHITECTURES, "the estimate of a GPU preset must need no network"
    assert config.run_name == name


@pytest.mark.parametrize("name", GPU_PRESETS)
def test_gpu_preset_fits_and_its_header_quotes_the_estimator(name):
    result = estimate(name)
    assert result["fits"], result
    assert result["driver"] == ("jobs.ppo" if name.startswith("gpu_ppo_") else "jobs.dpo")
    header = "\n".join(line for line in (PRESETS / f"{name}.yaml").read_text().splitlines() if line.startswith("#"))
    assert f"python -m jobs.memory_estimate {name}" in header
    hardware = re.search(r"Hardware: (\d+) x 80 GB", header)
    assert hardware and int(hardware.group(1)) == result["gpus_needed"]
    quoted = {float(x) for x in re.findall(r"~ (\d+\.\d) GiB", header)}
    totals = {round(gpu[key], 1) for gpu in result["gpus"] for key in ("total_gib", "training_gib", "startup_gib")}
    assert quoted and quoted <= totals, f"header quotes {quoted}, the estimator gives {totals}"


def test_cli_prints_every_gpu_preset_and_json(capsys):
    assert main(["--all-gpu"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in GPU_PRESETS) and "DOES NOT FIT" not in text
    assert main(["gpu_dpo_llama8b_lora", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["gpus_needed"] == 1 and set(result["gpus"][0]["roles"][0]["parts_gib"]) >= {"weights", "activations"}


def test_a_layout_that_cannot_fit_is_reported():
    assert main(["gpu_dpo_llama8b_lora", "--gpu-gib", "24"]) == 1


# -- packing roles onto GPUs by their shares ------------------------------------------------------
def _request(role: str, share: float, gib: float, startup: float | None = None, precompute: bool = False,
             group: str | None = None) -> Request:
    parts = {"weights": gib * GIB}
    return Request(role, share, [entry(role, parts, startup=None if startup is None else startup * GIB,
                                       precompute=precompute)], group)


def test_two_half_shares_share_one_gpu_and_their_memory_adds_up():
    (gpu,) = pack([_request("policy", 0.5, 30), _request("reference", 0.5, 12)])
    figures = gpu_figures(gpu, limit_gib=71.64)
    assert figures["share"] == 1.0 and figures["total_gib"] == 42.0 and figures["fits"]


def test_three_half_shares_need_two_gpus_first_fit_in_role_order():
    gpus = pack([_request("policy", 0.5, 1), _request("reward", 0.5, 1), _request("critic", 0.5, 1)])
    assert [[r.role for r in gpu] for gpu in gpus] == [["policy", "reward"], ["critic"]]
    gpus = pack([_request("policy", 0.9, 1), _request("critic", 0.9, 1), _request("judge", 0.01, 1)])
    assert [[r.role for r in gpu] for gpu in gpus] == [["policy", "judge"], ["critic"]]  # the first GPU with room


def test_a_precompute_reference_on_the_policys_gpu_counts_as_max_not_sum():
    """Policy: 30 GiB training, 6 GiB after loading; reference 12 GiB, gone before training."""
    gpu = [_request("policy", 0.5, 30, startup=6), _request("reference", 0.5, 12, precompute=True)]
    figures = gpu_figures(gpu, limit_gib=71.64)
    assert (figures["training_gib"], figures["startup_gib"], figures["total_gib"]) == (30.0, 18.0, 30.0)
    gpu = [_request("policy", 0.5, 10, startup=6), _request("reference", 0.5, 12, precompute=True)]
    assert gpu_figures(gpu, limit_gib=71.64)["total_gib"] == 18.0    # the precompute phase is the larger
    gpu = [_request("policy", 0.5, 30, startup=6), _request("reference", 0.5, 12)]     # on_the_fly: both train
    assert gpu_figures(gpu, limit_gib=71.64)["total_gib"] == 42.0


def test_two_ranks_of_one_fsdp_group_on_a_gpu_are_a_problem():
    gpus = pack([_request("policy", 0.5, 1, group="policy") for _ in range(2)])
    assert len(gpus) == 1
    figures = gpu_figures(gpus[0], limit_gib=71.64)
    assert not figures["fits"] and "NCCL" in figures["problems"][0]
    assert len(pack([_request("policy", 0.6, 1, group="policy") for _ in range(2)])) == 2


def test_a_colocated_vllm_generator_must_leave_room_for_the_others():
    gpu = [_request("policy", 0.5, 35), _request("generator", 0.5, 0.5 * 79.6)]   # utilization 0.5 of the GPU
    figures = gpu_figures(gpu, limit_gib=0.9 * 79.6)
    assert figures["total_gib"] == 74.8 and not figures["fits"] and "gpu_memory_utilization" in figures["problems"][0]


def test_full_fine_tune_dpo_on_one_gpu_peaks_at_the_policys_training_figure():
    result = estimate("gpu_dpo_qwen1_5b_full")
    (gpu,) = result["gpus"]
    policy, reference = gpu["roles"]
    assert (policy["share"], reference["share"], reference["precompute"]) == (0.5, 0.5, True)
    assert gpu["total_gib"] == gpu["training_gib"] == policy["total_gib"]
    assert gpu["total_gib"] < policy["total_gib"] + reference["total_gib"]


def test_eight_rank_dpo_puts_the_reference_on_a_ranks_gpu():
    result = estimate("gpu_dpo_llama8b_fsdp")
    assert result["gpus_needed"] == 8 and result["fits"]
    assert [r["role"] for r in result["gpus"][0]["roles"]] == ["policy", "reference"]
    assert all([r["role"] for r in gpu["roles"]] == ["policy"] for gpu in result["gpus"][1:])


def test_ppo_on_one_gpu_packs_every_role():
    (gpu,) = estimate("gpu_ppo_llama1b_lora")["gpus"]
    assert sorted(r["role"] for r in gpu["roles"]) == ["critic", "generator", "policy", "reward"]
    assert gpu["share"] <= 1 and gpu["fits"]


@pytest.mark.parametrize("name", ["gpu_ppo_llama1b_lora", "gpu_ppo_llama8b_fsdp"])
def test_a_cpu_eval_scorer_takes_the_judge_share_not_another_gpu(name, tmp_path):
    import yaml

    from jobs.run.config import load_preset

    raw = load_preset(name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**raw, "eval_scorer": "vader"}))
    with_judge, without = estimate(str(path)), estimate(name)
    assert with_judge["fits"] and with_judge["gpus_needed"] == without["gpus_needed"]
    assert any(r["role"] == "judge" for gpu in with_judge["gpus"] for r in gpu["roles"])


# -- parameter counts ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny", "smollm2"])
def test_parameter_count_equals_the_real_builtin_model(name):
    from actors.models import load_causal_lm
    from actors.value_model import ScalarHeadModel

    arch = architecture(name)
    assert arch.params() == sum(p.numel() for p in load_causal_lm(name).parameters())
    assert arch.params(lm_head=False) == sum(p.numel() for p in ScalarHeadModel.from_pretrained(name).parameters())


@pytest.mark.parametrize("model", sorted(ARCHITECTURES))
def test_parameter_count_equals_transformers_on_the_meta_device(model):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    a = ARCHITECTURES[model]
    cls, config_cls = (Qwen2ForCausalLM, Qwen2Config) if a.qkv_bias else (LlamaForCausalLM, LlamaConfig)
    config = config_cls(hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
                        num_key_value_heads=a.kv_heads, intermediate_size=a.intermediate, vocab_size=a.vocab,
                        tie_word_embeddings=a.tied, **({"head_dim": a.head_dim} if a.head_dim else {}))
    with torch.device("meta"):
        model_obj = cls(config)
    assert a.params() == sum(p.numel() for p in model_obj.parameters()) == PUBLISHED_PARAMS[model]


def test_lora_parameter_count_equals_peft():
    from actors.models import DEFAULT_LORA_TARGETS, apply_lora, load_causal_lm

    for options in ({"r": 8}, {"r": 4, "target_modules": ["q_proj", "v_proj"]}):
        model = apply_lora(load_causal_lm("tiny"), options)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        targets = options.get("target_modules") or DEFAULT_LORA_TARGETS
        assert architecture("tiny").lora_params(options["r"], targets) == trainable


# -- hand-computed states ------------------------------------------------------------------------
ARCH = Arch(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1000, tied=True)


def _states(layout: TrainingRoleConfig, optimizer: str = "adamw") -> float:
    parts, _ = trainable_role(ARCH, layout, optimizer, seqs=1, length=8, autocast=False)
    return parts["weights"] + parts["gradients"] + parts["optimizer"]


def test_weights_gradients_and_optimizer_bytes_per_parameter():
    p = ARCH.params()
    assert p == 1000 * 64 + 64 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64)
    assert _states(TrainingRoleConfig()) == 16 * p                    # fp32 weights + grads + 2 AdamW moments
    assert _states(TrainingRoleConfig(), "rmsprop") == 12 * p          # one RMSprop moment
    assert _states(TrainingRoleConfig(dtype="bfloat16")) == 8 * p      # state in the parameter's dtype
    assert _states(TrainingRoleConfig(num_workers=4)) == 16 * p / 4     # FSDP2: sharded 4 ways
    assert _states(TrainingRoleConfig(offload_optimizer=True)) == 8 * p  # optimizer state on the host
    assert _states(TrainingRoleConfig(num_workers=4, offload_optimizer=True)) == 0  # CPUOffloadPolicy
    adapters = ARCH.lora_params(8, ("q_proj", "v_proj"))
    lora = TrainingRoleConfig(dtype="bfloat16", lora={"r": 8, "target_modules": ["q_proj", "v_proj"]})
    assert _states(lora) == 2 * p + 16 * adapters                      # bf16 frozen base, fp32 adapters + AdamW
    parts, startup = trainable_role(ARCH, TrainingRoleConfig(num_workers=4), "adamw", 1, 8, False)
    assert parts["fsdp gathered"] == 2 * (ARCH.root_params + 2 * ARCH.layer_params) * 4
    assert startup == 4 * p + 0.5 * GIB                               # a rank loads the whole model first


def test_gradient_checkpointing_saves_activation_memory():
    for arch in ARCHITECTURES.values():
        for compute, residual in ((4, 4), (2, 4), (2, 2)):
            full = activation_bytes(arch, 8, 1024, compute, residual)
            checkpointed = activation_bytes(arch, 8, 1024, compute, residual, checkpointing=True)
            inference = activation_bytes(arch, 8, 1024, compute, residual, training=False)
            assert inference < checkpointed < full


# -- the activation formula against what autograd saves ------------------------------------------
def _saved_bytes(model, seqs: int, length: int, vocab: int, autocast: bool) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward + log-prob pass,
    parameters excluded (weights are counted apart)."""
    from actors.math.logprobs import sequence_logprobs

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, vocab, (seqs, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cast:
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
        sequence_logprobs(out.logits, ids, mask)
    return sum(seen.values())


@pytest.fixture(scope="module")
def smollm2_fp32():
    from actors.models import load_causal_lm

    return load_causal_lm("smollm2").train()


@pytest.mark.parametrize("autocast,checkpointing", [(False, False), (False, True), (True, False)])
def test_activation_formula_matches_the_bytes_autograd_saves(smollm2_fp32, autocast, checkpointing):
    """SmolLM2 (30 layers), 2 x 64 tokens, fp32 weights: the formula's saved part within 2% (it is
    exact up to the position tables); under autocast plus the bf16 weight copies autograd keeps."""
    from actors.models import enable_gradient_checkpointing

    model, arch = smollm2_fp32, architecture("smollm2")
    if checkpointing:
        enable_gradient_checkpointing(model)
    try:
        measured = _saved_bytes(model, 2, 64, arch.vocab, autocast)
    finally:
        model.gradient_checkpointing_disable()
    expected = activation_parts(arch, 2, 64, 2 if autocast else 4, 4, checkpointing=checkpointing)["saved"]
    if autocast:
        expected += 2 * arch.params()
    assert measured == pytest.approx(expected, rel=0.02)


def test_activation_formula_bounds_bf16_weights_from_above():
    """bf16 weights: the formula counts RMSNorm's fp32 internals generously, so it is an upper bound (within 25%)."""
    from actors.models import load_causal_lm

    arch = architecture("smollm2")
    measured = _saved_bytes(load_causal_lm("smollm2", dtype="bfloat16").train(), 2, 64, arch.vocab, False)
    expected = activation_parts(arch, 2, 64, 2, 2)["saved"]
    assert measured <= expected <= 1.25 * measured


def test_autocast_keeps_a_bf16_copy_of_every_weight_through_the_forward_pass():
    """Why the estimator adds 2P bytes under bf16 autocast over fp32 weights, gradient checkpointing or
    not: autocast caches the cast of every trainable leaf weight until the autocast region exits."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode

    from actors.models import enable_gradient_checkpointing, load_causal_lm

    model = load_causal_lm("tiny").train()
    enable_gradient_checkpointing(model)  # nothing inside the layers is saved for backward
    weights = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    copies = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16 and tuple(out.shape) in weights:
                copies.append(weakref.ref(out))
            return out

    ids = torch.randint(0, 1000, (1, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with Spy():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        alive = sum(ref().numel() for ref in copies if ref() is not None)
    assert alive == sum(p.numel() for p in model.parameters() if p.dim() == 2)

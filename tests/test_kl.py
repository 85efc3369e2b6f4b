"""Exact KL against hand-computed closed forms."""

import math

import pytest
import torch

from actors.math.kl import sequence_kl, token_kl


def test_token_kl_matches_closed_form_two_token_vocab():
    # p = (0.75, 0.25), q = (0.5, 0.5): KL = 0.75 ln 1.5 + 0.25 ln 0.5, written out by hand
    p_logits = torch.tensor([math.log(0.75), math.log(0.25)])
    q_logits = torch.tensor([0.0, 0.0])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    # float32 softmax / log: relative error ~1e-7 per term on O(0.1) values, so 1e-6 absolute is ample
    assert abs(token_kl(p_logits, q_logits).item() - expected) < 1e-6


def test_temperature_divides_both_models_logits():
    # at T = 2, logits (2 ln 3, 0) become (ln 3, 0): p = (0.75, 0.25); q's zeros stay uniform
    p_logits = torch.tensor([2 * math.log(3.0), 0.0])
    q_logits = torch.tensor([0.0, 0.0])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert abs(token_kl(p_logits, q_logits, temperature=2.0).item() - expected) < 1e-6
    assert abs(token_kl(p_logits, q_logits, temperature=1.0).item() - expected) > 0.1


def test_sequence_kl_sums_masked_shifted_positions_and_is_nonnegative():
    # three-token vocab; position 0 is the prompt's last token (predicts response token 1)
    p = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5], [0.6, 0.2, 0.2]]))
    q = torch.log(torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8]]))
    mask = torch.tensor([[0, 1, 1]])  # tokens 1, 2 are the response; logits at position 2 predict nothing
    kl0 = 0.5 * math.log(1.5) + 2 * 0.25 * math.log(0.75)  # position 0 vs uniform; position 1 identical: 0
    got = sequence_kl(p.unsqueeze(0), q.unsqueeze(0), mask)
    assert abs(got.item() - kl0) < 1e-6
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, 11, generator=generator), torch.randn(4, 6, 11, generator=generator)
    assert (sequence_kl(a, b, torch.ones(4, 6)) >= 0).all()
    assert torch.equal(sequence_kl(a, a, torch.ones(4, 6)), torch.zeros(4))


@pytest.fixture(scope="module")
def perturbed_tiny(tmp_path_factory) -> str:
    """The built-in tiny model with noise on its output layer: a policy that differs from the reference."""
    from actors.models import load_causal_lm, load_tokenizer, resolve_model_path

    model = load_causal_lm(resolve_model_path("tiny"))
    with torch.no_grad():
        model.lm_head.weight.add_(0.5 * torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(1)))
    folder = tmp_path_factory.mktemp("perturbed") / "model"
    model.save_pretrained(folder)
    load_tokenizer("tiny").save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_kl_scorer_actor_scores_at_the_sampling_temperature(ray_cluster, perturbed_tiny, tiny_tokenizer):
    from actors.group import ActorGroup
    from actors.kl_scorer import KLScorerActor
    from actors.math.batch import collate_sequences
    from actors.math.logprobs import sequence_logprobs
    from actors.models import load_causal_lm, resolve_model_path

    prompts, responses = [[5, 9, 13], [7, 2]], [[21, 4, 30, 8], [11, 3, 6]]
    batch = collate_sequences(prompts, responses, tiny_tokenizer.pad_token_id)
    scorer = ActorGroup(KLScorerActor, "kl-scorer", init_kwargs={"model": perturbed_tiny, "reference": "tiny"})
    same = ActorGroup(KLScorerActor, "kl-same", init_kwargs={"model": "tiny", "reference": "tiny"})
    try:
        hot, cold = scorer.run_one("score", batch, 1.0), scorer.run_one("score", batch, 0.5)
        identical = same.run_one("score", batch, 0.7)
    finally:
        scorer.shutdown()
        same.shutdown()
    # the same computation in this process: both models' logits, divided by T, through the pure functions
    policy, reference = load_causal_lm(perturbed_tiny), load_causal_lm(resolve_model_path("tiny"))
    from actors.math.logprobs import position_ids_from_mask

    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "position_ids": position_ids_from_mask(batch["attention_mask"])}
    with torch.no_grad():
        p_logits, q_logits = policy(**kwargs).logits, reference(**kwargs).logits
    for out, t in ((hot, 1.0), (cold, 0.5)):
        lp = sequence_logprobs(p_logits / t, batch["input_ids"], batch["loss_mask"]).sum
        # same float32 model on the same CPU; padding trimmed in the actor changes only summation order
        assert torch.allclose(out["logp_policy"], lp, atol=1e-4)
        assert torch.allclose(out["kl_exact"], sequence_kl(p_logits, q_logits, batch["loss_mask"], t), atol=1e-4)
        assert (out["kl_exact"] > 0).all()
    # defect c: the log-probs (and the KL) depend on the temperature they are scored at
    assert (hot["logp_policy"] - cold["logp_policy"]).abs().min() > 0.1
    assert torch.equal(identical["kl_exact"], torch.zeros(2))
    assert torch.equal(identical["logp_policy"], identical["logp_reference"])

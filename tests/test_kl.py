"""Exact KL against hand-computed closed forms."""

import math

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

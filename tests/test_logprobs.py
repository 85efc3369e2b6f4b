"""The shared log-prob function, checked by hand and against a plain per-token loop."""

from __future__ import annotations

import math

import torch

from actors.math.batch import collate_sequences, left_pad, micro_batches
from actors.math.logprobs import position_ids_from_mask, sequence_logprobs, token_logprobs


def test_token_logprobs_hand_example():
    # Two positions over a 3-token vocabulary; log softmax written out by hand.
    logits = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]]])
    labels = torch.tensor([[2, 0]])
    z = math.log(math.exp(0) + math.exp(1) + math.exp(2))
    expected = torch.tensor([[2.0 - z, -math.log(3.0)]])
    assert torch.allclose(token_logprobs(logits, labels), expected, atol=1e-6)


def test_sequence_logprobs_with_padding_matches_manual_gather():
    # Row 0: prompt [5, 6], response [7, 8]; row 1: prompt [5], response [9], right-padded with 0.
    batch = collate_sequences([[5, 6], [5]], [[7, 8], [9]], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [5, 9, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 11)
    out = sequence_logprobs(logits, batch["input_ids"], batch["loss_mask"])
    logsm = torch.log_softmax(logits, -1)
    # Response token at position t is predicted by logits at t-1.
    row0 = [float(logsm[0, 1, 7]), float(logsm[0, 2, 8])]
    row1 = [float(logsm[1, 0, 9])]
    assert out.token_logps.shape == (2, 3)
    assert torch.allclose(out.token_logps[0], torch.tensor([0.0, *row0]), atol=1e-6)
    assert torch.allclose(out.token_logps[1], torch.tensor([row1[0], 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(out.sum, torch.tensor([sum(row0), row1[0]]), atol=1e-6)
    assert out.length.tolist() == [2.0, 1.0]
    assert torch.allclose(out.mean, torch.tensor([sum(row0) / 2, row1[0]]), atol=1e-6)


def test_sequence_logprobs_matches_loop_on_random_batch():
    torch.manual_seed(1)
    B, T, V = 4, 9, 17
    logits = torch.randn(B, T, V)
    ids = torch.randint(0, V, (B, T))
    mask = (torch.rand(B, T) > 0.4).long()
    out = sequence_logprobs(logits, ids, mask)
    for b in range(B):
        total = 0.0
        for t in range(1, T):
            if mask[b, t]:
                total += float(torch.log_softmax(logits[b, t - 1], -1)[ids[b, t]])
        assert abs(float(out.sum[b]) - total) < 1e-5


def test_left_and_right_padding_layouts():
    ids, attn = left_pad([[1, 2, 3], [4]], pad_token_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and attn.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids_from_mask(attn).tolist() == [[0, 1, 2], [0, 0, 0]]
    left = collate_sequences([[1, 2]], [[3]], pad_token_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[1, 2, 3]]


def test_micro_batches_trim_padding_and_report_columns():
    batch = collate_sequences([[1], [1, 2, 3]], [[4], [5, 6]], pad_token_id=0, padding_side="left")
    chunks = list(micro_batches(batch, 1))
    (rows0, cols0, mb0), (rows1, cols1, mb1) = chunks
    assert (rows0.start, rows0.stop) == (0, 1) and mb0["input_ids"].tolist() == [[1, 4]]
    assert (cols0.start, cols0.stop) == (3, 5)
    assert mb1["input_ids"].shape == (1, 5) and (cols1.start, cols1.stop) == (0, 5)

"""Turning lists of token ids into padded tensor batches (see ``actors.math.logprobs`` for the layout)."""

from __future__ import annotations

from typing import Sequence

import torch

from actors.math.logprobs import position_ids_from_mask

Batch = dict[str, torch.Tensor]


def collate_sequences(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> Batch:
    """Pad prompt+response rows into ``input_ids``, ``attention_mask`` and ``loss_mask`` (response only)."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    rows = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
    width = max(len(r) for r in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(rows)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    loss_mask = torch.zeros((batch, width), dtype=torch.long)
    for i, (prompt, row) in enumerate(zip(prompt_ids, rows)):
        start = 0 if padding_side == "right" else width - len(row)
        input_ids[i, start:start + len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, start:start + len(row)] = 1
        loss_mask[i, start + len(prompt):start + len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def left_pad(ids: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask`` for generation."""
    width = max(len(r) for r in ids)
    input_ids = torch.full((len(ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        if row:
            input_ids[i, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
            attention_mask[i, width - len(row):] = 1
    return input_ids, attention_mask


def collate_pairs(prompt_ids: Sequence[Sequence[int]], chosen_ids: Sequence[Sequence[int]],
                  rejected_ids: Sequence[Sequence[int]], pad_token_id: int) -> Batch:
    """2B rows: the B chosen sequences, then the B rejected ones (one forward pass for both)."""
    return collate_sequences(list(prompt_ids) * 2, list(chosen_ids) + list(rejected_ids), pad_token_id)


def pair_micro_batches(batch: Batch, pairs_per_micro_batch: int):
    """Yield (pair indices, sub-batch) where the sub-batch holds those pairs' chosen then rejected rows."""
    pairs = batch["input_ids"].shape[0] // 2
    step = max(1, pairs_per_micro_batch)
    for start in range(0, pairs, step):
        index = torch.arange(start, min(pairs, start + step))
        _, part = slice_batch(batch, torch.cat([index, index + pairs]))
        yield index, part


def slice_batch(batch: Batch, rows: slice | torch.Tensor) -> tuple[slice, Batch]:
    """Rows of every tensor, trimmed to the columns that hold a real token in any of those rows.

    Returns the kept column range too, so token-level results can be written back in place.
    """
    width = batch["input_ids"].shape[1]
    part = {k: v[rows] for k, v in batch.items()}
    used = part["attention_mask"].any(0).nonzero()
    cols = slice(int(used[0]), int(used[-1]) + 1) if len(used) else slice(0, width)
    part = {k: (v[:, cols] if v.dim() >= 2 and v.shape[1] == width else v) for k, v in part.items()}
    return cols, part


def micro_batches(batch: Batch, micro_batch_size: int):
    """Yield (rows, cols, sub-batch) chunks of at most ``micro_batch_size`` rows, padding trimmed."""
    total = batch["input_ids"].shape[0]
    step = max(1, micro_batch_size)
    for start in range(0, total, step):
        rows = slice(start, min(total, start + step))
        cols, part = slice_batch(batch, rows)
        yield rows, cols, part


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padding-free layout: the real tokens of all rows in one row [1, N], in row order.

    Returns (packed ids, position ids restarting at 0 for each sequence, the [B, T] bool mask that
    ``unpack_rows`` scatters with). Given ``position_ids`` and no attention mask, transformers
    (``masking_utils.find_packed_sequence_indices``) starts a new sequence wherever a position does not
    follow its predecessor by 1, and masks attention across sequences (sdpa/eager: a block-diagonal
    causal mask; flash-attention: varlen kernels), so each sequence sees only itself."""
    keep = attention_mask.bool()
    return (input_ids[keep].unsqueeze(0), position_ids_from_mask(attention_mask)[keep].unsqueeze(0), keep)


def unpack_rows(packed: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[1, N, ...] values of a packed row back to the padded [B, T, ...] layout (zeros on padding);
    differentiable, so loss code written for padded batches runs unchanged."""
    out = packed.new_zeros((*keep.shape, *packed.shape[2:]))
    out[keep] = packed[0]
    return out

"""An LM backbone with a scalar head: per-token values (critic) or a sequence score (reward model).

Saved as an HF backbone folder plus ``value_head.safetensors`` and ``value_head.json`` (reward
normalisation), so the critic can be initialised from the reward model by loading the same folder.

Options (``from_pretrained``): ``lora`` wraps the backbone with LoRA adapters (the head stays fully
trainable; saving merges the adapters into the backbone weights, same format), ``gradient_checkpointing``
recomputes the backbone's layer activations in the backward pass, ``packing`` runs each batch
padding-free (see ``actors.math.batch.pack_rows``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from actors.math.batch import pack_rows, unpack_rows
from actors.math.logprobs import position_ids_from_mask
from actors.models import (apply_lora, disable_dropout, enable_gradient_checkpointing, freeze_lower_layers, is_lora,
                           merged_state_dict, resolve_model_path, torch_dtype)

HEAD_WEIGHTS = "value_head.safetensors"
HEAD_META = "value_head.json"


class ScalarHeadModel(nn.Module):
    def __init__(self, backbone: nn.Module, hidden_size: int, reward_mean: float = 0.0, reward_std: float = 1.0,
                 pooling: str = "last"):
        super().__init__()
        self.pooling = pooling  # how a reward model turns per-position outputs into a score (saved with the head)
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1)
        # A small head init keeps initial scores near 0 (OpenRLHF/TRL do the same).
        nn.init.normal_(self.head.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)
        self.reward_mean = reward_mean
        self.reward_std = reward_std
        self.packing = False

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: str = "float32", *, lora: dict | None = None,
                        gradient_checkpointing: bool = False, packing: bool = False,
                        freeze_layers: int = 0) -> "ScalarHeadModel":
        """Load a saved scalar-head model, or start one from any causal LM (fresh head).
        ``freeze_layers``: embeddings and the lowest K decoder layers do not train (a cheaper backward)."""
        from transformers import AutoModel

        path = resolve_model_path(name_or_path)
        backbone = disable_dropout(AutoModel.from_pretrained(path, dtype=torch_dtype(dtype)))
        if gradient_checkpointing:
            enable_gradient_checkpointing(backbone)
        model = cls(backbone, backbone.config.hidden_size).to(torch_dtype(dtype))
        if lora:  # after the head, so the head's random init does not depend on LoRA
            model.backbone = apply_lora(backbone, lora)
        freeze_lower_layers(model.backbone, freeze_layers)
        model.packing = packing
        folder = Path(path)
        if (folder / HEAD_WEIGHTS).exists():
            model.head.load_state_dict(load_file(str(folder / HEAD_WEIGHTS)))
            meta = json.loads((folder / HEAD_META).read_text())
            model.reward_mean, model.reward_std = float(meta["reward_mean"]), float(meta["reward_std"])
            model.pooling = meta.get("pooling", "last")
        return model

    @torch.no_grad()
    def fold_normalization(self) -> None:
        """Fold the stored reward normalisation into the head: w ← w/σ, b ← (b − μ)/σ, then μ = 0, σ = 1.

        A critic initialised from the reward model then predicts on the normalised scale (s − μ)/σ that
        PPO's rewards use, instead of starting off by μ and a factor σ."""
        self.head.weight.div_(self.reward_std)
        self.head.bias.sub_(self.reward_mean).div_(self.reward_std)
        self.reward_mean, self.reward_std = 0.0, 1.0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unnormalised scalar per position, [B, T] (with packing: the head's bias on padding)."""
        if self.packing:
            ids, position_ids, keep = pack_rows(input_ids, attention_mask)
            hidden = unpack_rows(self.backbone(input_ids=ids, position_ids=position_ids, use_cache=False)
                                 .last_hidden_state, keep)
        else:
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
        return self.head(hidden).squeeze(-1).float()

    def save_pretrained(self, folder: str | Path) -> None:
        """Backbone folder + head files; a LoRA backbone is saved with its adapters merged in."""
        folder = Path(folder)
        if is_lora(self.backbone):
            self.backbone.get_base_model().save_pretrained(folder, state_dict=merged_state_dict(self.backbone))
        else:
            self.backbone.save_pretrained(folder)
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, str(folder / HEAD_WEIGHTS))
        (folder / HEAD_META).write_text(json.dumps({"reward_mean": self.reward_mean, "reward_std": self.reward_std,
                                                    "pooling": self.pooling}))


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token per row, for either padding side."""
    width = attention_mask.shape[1]
    positions = torch.arange(width, device=attention_mask.device).expand_as(attention_mask)
    return (positions * attention_mask.long()).argmax(-1)

"""The base of every model-holding actor: load a model, compute masked log-probs in micro-batches.

Memory and adapter options (all off by default; any actor built on this class takes them):

- ``lora``: a dict (``r``, ``alpha``, ``dropout``, ``target_modules``; see ``actors.models.lora_config``)
  wraps the model with peft LoRA adapters: only the adapters train. The frozen base is then the
  reference policy: ``reference_logprobs`` runs the same model with the adapters disabled, so no
  second copy of the weights is needed. ``named_weights`` gives merged full weights under the base
  model's names (what generators load); ``adapter_weights`` gives the adapters alone (what a vLLM
  engine with LoRA enabled loads).
- ``gradient_checkpointing``: recompute decoder-layer activations in the backward pass.
- ``packing``: run each micro-batch padding-free, its rows concatenated into one row with position
  ids restarting per sequence; logits come back in the padded [B, T, V] layout.
- ``offload_optimizer``: keep the optimizer state (and master weights) on the CPU while the model is
  on an accelerator (``actors.offload``); a no-op on a CPU-only machine. Used by trainable subclasses.
- bf16 autocast: ``autocast_bf16`` (already there).
"""

from __future__ import annotations

import contextlib
import time

import torch

from actors.math.batch import Batch, micro_batches, pack_rows, unpack_rows
from actors.math.logprobs import position_ids_from_mask, sequence_logprobs
from actors.models import (apply_lora, enable_gradient_checkpointing, is_lora, load_causal_lm, load_tokenizer,
                           merged_state_dict, resolve_model_path, save_causal_lm)
from actors.runtime import configure_threads, describe_actor, pick_device, quiet_transformers, seed_everything
from actors.weight_transfer import WeightDict, snapshot


class ModelWorker:
    """Holds one causal LM. Subclasses add training (policy) or stay frozen (reference)."""

    role = "model"

    def __init__(self, model: str, *, seed: int = 0, torch_threads: int | None = None,
                 dtype: str = "float32", autocast_bf16: bool = False, micro_batch_size: int = 8,
                 lora: dict | None = None, gradient_checkpointing: bool = False, packing: bool = False,
                 offload_optimizer: bool = False):
        quiet_transformers()
        self.threads = configure_threads(torch_threads)
        seed_everything(seed)
        self.seed = seed
        self.device = pick_device()
        self.model_name = model
        self.model_path = resolve_model_path(model)
        self.model = load_causal_lm(self.model_path, dtype=dtype, device=self.device)
        if gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        if lora:
            self.model = apply_lora(self.model, lora)
        self.tokenizer = load_tokenizer(self.model_path)
        self.autocast_bf16 = autocast_bf16
        self.micro_batch_size = micro_batch_size
        self.gradient_checkpointing = gradient_checkpointing
        self.packing = packing
        self.offload_optimizer = offload_optimizer

    def info(self) -> dict:
        return describe_actor(self.role, self.device, model=self.model_name,
                              parameters=sum(p.numel() for p in self.model.parameters()),
                              trainable_parameters=sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                              lora=self.lora, gradient_checkpointing=self.gradient_checkpointing, packing=self.packing)

    @property
    def lora(self) -> bool:
        return is_lora(self.model)

    def _autocast(self):
        if not self.autocast_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _logits(self, mb: Batch) -> torch.Tensor:
        mb = {k: v.to(self.device) for k, v in mb.items()}
        with self._autocast():
            if self.packing:
                input_ids, position_ids, keep = pack_rows(mb["input_ids"], mb["attention_mask"])
                # No attention mask: transformers reads the sequence boundaries from the position ids.
                out = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
                return unpack_rows(out.logits, keep)
            out = self.model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                             position_ids=position_ids_from_mask(mb["attention_mask"]), use_cache=False)
        return out.logits

    @torch.no_grad()
    def logprobs(self, batch: Batch, micro_batch_size: int | None = None,
                 temperature: float = 1.0) -> dict[str, torch.Tensor]:
        """Masked per-token log-probs [B, T-1] of logits / ``temperature`` (the rollout's sampling temperature),
        their sum and the response length per row."""
        self.model.eval()
        start = time.perf_counter()
        rows_total, width = batch["input_ids"].shape
        token_logps = torch.zeros(rows_total, width - 1)
        for rows, cols, mb in micro_batches(batch, micro_batch_size or self.micro_batch_size):
            out = sequence_logprobs(self._logits(mb), mb["input_ids"].to(self.device), mb["loss_mask"].to(self.device),
                                    temperature)
            token_logps[rows, cols.start:cols.stop - 1] = out.token_logps.cpu()
        mask = batch["loss_mask"][:, 1:].float()
        return {"token_logps": token_logps, "sum": token_logps.sum(-1), "length": mask.sum(-1),
                "seconds": torch.tensor(time.perf_counter() - start)}

    def reference_logprobs(self, batch: Batch, micro_batch_size: int | None = None,
                           temperature: float = 1.0) -> dict[str, torch.Tensor]:
        """``logprobs`` of the frozen base model (LoRA adapters disabled): a LoRA policy is its own reference.

        Disabled adapters leave exactly the base layers' computation, so these equal a separate
        ReferenceActor's log-probs on the same base weights (and the policy's own before training)."""
        if not self.lora:
            raise RuntimeError("reference_logprobs needs a LoRA model (lora=...); use a ReferenceActor otherwise")
        with self.model.disable_adapter():
            return self.logprobs(batch, micro_batch_size, temperature)

    def named_weights(self) -> WeightDict:
        """A CPU copy of the full weights under the base model's names (for pushing to generators or
        saving). With LoRA: the adapters merged in, computed without modifying the training model."""
        return merged_state_dict(self.model)

    def adapter_weights(self) -> dict[str, torch.Tensor]:
        """The LoRA adapter tensors alone, in peft's saved format (``base_model.model.<module>.lora_A.weight``):
        what ``VLLMGenerationBackend.load_weights`` takes when the engine runs with ``lora`` enabled."""
        if not self.lora:
            raise RuntimeError("adapter_weights needs a LoRA model (lora=...)")
        from peft import get_peft_model_state_dict

        return snapshot(get_peft_model_state_dict(self.model))

    def save_adapter(self, path: str) -> str:
        """The adapter alone as a peft folder (adapter_config.json + adapter_model.safetensors)."""
        if not self.lora:
            raise RuntimeError("save_adapter needs a LoRA model (lora=...)")
        self.model.save_pretrained(path)
        return path

    def save_pretrained_model(self, path: str) -> str:
        """An HF folder that AutoModelForCausalLM.from_pretrained loads (safetensors + tokenizer); with
        LoRA the weights are merged and the adapter is also written to ``<path>/adapter``."""
        return save_causal_lm(self.model, self.tokenizer, path)

    def weights_checksum(self) -> float:
        """A cheap fingerprint to check that a frozen model did not change."""
        with torch.no_grad():
            return float(sum(p.double().sum() for p in self.model.parameters()))

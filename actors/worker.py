"""The base of every model-holding actor: load a model, compute masked log-probs in micro-batches."""

from __future__ import annotations

import contextlib
import time

import torch

from actors.batch import Batch, micro_batches
from actors.logprobs import position_ids_from_mask, sequence_logprobs
from actors.models import load_causal_lm, load_tokenizer, resolve_model_path
from actors.runtime import configure_threads, describe_actor, pick_device, quiet_transformers, seed_everything


class ModelWorker:
    """Holds one causal LM. Subclasses add training (policy) or stay frozen (reference)."""

    role = "model"

    def __init__(self, model: str, *, seed: int = 0, torch_threads: int | None = None,
                 dtype: str = "float32", autocast_bf16: bool = False, micro_batch_size: int = 8):
        quiet_transformers()
        self.threads = configure_threads(torch_threads)
        seed_everything(seed)
        self.seed = seed
        self.device = pick_device()
        self.model_name = model
        self.model_path = resolve_model_path(model)
        self.model = load_causal_lm(self.model_path, dtype=dtype, device=self.device)
        self.tokenizer = load_tokenizer(self.model_path)
        self.autocast_bf16 = autocast_bf16
        self.micro_batch_size = micro_batch_size

    def info(self) -> dict:
        return describe_actor(self.role, self.device, model=self.model_name,
                              parameters=sum(p.numel() for p in self.model.parameters()))

    def _autocast(self):
        if not self.autocast_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _logits(self, mb: Batch) -> torch.Tensor:
        mb = {k: v.to(self.device) for k, v in mb.items()}
        with self._autocast():
            out = self.model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                             position_ids=position_ids_from_mask(mb["attention_mask"]), use_cache=False)
        return out.logits

    @torch.no_grad()
    def logprobs(self, batch: Batch, micro_batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """Masked per-token log-probs [B, T-1], their sum and the response length per row."""
        self.model.eval()
        start = time.perf_counter()
        rows_total, width = batch["input_ids"].shape
        token_logps = torch.zeros(rows_total, width - 1)
        for rows, cols, mb in micro_batches(batch, micro_batch_size or self.micro_batch_size):
            out = sequence_logprobs(self._logits(mb), mb["input_ids"].to(self.device), mb["loss_mask"].to(self.device))
            token_logps[rows, cols.start:cols.stop - 1] = out.token_logps.cpu()
        mask = batch["loss_mask"][:, 1:].float()
        return {"token_logps": token_logps, "sum": token_logps.sum(-1), "length": mask.sum(-1),
                "seconds": torch.tensor(time.perf_counter() - start)}

    def named_weights(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the weights (for pushing to generators or saving)."""
        return {k: v.detach().to("cpu").clone() for k, v in self.model.state_dict().items()}

    def weights_checksum(self) -> float:
        """A cheap fingerprint to check that a frozen model did not change."""
        with torch.no_grad():
            return float(sum(p.double().sum() for p in self.model.parameters()))

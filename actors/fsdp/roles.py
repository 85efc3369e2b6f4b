"""The sharded roles: one rank of an FSDP2 policy, critic or reward model, and how each exports an HF folder."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from actors.critic import CriticActor
from actors.math.batch import collate_sequences
from actors.fsdp.mixin import FSDPConfig, ShardedMixin
from actors.fsdp.state import _barrier
from actors.policy import PolicyActor
from actors.reward import RewardModelActor
from actors.value_model import HEAD_META, HEAD_WEIGHTS
from actors.weight_transfer import WeightDict

# -- the sharded actors ---------------------------------------------------------------------------
class ShardedPolicyActor(ShardedMixin, PolicyActor):
    """One rank of an FSDP2-sharded policy. Same methods as PolicyActor; results of per-row methods
    are a rank's share (the group combines them)."""

    def __init__(self, model: str, *, rank: int, world_size: int, master_addr: str, master_port: int,
                 fsdp: FSDPConfig | dict | None = None, **kwargs):
        if kwargs.get("lora"):
            raise ValueError("policy: LoRA is not supported with a sharded policy (num_workers > 1) yet")
        self._join_process_group(rank, world_size, master_addr, master_port, fsdp,
                                 bool(kwargs.get("offload_optimizer")))
        super().__init__(model, **kwargs)  # loads the model; its setup_optimizer call shards it first

    def _idle_pass(self):
        logits = self._logits(self._idle_inputs())
        return logits.float().sum() * 0.0, {}

    @torch.no_grad()
    def logprobs(self, batch, micro_batch_size: int | None = None, temperature: float = 1.0) -> dict:
        compute = super().logprobs
        return self._rows_on_this_rank(lambda rows, micro: compute(rows, micro, temperature), batch, micro_batch_size)

    def named_weights(self) -> WeightDict | None:
        """Full weights on rank 0 (None on the others; the group returns rank 0's result)."""
        weights = self._gather_full_state()
        return WeightDict(weights) if self.rank == 0 else None

    def save(self, path: str) -> str:
        """An HF folder (safetensors + tokenizer) that AutoModelForCausalLM.from_pretrained loads."""
        weights = self._gather_full_state()
        if self.rank == 0:
            folder = Path(path)
            folder.mkdir(parents=True, exist_ok=True)
            # transformers writes the architecture without FSDP2's class-name prefix and takes the
            # gathered state dict as given.
            self.model.save_pretrained(folder, state_dict=weights)
            self.tokenizer.save_pretrained(folder)
        _barrier()
        return str(path)


class _ShardedScalarHead(ShardedMixin):
    """The sharded ScalarHeadModel roles' shared part (critic, reward model): their idle pass."""

    def _idle_pass(self):
        inputs = {k: v.to(self.device) for k, v in self._idle_inputs().items()}
        return self.model(inputs["input_ids"], inputs["attention_mask"]).sum() * 0.0, {}


class ShardedCriticActor(_ShardedScalarHead, CriticActor):
    """One rank of an FSDP2-sharded critic (value model)."""

    def __init__(self, model: str, *, rank: int, world_size: int, master_addr: str, master_port: int,
                 fsdp: FSDPConfig | dict | None = None, **kwargs):
        if kwargs.get("lora"):
            raise ValueError("critic: LoRA is not supported with a sharded critic (num_workers > 1) yet")
        self._join_process_group(rank, world_size, master_addr, master_port, fsdp,
                                 bool(kwargs.get("offload_optimizer")))
        super().__init__(model, **kwargs)

    @torch.no_grad()
    def values(self, batch, micro_batch_size: int | None = None) -> dict:
        return self._rows_on_this_rank(super().values, batch, micro_batch_size)

    def save(self, path: str) -> str:
        return _save_scalar_head_model(self, path)


class ShardedRewardModelActor(_ShardedScalarHead, RewardModelActor):
    """One rank of an FSDP2-sharded learned reward model while it trains (``jobs.reward``). Bradley-Terry
    steps deal the pair micro-batches to the ranks; ``score`` returns this rank's rows (combined in
    order by the group); ``eval_rm`` sums correct pairs and margins over the ranks."""

    def __init__(self, *, rank: int, world_size: int, master_addr: str, master_port: int,
                 fsdp: FSDPConfig | dict | None = None, **kwargs):
        if kwargs.get("kind", "learned") != "learned" or kwargs.get("optimizer") is None:
            raise ValueError("reward: a sharded reward model (num_workers > 1) is a learned one being trained "
                             "(kind 'learned' and an optimizer); a frozen scorer runs on one actor")
        if kwargs.get("lora"):
            raise ValueError("reward: LoRA is not supported with a sharded reward model (num_workers > 1) yet")
        self._join_process_group(rank, world_size, master_addr, master_port, fsdp,
                                 bool(kwargs.get("offload_optimizer")))
        super().__init__(**kwargs)

    @torch.no_grad()
    def score(self, prompt_ids, response_ids) -> dict:
        start = time.perf_counter()
        batch = collate_sequences(prompt_ids, response_ids, self.tokenizer.pad_token_id)
        shard = self._rows_on_this_rank(self._score_batch, batch, None)
        if shard["result"] is not None:
            shard["result"]["seconds"] = torch.tensor(time.perf_counter() - start)
        return shard

    def save(self, path: str) -> str:
        return _save_scalar_head_model(self, path, tokenizer=self.tokenizer)


def _save_scalar_head_model(actor, path: str, tokenizer=None) -> str:
    """A sharded ScalarHeadModel (critic, reward model) as ``ScalarHeadModel.save_pretrained`` writes it:
    the HF backbone folder, the head's safetensors and its normalisation, gathered on rank 0."""
    from safetensors.torch import save_file

    weights = actor._gather_full_state()
    if actor.rank == 0:
        import json

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        backbone = {k[len("backbone."):]: v for k, v in weights.items() if k.startswith("backbone.")}
        head = {k[len("head."):]: v.contiguous() for k, v in weights.items() if k.startswith("head.")}
        actor.model.backbone.save_pretrained(folder, state_dict=backbone)
        save_file(head, str(folder / HEAD_WEIGHTS))
        (folder / HEAD_META).write_text(json.dumps({"reward_mean": actor.model.reward_mean,
                                                    "reward_std": actor.model.reward_std,
                                                    "pooling": actor.model.pooling}))
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    _barrier()
    return str(path)


SHARDED_CLASSES: dict[type, type] = {PolicyActor: ShardedPolicyActor, CriticActor: ShardedCriticActor,
                                     RewardModelActor: ShardedRewardModelActor}


# -- combining the ranks' results -----------------------------------------------------------------

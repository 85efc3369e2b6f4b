"""Generation workers: one interface, two backends (Hugging Face ``generate`` now; vLLM fills the same one).

A backend turns prompt token ids into ``Completion``s: response ids (ending at EOS when one was
emitted), the log-prob of each sampled token under the model's raw distribution (temperature 1,
before top-p/top-k: the numbers a trainer recomputes), and why it stopped.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Protocol, Sequence

import torch

from actors.batch import left_pad
from actors.logprobs import token_logprobs
from actors.models import load_causal_lm, load_tokenizer, resolve_model_path
from actors.runtime import configure_threads, describe_actor, pick_device, quiet_transformers, seed_everything


@dataclass
class SamplingConfig:
    n: int = 1                     # samples per prompt
    temperature: float = 1.0       # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                 # 0 = off
    max_new_tokens: int = 64
    seed: int = 0
    stop_token_ids: list[int] = field(default_factory=list)  # in addition to the tokenizer's EOS

    def validate(self, prefix: str = "sampling") -> None:
        checks = [(self.n >= 1, "n must be >= 1"), (self.temperature >= 0, "temperature must be >= 0"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"), (self.top_k >= 0, "top_k must be >= 0"),
                  (self.max_new_tokens >= 1, "max_new_tokens must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{prefix}.{message} (got {asdict(self)})")


@dataclass
class Completion:
    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS or a stop token) | "length"


class GenerationBackend(Protocol):
    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Completion]: ...
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None: ...


def _cut_at_stop(tokens: list[int], stop_ids: set[int], pad_id: int) -> tuple[list[int], str]:
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[: i + 1], "stop"
    return tokens, "length"


class HFGenerationBackend:
    """``model.generate`` in micro-batches; raw-logit log-probs gathered at the sampled tokens."""

    def __init__(self, model: str, dtype: str = "float32", micro_batch_size: int = 64):
        self.device = pick_device()
        self.model = load_causal_lm(model, dtype=dtype, device=self.device)
        self.tokenizer = load_tokenizer(model)
        self.micro_batch_size = micro_batch_size

    @torch.no_grad()
    def generate(self, prompt_ids, sampling):
        stop_ids = {self.tokenizer.eos_token_id, *sampling.stop_token_ids}
        pad_id = self.tokenizer.pad_token_id
        rows = [(i, j, list(p)) for i, p in enumerate(prompt_ids) for j in range(sampling.n)]
        torch.manual_seed(sampling.seed)
        completions: list[Completion] = []
        for start in range(0, len(rows), self.micro_batch_size):
            chunk = rows[start:start + self.micro_batch_size]
            input_ids, attention_mask = left_pad([r[2] for r in chunk], pad_id)
            greedy = sampling.temperature == 0
            out = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
                temperature=None if greedy else sampling.temperature, top_p=None if greedy else sampling.top_p,
                top_k=None if greedy else (sampling.top_k or None), eos_token_id=sorted(stop_ids),
                pad_token_id=pad_id, return_dict_in_generate=True, output_logits=True,
            )
            new_tokens = out.sequences[:, input_ids.shape[1]:].cpu()
            # out.logits: one [b, V] tensor per step, before any processor; gathered step by step
            # so a [b, steps, V] copy is never built.
            logps = torch.stack([token_logprobs(step.cpu(), new_tokens[:, s]) for s, step in enumerate(out.logits)], 1)
            for k, (i, j, prompt) in enumerate(chunk):
                tokens, reason = _cut_at_stop(new_tokens[k].tolist(), stop_ids, pad_id)
                completions.append(Completion(i, j, prompt, tokens, logps[k, : len(tokens)].tolist(), reason))
        return completions

    def load_weights(self, weights):
        self.model.load_state_dict(weights, strict=True)


class GenerationActor:
    """One generation worker. ``backend='hf'`` (always available) or ``'vllm'`` (when installed)."""

    role = "generator"

    def __init__(self, model: str, *, backend: str = "hf", seed: int = 0, torch_threads: int | None = None,
                 dtype: str = "float32", micro_batch_size: int = 64, backend_options: dict | None = None):
        quiet_transformers()
        self.threads = configure_threads(torch_threads)
        seed_everything(seed)
        self.model_name = model
        self.backend_name = backend
        path = resolve_model_path(model)
        if backend == "hf":
            self.backend: GenerationBackend = HFGenerationBackend(path, dtype=dtype, micro_batch_size=micro_batch_size)
        elif backend == "vllm":
            from actors.vllm_backend import VLLMGenerationBackend  # imported only where vLLM is installed

            self.backend = VLLMGenerationBackend(path, dtype=dtype, **(backend_options or {}))
        else:
            raise ValueError(f"generation backend must be 'hf' or 'vllm', got {backend!r}")
        self.weights_version = 0

    def info(self) -> dict:
        return describe_actor(self.role, getattr(self.backend, "device", "cpu"), backend=self.backend_name,
                              model=self.model_name, weights_version=self.weights_version)

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig | dict) -> dict:
        sampling = SamplingConfig(**sampling) if isinstance(sampling, dict) else sampling
        sampling.validate()
        start = time.perf_counter()
        completions = self.backend.generate(prompt_ids, sampling)
        seconds = time.perf_counter() - start
        return {"completions": completions, "seconds": seconds,
                "tokens": sum(len(c.response_ids) for c in completions), "weights_version": self.weights_version}

    def update_weights(self, weights: dict[str, torch.Tensor], version: int | None = None) -> dict:
        start = time.perf_counter()
        self.backend.load_weights(weights)
        self.weights_version = version if version is not None else self.weights_version + 1
        return {"seconds": time.perf_counter() - start, "weights_version": self.weights_version}


def generate_sharded(group, prompt_ids: Sequence[Sequence[int]], sampling: SamplingConfig) -> list[Completion]:
    """Split prompts across a group of GenerationActors, gather completions in prompt order.

    Shard k samples with seed ``sampling.seed + k`` so shards never repeat each other's draws.
    """
    shards = group.shard(list(range(len(prompt_ids))))
    busy = [(k, actor, shard) for k, (actor, shard) in enumerate(zip(group.actors, shards)) if shard]
    refs = [actor.generate.remote([prompt_ids[i] for i in shard], {**asdict(sampling), "seed": sampling.seed + k})
            for k, actor, shard in busy]
    completions: list[Completion] = []
    for (_, _, shard), result in zip(busy, group.get(refs, "generate")):
        for c in result["completions"]:
            c.prompt_index = shard[c.prompt_index]
            completions.append(c)
    return completions

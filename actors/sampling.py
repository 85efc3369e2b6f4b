"""What a generation backend is asked for and what it returns: the sampling settings, one completion, and
the backend interface. Shared by ``actors.generation`` (HF) and ``actors.vllm_backend`` (vLLM)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol, Sequence

import torch


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
    def response_logprobs(self, prompt_ids: Sequence[Sequence[int]],
                          response_ids: Sequence[Sequence[int]]) -> list[list[float]]: ...
    def load_weights(self, weights: dict[str, torch.Tensor]) -> None: ...

"""Text (or chat messages) to token ids, with length limits: what drivers send to actors.

Prompt and response are tokenized separately and concatenated, so the response boundary is exact
(the loss mask covers exactly the response tokens, plus the EOS appended to each response).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from jobs.run.config import ConfigError

Text = str | list[dict]


@dataclass
class TokenizeConfig:
    max_prompt_length: int = 128
    max_length: int = 256               # prompt + response
    truncation_side: str = "keep_end"   # keep_end: drop the prompt's start (dialogue); keep_start
    chat_template: str = "auto"         # auto: use it for chat-message records when the tokenizer has one
    on_overlong: str = "truncate"       # truncate | skip | error

    def validate(self, prefix: str = "tokenize") -> None:
        if not 0 < self.max_prompt_length < self.max_length:
            raise ConfigError(f"{prefix}.max_prompt_length must be > 0 and < {prefix}.max_length, got "
                              f"{self.max_prompt_length} and {self.max_length}")
        if self.truncation_side not in ("keep_end", "keep_start"):
            raise ConfigError(f"{prefix}.truncation_side must be keep_end or keep_start, got {self.truncation_side!r}")
        if self.chat_template not in ("auto", "always", "never"):
            raise ConfigError(f"{prefix}.chat_template must be auto, always or never, got {self.chat_template!r}")
        if self.on_overlong not in ("truncate", "skip", "error"):
            raise ConfigError(f"{prefix}.on_overlong must be truncate, skip or error, got {self.on_overlong!r}")


class OverlongError(ValueError):
    """A row longer than ``tokenize.max_length`` under ``tokenize.on_overlong=error``; names the row."""


def _use_template(tokenizer, prompt: Text, mode: str) -> bool:
    if mode == "never":
        return False
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if mode == "always":
        if not has_template:
            raise ValueError("tokenize.chat_template is 'always' but the tokenizer has no chat template")
        return True
    return isinstance(prompt, list) and has_template


def encode_prompt(tokenizer, prompt: Text, config: TokenizeConfig | None = None) -> list[int]:
    config = config or TokenizeConfig()
    if _use_template(tokenizer, prompt, config.chat_template):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    if isinstance(prompt, list):  # chat messages without a template: plain "role: content" lines
        prompt = "".join(f"{m['role']}: {m['content']}\n" for m in prompt) + "assistant:"
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def encode_response(tokenizer, response: Text) -> list[int]:
    text = response if isinstance(response, str) else response[-1]["content"]
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def fit_lengths(prompt: list[int], responses: Sequence[list[int]], config: TokenizeConfig,
                where: str = "", names: Sequence[str] | None = None) -> tuple[list[int], list[list[int]]] | None:
    """Apply the DPO reference implementation's rule: shorten the prompt first, then the responses.

    Returns None for a row to skip (on_overlong='skip'); raises OverlongError for 'error', naming
    ``where`` (the record's "file: row N") and the longest response's field (``names``).
    """
    longest = max(range(len(responses)), key=lambda i: len(responses[i]))
    total = len(prompt) + len(responses[longest])
    if total <= config.max_length:
        return prompt, list(responses)
    if config.on_overlong == "error":
        field = f"field '{names[longest]}'" if names else "field 'response'"
        raise OverlongError(f"{where or 'row'}, {field}: prompt + response is {total} tokens, more than "
                            f"tokenize.max_length={config.max_length} (tokenize.on_overlong=truncate or skip "
                            f"would keep going)")
    if config.on_overlong == "skip":
        return None
    if len(prompt) > config.max_prompt_length:
        keep = config.max_prompt_length
        prompt = prompt[-keep:] if config.truncation_side == "keep_end" else prompt[:keep]
    budget = config.max_length - len(prompt)
    return prompt, [r[:budget] for r in responses]


@dataclass
class EncodedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str = ""


def encode_pairs(tokenizer, pairs, config: TokenizeConfig) -> tuple[list[EncodedPair], dict[str, int]]:
    """Tokenize preference pairs with the length rules; returns the encoded pairs and what was cut or skipped."""
    encoded, counts = [], {"truncated": 0, "skipped_overlong": 0, "skipped_identical_after_truncation": 0}
    for pair in pairs:
        where = getattr(pair, "source", "") or "pair"
        prompt = encode_prompt(tokenizer, pair.prompt, config)
        chosen, rejected = encode_response(tokenizer, pair.chosen), encode_response(tokenizer, pair.rejected)
        fitted = fit_lengths(prompt, [chosen, rejected], config, where, ("chosen", "rejected"))
        if fitted is None:
            counts["skipped_overlong"] += 1
            continue
        new_prompt, (new_chosen, new_rejected) = fitted
        counts["truncated"] += int((new_prompt, new_chosen, new_rejected) != (prompt, chosen, rejected))
        if new_chosen == new_rejected:  # truncation can erase the only difference between the two
            counts["skipped_identical_after_truncation"] += 1
            continue
        encoded.append(EncodedPair(new_prompt, new_chosen, new_rejected, where))
    return encoded, counts

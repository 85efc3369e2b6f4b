"""Record types, the error and load report every reader shares, and small text helpers (HH transcripts)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from jobs.run.cli import UserError


Message = dict[str, str]
Messages = list[Message]
Prompt = Union[str, Messages]

CHAT_ROLES = ("system", "user", "assistant")
# Score columns of scored pair files (UltraFeedback's names and jobs.experiment.preference_data's), checked as
# finite numbers wherever a row has them.
SCORE_FIELDS = ("score_chosen", "score_rejected", "chosen_score", "rejected_score")
# Record fields a ``columns`` mapping may rename to the source's column names.
COLUMN_FIELDS = ("prompt", "chosen", "rejected", "text", "label", "prompt_id", *SCORE_FIELDS)
MAX_REPORT_MESSAGES = 5
HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"

# kind -> (hub id, default split)
HUB_DATASETS: dict[str, tuple[str, str]] = {
    "hh": ("Anthropic/hh-rlhf", "train"),
    "tldr": ("trl-lib/tldr-preference", "train"),
    "ultrafeedback": ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs"),
    "imdb": ("stanfordnlp/imdb", "train"),
}
FILE_FORMATS = ("jsonl", "json", "parquet", "csv")
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

# Characters that ``errors="surrogateescape"`` makes of bytes that are not UTF-8.
_UNDECODABLE = re.compile("[\udc80-\udcff]")
_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------
# Records, errors, reports


@dataclass(frozen=True)
class PreferencePair:
    """One comparison: a prompt and two replies, ``chosen`` preferred by the labeller.

    ``source`` ("hh.jsonl: row 12") lets later stages (tokenization, batching) point at the row.
    """

    prompt: Prompt
    chosen: str
    rejected: str
    metadata: dict = field(default_factory=dict)
    source: str = ""

    @property
    def is_chat(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass(frozen=True)
class PromptRecord:
    """One prompt for generation (PPO rollouts, Best-of-N, evaluation)."""

    prompt: Prompt
    metadata: dict = field(default_factory=dict)
    source: str = ""

    @property
    def is_chat(self) -> bool:
        return isinstance(self.prompt, list)


Record = Union[PreferencePair, PromptRecord]


class DataError(UserError, ValueError):
    """A problem with the data, located: ``"<file or hub id>: row N, field 'col': <problem>"``.

    ``row`` is 1-based (see the module docstring); ``reason`` is a short key (``"empty_text"``,
    ``"nan_score"``, ...) that :class:`LoadReport` counts skipped rows by.
    """

    label = "data error"

    def __init__(self, source: str, problem: str, row: int | None = None, field: str | None = None,
                 reason: str = "invalid"):
        self.source, self.problem, self.row, self.field, self.reason = source, problem, row, field, reason
        where = str(source)
        if row is not None:
            where += f": row {row}"
        if field is not None:
            where += f", field '{field}'" if row is not None else f": field '{field}'"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self):
        # Exceptions pickle as cls(*args); spell out ours so Ray can ship it between processes.
        return (type(self), (self.source, self.problem, self.row, self.field, self.reason))


@dataclass
class LoadReport:
    """What a load did: ``total`` rows seen = ``kept`` + the sum of ``skipped`` (by reason).

    Duplicates are counted under ``"duplicate"`` but not described in ``messages``, which keeps
    the first few bad-row messages so a glance shows what went wrong.
    """

    source: str
    total: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, reason: str, message: str | None = None) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if message is not None and len(self.messages) < MAX_REPORT_MESSAGES:
            self.messages.append(message)

    def summary(self) -> str:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.skipped.items()))
        text = f"{self.source}: {self.total} rows, {self.kept} kept, {self.num_skipped} skipped"
        return f"{text} ({reasons})" if reasons else text


# ----------------------------------------------------------------------------------------------
# Text helpers


def split_hh_transcript(text: str) -> tuple[str, str]:
    """Split an HH-RLHF transcript into (prompt up to and including the final "\\n\\nAssistant:",
    final assistant turn without its leading space). Raises ValueError on a malformed transcript."""
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError(f"transcript has no {HH_ASSISTANT!r} turn")
    prompt = text[: cut + len(HH_ASSISTANT)]
    if HH_HUMAN not in prompt:
        raise ValueError(f"transcript has no {HH_HUMAN!r} turn before the final assistant turn")
    response = text[cut + len(HH_ASSISTANT):]
    return prompt, response.removeprefix(" ")


def hh_transcript_to_messages(text: str) -> Messages:
    """HH-RLHF transcript (or prompt) -> chat messages, for tokenizers with a chat template.

    A trailing empty "Assistant:" turn (the slot a prompt leaves for the reply) is dropped, so a
    prompt maps to messages ending with the user's turn.
    """
    parts = re.split(r"\n\n(Human|Assistant):", text)
    if parts[0].strip() or len(parts) < 3:
        raise ValueError("an HH transcript starts with '\\n\\nHuman:'")
    messages = [
        {"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
        for speaker, content in zip(parts[1::2], parts[2::2])
    ]
    if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def join_prompt_response(prompt: str, response: str) -> str:
    """Plain-text prompt + response with exactly the separator the data layer dropped.

    Inserts one space unless the prompt already ends, or the response already starts, with
    whitespace (generic files may keep their own separator).
    """
    if not prompt or not response or prompt[-1].isspace() or response[0].isspace():
        return prompt + response
    return f"{prompt} {response}"


def _prompt_key(prompt: Prompt) -> tuple:
    """A hashable identity for a text or chat prompt (chat messages are lists of dicts)."""
    if isinstance(prompt, str):
        return ("text", prompt)
    return ("chat",) + tuple((m["role"], m["content"]) for m in prompt)


def _pair_key(pair: PreferencePair) -> tuple:
    return (_prompt_key(pair.prompt), pair.chosen, pair.rejected)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _as_list(value: Any) -> list | None:
    """Lists, tuples and array-likes (numpy arrays from pandas) as a list; anything else None."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if not isinstance(value, (str, bytes, Mapping)) and hasattr(value, "tolist"):
        converted = value.tolist()
        return converted if isinstance(converted, list) else None
    return None

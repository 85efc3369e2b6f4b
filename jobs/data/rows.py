"""One source row under validation: typed field access whose every error names source, row and field."""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from jobs.data.records import (
    CHAT_ROLES,
    DataError,
    Messages,
    PreferencePair,
    Prompt,
    PromptRecord,
    _UNDECODABLE,
    _as_list,
    _type_name,
)


@dataclass(frozen=True)
class _Row:
    """A raw row plus where it came from. ``columns`` maps record fields to the source's column
    names; ``text_cells`` marks CSV, whose cells are all strings (numbers and JSON-encoded chat
    messages are parsed from them)."""

    values: Mapping[str, Any]
    source: str
    number: int
    columns: Mapping[str, str]
    text_cells: bool = False

    def column(self, name: str) -> str:
        return self.columns.get(name, name)

    @property
    def where(self) -> str:
        return f"{self.source}: row {self.number}"

    def error(self, name: str | None, problem: str, reason: str) -> DataError:
        column = None if name is None else self.column(name)
        if column is not None and column != name:
            problem += f" (column used as {name!r})"
        return DataError(self.source, problem, self.number, column, reason)

    def has(self, name: str) -> bool:
        return self.values.get(self.column(name)) is not None

    def raw(self, name: str) -> Any:
        column = self.column(name)
        if column not in self.values:
            raise self.error(name, "missing (no such column or key)", "missing_field")
        value = self.values[column]
        if value is None:
            raise self.error(name, "missing value (null)", "missing_field")
        return value

    def checked_text(self, name: str, value: str, what: str = "text") -> str:
        if _UNDECODABLE.search(value):
            raise self.error(name, f"{what} holds bytes that are not valid UTF-8", "undecodable")
        if not value.strip():
            raise self.error(name, f"empty {what}", "empty_text")
        return value

    def text(self, name: str) -> str:
        value = self.raw(name)
        if not isinstance(value, str):
            raise self.error(name, f"expected text, got {_type_name(value)}", "wrong_type")
        return self.checked_text(name, value)

    def text_or_messages(self, name: str) -> Prompt:
        value = self.raw(name)
        if isinstance(value, str):
            if self.text_cells and value.lstrip().startswith("["):
                decoded = _json_list_or_none(value)
                if decoded is not None:
                    return self.messages_from(name, decoded)
            return self.checked_text(name, value)
        items = _as_list(value)
        if items is None:
            raise self.error(name, f"expected text or a list of chat messages, got {_type_name(value)}",
                             "wrong_type")
        return self.messages_from(name, items)

    def messages_from(self, name: str, items: list) -> Messages:
        if not items:
            raise self.error(name, "empty list of chat messages", "malformed_messages")
        messages = []
        for index, item in enumerate(items):
            what = f"message {index}"
            if not isinstance(item, Mapping):
                raise self.error(name, f"{what}: expected an object with 'role' and 'content', got "
                                       f"{_type_name(item)}", "malformed_messages")
            role, content = item.get("role"), item.get("content")
            if role not in CHAT_ROLES:
                raise self.error(name, f"{what}: role must be one of {', '.join(CHAT_ROLES)}, got {role!r}",
                                 "malformed_messages")
            if not isinstance(content, str):
                raise self.error(name, f"{what}: content must be text, got {_type_name(content)}",
                                 "malformed_messages")
            messages.append({"role": role, "content": self.checked_text(name, content, f"{what} content")})
        return messages

    def completion(self, name: str) -> tuple[Messages, str]:
        """A chosen/rejected value as (conversation before the reply, reply text).

        Text gives no conversation; a message list must end with the assistant's reply, and the
        messages before it (if any) are the prompt the reply answers.
        """
        value = self.text_or_messages(name)
        if isinstance(value, str):
            return [], value
        if value[-1]["role"] != "assistant":
            raise self.error(name, f"the last message must be the assistant's reply, got role "
                                   f"{value[-1]['role']!r}", "malformed_messages")
        return value[:-1], value[-1]["content"]

    def score(self, name: str) -> float:
        value = self.raw(name)
        if self.text_cells and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise self.error(name, f"expected a number, got {value!r}", "wrong_type") from None
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise self.error(name, f"expected a number, got {_type_name(value)}", "wrong_type")
        value = float(value)
        if not math.isfinite(value):
            raise self.error(name, f"score is {value} (expected a finite number)", "nan_score")
        return value

    def integer(self, name: str) -> int:
        value = self.raw(name)
        if self.text_cells and isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise self.error(name, f"expected an integer, got {value!r}", "wrong_type") from None
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise self.error(name, f"expected an integer, got {_type_name(value)}", "wrong_type")
        return int(value)

    def extras(self, used: Iterable[str]) -> dict:
        """Scalar columns the adapter did not use (ids, subreddit, ...), kept as metadata."""
        used_columns = {self.column(name) for name in used}
        return {key: value for key, value in self.values.items()
                if key not in used_columns and isinstance(value, (str, int, float, bool))}

    def pair(self, prompt: Prompt, chosen: str, rejected: str, metadata: dict | None = None) -> PreferencePair:
        self._check_prompt(prompt)
        if chosen.strip() == rejected.strip():
            raise self.error("rejected", "chosen and rejected responses are identical", "identical_pair")
        return PreferencePair(prompt, chosen, rejected, dict(metadata or {}), self.where)

    def prompt_record(self, prompt: Prompt, metadata: dict | None = None) -> PromptRecord:
        self._check_prompt(prompt)
        return PromptRecord(prompt, dict(metadata or {}), self.where)

    def _check_prompt(self, prompt: Prompt) -> None:
        # A chat prompt is what a chat template renders with add_generation_prompt: it ends with the user.
        if isinstance(prompt, list) and prompt[-1]["role"] != "user":
            raise self.error("prompt", f"chat prompt must end with a user message, got role "
                                       f"{prompt[-1]['role']!r}", "malformed_messages")


def _json_list_or_none(text: str) -> list | None:
    """A CSV cell that holds a JSON list of objects (chat messages), else None: text that merely
    starts with '[' ("[Verse 1] ...", "[1, 2, 3]") stays text."""
    try:
        decoded = json.loads(text)
    except ValueError:
        return None
    if isinstance(decoded, list) and decoded and all(isinstance(item, dict) for item in decoded):
        return decoded
    return None

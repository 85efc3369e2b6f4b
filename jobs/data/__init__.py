"""Shared preference data: one record type for pairs, one for prompts, adapters for the real
datasets and for local files, per-row validation, and a deterministic prompt-grouped split.

PPO draws prompts and DPO draws pairs from the same records, so the comparison is fair.

Conventions every later stage can rely on:
- ``PreferencePair.chosen`` / ``.rejected`` are always plain text (the final assistant reply).
  ``prompt`` is plain text, or a list of chat messages ``{"role", "content"}`` (roles system / user /
  assistant, last one "user") when the source is chat-formatted.
- Adapters for HH-RLHF and TL;DR drop the whitespace that separates prompt and response in the source;
  generic local files keep their text as written. Join plain-text prompt and response with
  :func:`join_prompt_response`, which inserts a single space only when neither side has one.
- Rows are numbered from 1, counting data rows: row N of a JSONL file is line N (blank lines are
  skipped but counted), of a CSV file the N-th record after the header, of a Parquet file, JSON array
  or hub dataset the N-th row. Every :class:`DataError` names the source, the row and the column.
- Score columns (:data:`SCORE_FIELDS`), where a row has them, must be finite numbers.
- Over-long rows are not this layer's business: they are handled at tokenization.

Spec strings accepted by :func:`load_preference_pairs` and :func:`load_prompts`::

    spec   := path                      a local file; format from suffix, generic columns
            | fmt ":" path              fmt in jsonl | json | parquet | csv (forces the format)
            | kind                      the kind's hub dataset, default split
            | kind "@" split            the kind's hub dataset, given split
            | kind ":" path             a local file in that dataset's schema
            | kind ":" hub_id ["@" split]   another hub dataset in that dataset's schema
            | "hf:" hub_id ["@" split]  any hub dataset, generic columns
            | "demo"                    the embedded review openings (prompts only)
    kind   := hh | tldr | ultrafeedback | imdb
    path   := an existing file, or a name ending .jsonl .jsonl.gz .json .parquet .csv
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import numbers
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

__all__ = [
    "COLUMN_FIELDS",
    "DEMO_REVIEW_OPENINGS",
    "DataError",
    "DataSpec",
    "HUB_DATASETS",
    "LoadReport",
    "PreferencePair",
    "PromptRecord",
    "SCORE_FIELDS",
    "demo_prompts",
    "hh_transcript_to_messages",
    "imdb_prompt_words",
    "join_prompt_response",
    "load_hub_dataset",
    "load_preference_pairs",
    "load_prompts",
    "parse_hh_rows",
    "parse_imdb_rows",
    "parse_preference_rows",
    "parse_prompt_rows",
    "parse_spec",
    "parse_tldr_rows",
    "parse_ultrafeedback_rows",
    "prompts_from_pairs",
    "shuffled",
    "split_hh_transcript",
    "split_records",
]

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


class DataError(ValueError):
    """A problem with the data, located: ``"<file or hub id>: row N, field 'col': <problem>"``.

    ``row`` is 1-based (see the module docstring); ``reason`` is a short key (``"empty_text"``,
    ``"nan_score"``, ...) that :class:`LoadReport` counts skipped rows by.
    """

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


# ----------------------------------------------------------------------------------------------
# One raw row, with the context an error about it needs


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


# ----------------------------------------------------------------------------------------------
# Row parsers: one raw row -> one record (or DataError)


def _hh_turns(row: _Row, name: str) -> tuple[str, str]:
    transcript = row.text(name)
    try:
        prompt, response = split_hh_transcript(transcript)
    except ValueError as err:
        raise row.error(name, str(err), "malformed_transcript") from None
    return prompt, row.checked_text(name, response, "final assistant turn")


def _hh_row(row: _Row) -> PreferencePair:
    prompt, chosen = _hh_turns(row, "chosen")
    rejected_prompt, rejected = _hh_turns(row, "rejected")
    if rejected_prompt != prompt:
        raise row.error("rejected", "chosen and rejected transcripts do not share a prompt", "prompt_mismatch")
    return row.pair(prompt, chosen, rejected)


def _tldr_row(row: _Row) -> PreferencePair:
    # TL;DR summaries start with the space after "TL;DR:"; dropped like HH's (join_prompt_response).
    prompt = row.text("prompt")
    chosen, rejected = row.text("chosen").lstrip(), row.text("rejected").lstrip()
    return row.pair(prompt, chosen, rejected, row.extras(("prompt", "chosen", "rejected")))


def _ultrafeedback_row(row: _Row) -> PreferencePair:
    conversations = {}
    for name in ("chosen", "rejected"):
        if isinstance(row.raw(name), str) and not row.text_cells:
            raise row.error(name, "expected a list of chat messages, got str", "wrong_type")
        context, reply = row.completion(name)
        if not context:
            raise row.error(name, "expected the user's message before the assistant's reply", "malformed_messages")
        conversations[name] = (context, reply)
    (prompt, chosen), (rejected_prompt, rejected) = conversations["chosen"], conversations["rejected"]
    if rejected_prompt != prompt:
        raise row.error("rejected", "chosen and rejected conversations do not share a prompt", "prompt_mismatch")
    metadata = {"score_chosen": row.score("score_chosen"), "score_rejected": row.score("score_rejected")}
    if row.has("prompt_id"):
        metadata["prompt_id"] = str(row.raw("prompt_id"))
    return row.pair(prompt, chosen, rejected, metadata)


def _generic_prompt(row: _Row, context: Messages) -> Prompt:
    """The prompt column, extended by the conversation that chosen/rejected carry before the reply
    (TRL's conversational layouts: explicit prompt column, implicit prompt inside chosen, or both)."""
    if not row.has("prompt") and context:
        return context
    prompt = row.text_or_messages("prompt")
    if not context:
        return prompt
    if isinstance(prompt, str):
        raise row.error("prompt", "plain-text prompt, but 'chosen' also carries chat messages before the reply",
                        "malformed_messages")
    return prompt + context


def _generic_pair_row(row: _Row) -> PreferencePair:
    chosen_context, chosen = row.completion("chosen")
    rejected_context, rejected = row.completion("rejected")
    if chosen_context != rejected_context:
        raise row.error("rejected", "chosen and rejected conversations do not share a prompt", "prompt_mismatch")
    prompt = _generic_prompt(row, chosen_context)
    # A score column is optional, but where a row has one it must be a finite number: a NaN score
    # (pandas' missing value, json's NaN) would otherwise travel silently into margins and reports.
    scores = {name: row.score(name) for name in SCORE_FIELDS if row.has(name)}
    metadata = {**row.extras(("prompt", "chosen", "rejected", *SCORE_FIELDS)), **scores}
    return row.pair(prompt, chosen, rejected, metadata)


def _pair_prompt(pair: PreferencePair) -> PromptRecord:
    return PromptRecord(pair.prompt, dict(pair.metadata), pair.source)


def _generic_prompt_row(row: _Row) -> PromptRecord:
    """A prompt file's row, or a pairs file's row (validated as a pair, so PPO and DPO keep the same rows)."""
    if row.has("chosen") or row.has("rejected"):
        return _pair_prompt(_generic_pair_row(row))
    return row.prompt_record(_generic_prompt(row, []), row.extras(("prompt",)))


def imdb_prompt_words(seed: int, row_number: int, min_words: int = 2, max_words: int = 8) -> int:
    """How many leading words of review ``row_number`` make its prompt: uniform in
    [min_words, max_words], seeded per row so a prompt does not depend on which other rows were kept.

    The DPO paper's IMDb protocol uses a 2-8 *token* prefix; this layer has no tokenizer, so it
    counts whitespace-separated words instead.
    """
    return random.Random(f"imdb-prompt:{seed}:{row_number}").randint(min_words, max_words)


def _imdb_row_parser(seed: int, min_words: int, max_words: int) -> Callable[[_Row], PromptRecord]:
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")

    def parse(row: _Row) -> PromptRecord:
        words = _HTML_BREAK.sub(" ", row.text("text")).split()
        if len(words) < min_words:
            raise row.error("text", f"review has {len(words)} words, fewer than min_words={min_words}", "too_short")
        count = min(imdb_prompt_words(seed, row.number, min_words, max_words), len(words))
        # The rest of the review is kept: SFT on IMDb (the paper's starting policy) continues the prefix.
        return row.prompt_record(" ".join(words[:count]), {"label": row.integer("label"), "prompt_words": count,
                                                           "continuation": " ".join(words[count:])})

    return parse


# ----------------------------------------------------------------------------------------------
# Collecting rows into records


RowItem = tuple[int, Union[Mapping, DataError]]


def _collect(items: Iterable[RowItem], parse_row: Callable[[_Row], Record], *, source: str,
             columns: Mapping[str, str] | None, text_cells: bool, skip_bad_rows: bool,
             duplicates: str, key: Callable[[Record], tuple] | None) -> tuple[list, LoadReport]:
    """Parse numbered rows; raise on the first bad row, or skip and count it (``skip_bad_rows``).

    ``duplicates``: "skip" (drop rows whose ``key`` was seen, counted as "duplicate"), "error"
    (a bad row) or "keep".
    """
    if duplicates not in ("skip", "error", "keep"):
        raise ValueError(f"duplicates must be 'skip', 'error' or 'keep', got {duplicates!r}")
    report, records, first_row = LoadReport(source), [], {}
    for number, values in items:
        report.total += 1
        try:
            if isinstance(values, DataError):
                raise values
            if not isinstance(values, Mapping):
                raise DataError(source, f"expected an object of column -> value, got {_type_name(values)}",
                                number, None, "wrong_type")
            record = parse_row(_Row(values, source, number, columns or {}, text_cells))
            if key is not None and duplicates != "keep":
                first = first_row.setdefault(key(record), number)
                if first != number:
                    if duplicates == "skip":
                        report.skip("duplicate")
                        continue
                    raise DataError(source, f"exact duplicate of row {first}", number, None, "duplicate")
        except DataError as err:
            if not skip_bad_rows:
                raise
            report.skip(err.reason, str(err))
            continue
        records.append(record)
        report.kept += 1
    return records, report


def _parse_rows(rows: Iterable[Mapping], parse_row, key, *, source, columns, skip_bad_rows, duplicates):
    return _collect(enumerate(rows, start=1), parse_row, source=source, columns=columns, text_cells=False,
                    skip_bad_rows=skip_bad_rows, duplicates=duplicates, key=key)


def parse_hh_rows(rows: Iterable[Mapping], *, source: str = HUB_DATASETS["hh"][0],
                  columns: Mapping[str, str] | None = None, skip_bad_rows: bool = False,
                  duplicates: str = "skip") -> tuple[list[PreferencePair], LoadReport]:
    """Anthropic HH-RLHF rows (``chosen`` / ``rejected`` whole transcripts) -> text pairs whose
    prompt ends with "\\n\\nAssistant:" and whose responses are the final assistant turns.

    The real dataset has a few rows with empty or identical final turns: load it with
    ``skip_bad_rows=True`` and read the report.
    """
    return _parse_rows(rows, _hh_row, _pair_key, source=source, columns=columns,
                       skip_bad_rows=skip_bad_rows, duplicates=duplicates)


def parse_tldr_rows(rows: Iterable[Mapping], *, source: str = HUB_DATASETS["tldr"][0],
                    columns: Mapping[str, str] | None = None, skip_bad_rows: bool = False,
                    duplicates: str = "skip") -> tuple[list[PreferencePair], LoadReport]:
    """TL;DR comparisons in prompt / chosen / rejected layout (trl-lib/tldr-preference) -> text pairs."""
    return _parse_rows(rows, _tldr_row, _pair_key, source=source, columns=columns,
                       skip_bad_rows=skip_bad_rows, duplicates=duplicates)


def parse_ultrafeedback_rows(rows: Iterable[Mapping], *, source: str = HUB_DATASETS["ultrafeedback"][0],
                             columns: Mapping[str, str] | None = None, skip_bad_rows: bool = False,
                             duplicates: str = "skip") -> tuple[list[PreferencePair], LoadReport]:
    """UltraFeedback binarized rows -> chat pairs: prompt = the messages before the final assistant
    message, chosen / rejected = that message's text; scores and prompt_id go to metadata."""
    return _parse_rows(rows, _ultrafeedback_row, _pair_key, source=source, columns=columns,
                       skip_bad_rows=skip_bad_rows, duplicates=duplicates)


def parse_preference_rows(rows: Iterable[Mapping], *, source: str = "rows",
                          columns: Mapping[str, str] | None = None, skip_bad_rows: bool = False,
                          duplicates: str = "skip") -> tuple[list[PreferencePair], LoadReport]:
    """Generic rows with prompt / chosen / rejected columns (renamed by ``columns``), each plain
    text or chat messages; other scalar columns become metadata."""
    return _parse_rows(rows, _generic_pair_row, _pair_key, source=source, columns=columns,
                       skip_bad_rows=skip_bad_rows, duplicates=duplicates)


def parse_prompt_rows(rows: Iterable[Mapping], *, source: str = "rows",
                      columns: Mapping[str, str] | None = None,
                      skip_bad_rows: bool = False) -> tuple[list[PromptRecord], LoadReport]:
    """Generic rows with a prompt column (or whole preference rows) -> prompts, deduplicated in order."""
    return _parse_rows(rows, _generic_prompt_row, _record_prompt_key, source=source, columns=columns,
                       skip_bad_rows=skip_bad_rows, duplicates="skip")


def parse_imdb_rows(rows: Iterable[Mapping], *, seed: int = 0, min_words: int = 2, max_words: int = 8,
                    source: str = HUB_DATASETS["imdb"][0], columns: Mapping[str, str] | None = None,
                    skip_bad_rows: bool = False) -> tuple[list[PromptRecord], LoadReport]:
    """IMDb reviews (text, label) -> prompts made of each review's first K words, K from
    :func:`imdb_prompt_words` (``<br />`` tags removed first); label kept in metadata."""
    return _parse_rows(rows, _imdb_row_parser(seed, min_words, max_words), None, source=source,
                       columns=columns, skip_bad_rows=skip_bad_rows, duplicates="keep")


def _record_prompt_key(record: Record) -> tuple:
    return _prompt_key(record.prompt)


def prompts_from_pairs(pairs: Iterable[PreferencePair]) -> list[PromptRecord]:
    """The pairs' prompts, deduplicated in first-seen order (metadata and source of the first pair)."""
    prompts: dict[tuple, PromptRecord] = {}
    for pair in pairs:
        prompts.setdefault(_prompt_key(pair.prompt), _pair_prompt(pair))
    return list(prompts.values())


# ----------------------------------------------------------------------------------------------
# Reading rows from local files and the hub


def _has_undecodable(value: Any) -> bool:
    """Whether a decoded value (text, or lists / objects of them) holds surrogate-escaped bytes."""
    if isinstance(value, str):
        return _UNDECODABLE.search(value) is not None
    if isinstance(value, Mapping):
        return any(_has_undecodable(k) or _has_undecodable(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_undecodable(v) for v in value)
    return False


def _undecodable_error(source: str, number: int, values: Any) -> DataError | None:
    """A DataError naming the first column whose key or value holds bytes that are not UTF-8."""
    if not isinstance(values, Mapping):
        return None
    for key, value in values.items():
        if _has_undecodable(key) or _has_undecodable(value):
            column = str(key).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            return DataError(source, "holds bytes that are not valid UTF-8", number, column, "undecodable")
    return None


def _decode_json_row(raw: bytes, source: str, number: int) -> Mapping | DataError:
    try:
        text, bad_bytes = raw.decode("utf-8"), None
    except UnicodeDecodeError as err:
        text, bad_bytes = raw.decode("utf-8", "surrogateescape"), err
    try:
        values = json.loads(text.removeprefix("\ufeff"))
    except ValueError as err:
        if bad_bytes is not None:
            return DataError(source, f"bytes that are not valid UTF-8 at byte {bad_bytes.start} of the line",
                             number, None, "undecodable")
        return DataError(source, f"invalid JSON: {err}", number, None, "invalid_json")
    if not isinstance(values, dict):
        return DataError(source, f"expected a JSON object, got {_type_name(values)}", number, None, "wrong_type")
    if bad_bytes is not None:
        return _undecodable_error(source, number, values) or DataError(
            source, "bytes that are not valid UTF-8", number, None, "undecodable")
    return values


def _read_jsonl(path: Path, source: str) -> Iterator[RowItem]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if raw.strip():
                yield number, _decode_json_row(raw, source, number)


def _read_json(path: Path, source: str) -> Iterator[RowItem]:
    """A JSON array of objects; a file of JSON lines with a .json suffix is read as JSONL."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("utf-8-sig", "surrogateescape")
    try:
        values = json.loads(text)
    except json.JSONDecodeError as err:
        if "Extra data" in str(err):
            yield from _read_jsonl(path, source)
            return
        raise DataError(source, f"invalid JSON: {err}", reason="invalid_json") from None
    if not isinstance(values, list):
        raise DataError(source, f"expected a JSON array of objects, got {_type_name(values)}", reason="wrong_type")
    for number, item in enumerate(values, start=1):
        yield number, _undecodable_error(source, number, item) or item


def _check_columns(source: str, available: Iterable[str], needed: Iterable[str]) -> None:
    """A missing column is the file's problem, not a row's: raised even with skip_bad_rows."""
    available = list(available)
    for column in needed:
        if column not in available:
            raise DataError(source, f"no such column; the columns are: {', '.join(map(str, available))}",
                            field=column, reason="missing_field")


def _read_csv(path: Path, source: str, needed: Iterable[str]) -> Iterator[RowItem]:
    # Whole-file strict decoding would lose the row; surrogateescape keeps the bad bytes visible per cell.
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        reader = csv.DictReader(handle)
        _check_columns(source, reader.fieldnames or [], needed)
        for number, values in enumerate(reader, start=1):
            if None in values:
                yield number, DataError(source, "more values than header columns", number, None, "wrong_type")
                continue
            yield number, _undecodable_error(source, number, values) or values


def _read_parquet(path: Path, source: str, needed: Iterable[str]) -> Iterator[RowItem]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(source, f"cannot read Parquet: {err}", reason="invalid_file") from None
    _check_columns(source, parquet.schema_arrow.names, needed)
    number = 0
    for batch in parquet.iter_batches(batch_size=1024):
        try:
            rows = batch.to_pylist()
        except UnicodeDecodeError:
            rows = _parquet_rows_one_by_one(batch, source, number)
        for values in rows:
            number += 1
            yield number, values


def _parquet_rows_one_by_one(batch, source: str, offset: int) -> list:
    """Slow path for a batch with invalid UTF-8 in a string column: locate the row and column."""
    rows = []
    for index in range(batch.num_rows):
        values = {}
        for column in batch.schema.names:
            try:
                values[column] = batch.column(column)[index].as_py()
            except UnicodeDecodeError:
                values = DataError(source, "holds bytes that are not valid UTF-8", offset + index + 1,
                                   column, "undecodable")
                break
        rows.append(values)
    return rows


def load_hub_dataset(hub_id: str, split: str, **load_kwargs):
    """A Hugging Face Hub dataset split through ``datasets.load_dataset`` (needs hub access or a
    populated HF cache; ``load_kwargs`` such as ``data_dir="harmless-base"`` pass through)."""
    import datasets

    return datasets.load_dataset(hub_id, split=split, **load_kwargs)


def _read_hub(hub_id: str, split: str, source: str, needed: Iterable[str], load_kwargs: Mapping) -> Iterator[RowItem]:
    dataset = load_hub_dataset(hub_id, split, **load_kwargs)
    if dataset.column_names is not None:  # a streaming dataset may not know its columns up front
        _check_columns(source, dataset.column_names, needed)
    yield from enumerate(dataset, start=1)


# ----------------------------------------------------------------------------------------------
# Spec strings


@dataclass(frozen=True)
class DataSpec:
    """A parsed spec string: which adapter, and a local file or a hub dataset."""

    adapter: str                 # hh | tldr | ultrafeedback | imdb | generic | demo
    path: Path | None = None     # local file
    file_format: str | None = None
    hub_id: str | None = None
    split: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.path is None and self.adapter != "demo"


def _file_format(name: str) -> str | None:
    lowered = name.lower()
    for suffix, file_format in _SUFFIX_FORMATS.items():
        if lowered.endswith(suffix):
            return file_format
    return None


def _looks_like_file(location: str) -> bool:
    return _file_format(location) is not None or os.path.isfile(location)


def _hub_location(location: str) -> tuple[str | None, str | None]:
    hub_id, _, split = location.rpartition("@") if "@" in location else (location, "", "")
    return hub_id or None, split or None


def parse_spec(spec: str | os.PathLike) -> DataSpec:
    """Parse a spec string (grammar in the module docstring)."""
    text = os.fspath(spec)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty data spec: {spec!r}")
    kind, colon, location = text.partition(":")
    if not colon:
        kind, _, split = text.partition("@")
        if kind == "demo" and not split:
            return DataSpec("demo")
        if kind in HUB_DATASETS:
            return DataSpec(kind, split=split or None)
        kind, location = "", text
    elif kind not in HUB_DATASETS and kind not in FILE_FORMATS and kind != "hf":
        kind, location = "", text  # a path that happens to contain ':'
    if not location:
        raise ValueError(f"data spec {text!r} names no file or hub id after ':'")
    if kind == "hf":
        hub_id, split = _hub_location(location)
        return DataSpec("generic", hub_id=hub_id, split=split)
    if kind in FILE_FORMATS:
        return DataSpec("generic", Path(location), kind)
    if kind in HUB_DATASETS and not _looks_like_file(location):
        hub_id, split = _hub_location(location)
        return DataSpec(kind, hub_id=hub_id, split=split)
    file_format = _file_format(location)
    if file_format is None:
        raise ValueError(f"cannot tell the format of {location!r} from its suffix; name it, e.g. "
                         f"'jsonl:{location}' ({', '.join(FILE_FORMATS)})")
    return DataSpec(kind or "generic", Path(location), file_format)


def _open_rows(data: DataSpec, needed_fields: Iterable[str], columns: Mapping[str, str] | None,
               split: str | None, hub_kwargs: Mapping | None) -> tuple[Iterator[RowItem], str, bool]:
    """(numbered rows, source name for messages, whether cells are text) for a parsed spec."""
    needed = [(columns or {}).get(name, name) for name in needed_fields]
    if data.is_hub:
        default_id, default_split = HUB_DATASETS.get(data.adapter, (None, "train"))
        hub_id, split = data.hub_id or default_id, split or data.split or default_split
        source = f"{hub_id}[{split}]"
        return _read_hub(hub_id, split, source, needed, hub_kwargs or {}), source, False
    if split is not None:
        raise ValueError(f"split={split!r} applies to hub datasets; {data.path} is a local file")
    if not data.path.is_file():
        raise FileNotFoundError(f"data file not found: {data.path}")
    source = str(data.path)
    if data.file_format == "csv":
        return _read_csv(data.path, source, needed), source, True
    if data.file_format == "parquet":
        return _read_parquet(data.path, source, needed), source, False
    if data.file_format == "json":
        return _read_json(data.path, source), source, False
    return _read_jsonl(data.path, source), source, False


_PAIR_PARSERS = {"hh": _hh_row, "tldr": _tldr_row, "ultrafeedback": _ultrafeedback_row, "generic": _generic_pair_row}
# Columns that must exist in a file's header (CSV, Parquet) or a hub dataset, checked before any row.
_PAIR_COLUMNS = {"hh": ("chosen", "rejected"), "tldr": ("prompt", "chosen", "rejected"),
                 "ultrafeedback": ("chosen", "rejected", "score_chosen", "score_rejected"),
                 "generic": ("chosen", "rejected")}


def _require_rows(records: list, report: LoadReport) -> None:
    if not records:
        raise DataError(report.source, f"no usable rows ({report.summary()}); first problems: "
                                       f"{report.messages or 'none'}", reason="no_rows")


def load_preference_pairs(spec: str | os.PathLike, columns: Mapping[str, str] | None = None, *,
                          split: str | None = None, skip_bad_rows: bool = False, duplicates: str = "skip",
                          hub_kwargs: Mapping | None = None) -> tuple[list[PreferencePair], LoadReport]:
    """Load preference pairs from a spec string (see module docstring), e.g. "hh",
    "ultrafeedback@test_prefs", "hh:data/hh.jsonl", "pairs.csv" with
    ``columns={"prompt": "question", "chosen": "good", "rejected": "bad"}``.

    ``columns`` maps record fields to the source's column names. ``split`` (hub only) overrides the
    spec's. ``skip_bad_rows`` skips and counts bad rows instead of raising; ``duplicates`` is
    "skip" (default, counted), "error" or "keep". Raises DataError when no row is usable.
    """
    data = parse_spec(spec)
    if data.adapter not in _PAIR_PARSERS:
        raise ValueError(f"{spec!r} is a prompt source, not preference pairs: use load_prompts")
    items, source, text_cells = _open_rows(data, _PAIR_COLUMNS[data.adapter], columns, split, hub_kwargs)
    pairs, report = _collect(items, _PAIR_PARSERS[data.adapter], source=source, columns=columns,
                             text_cells=text_cells, skip_bad_rows=skip_bad_rows, duplicates=duplicates,
                             key=_pair_key)
    _require_rows(pairs, report)
    return pairs, report


def load_prompts(spec: str | os.PathLike, columns: Mapping[str, str] | None = None, *,
                 split: str | None = None, skip_bad_rows: bool = False, seed: int = 0, min_words: int = 2,
                 max_words: int = 8, hub_kwargs: Mapping | None = None) -> tuple[list[PromptRecord], LoadReport]:
    """Load prompts from a spec string: "imdb" / "imdb:reviews.csv" (review openings, ``seed``,
    ``min_words``, ``max_words``), "demo" (embedded openings), or any preference source, whose
    rows are validated as pairs and whose prompts are deduplicated in order, so PPO's prompts are
    exactly the prompts of DPO's pairs."""
    data = parse_spec(spec)
    if data.adapter == "demo":
        prompts = demo_prompts()
        return prompts, LoadReport("demo", total=len(prompts), kept=len(prompts))
    if data.adapter == "imdb":
        parse_row, needed, key = _imdb_row_parser(seed, min_words, max_words), ("text", "label"), None
    elif data.adapter == "generic":
        parse_row, needed, key = _generic_prompt_row, (), _record_prompt_key
    else:
        pair_parser = _PAIR_PARSERS[data.adapter]
        parse_row, needed, key = (lambda row: _pair_prompt(pair_parser(row))), _PAIR_COLUMNS[data.adapter], \
            _record_prompt_key
    items, source, text_cells = _open_rows(data, needed, columns, split, hub_kwargs)
    prompts, report = _collect(items, parse_row, source=source, columns=columns, text_cells=text_cells,
                               skip_bad_rows=skip_bad_rows, duplicates="keep" if key is None else "skip", key=key)
    _require_rows(prompts, report)
    return prompts, report


# ----------------------------------------------------------------------------------------------
# Deterministic split and shuffle


def _eval_group_count(groups: int, eval_fraction: float | None, eval_size: int | None) -> int:
    if (eval_fraction is None) == (eval_size is None):
        raise ValueError("give exactly one of eval_fraction and eval_size")
    if eval_fraction is not None:
        if not 0 <= eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
        count = round(groups * eval_fraction)
        if eval_fraction > 0 and groups >= 2:
            count = max(count, 1)
        return min(count, max(groups - 1, 0))
    if eval_size < 0 or (eval_size > 0 and eval_size >= groups):
        raise ValueError(f"eval_size={eval_size} must leave training prompts: there are {groups} distinct prompts")
    return eval_size


def split_records(records: Iterable[Record], eval_fraction: float | None = None, *, eval_size: int | None = None,
                  seed: int = 0) -> tuple[list, list]:
    """Split records into (train, eval), both shuffled, from ``seed`` alone.

    All records sharing a prompt land on the same side, so no eval prompt is trained on (TL;DR has
    many comparisons per post). Sizes count distinct prompts: splitting pairs and the prompts drawn
    from them (:func:`prompts_from_pairs`, :func:`load_prompts`) with the same seed puts each
    prompt on the same side, which is how PPO and DPO share one split. Independent of the Python
    hash seed: groups are kept in first-seen order and shuffled with ``random.Random(seed)``.
    """
    records = list(records)
    groups: dict[tuple, list[int]] = {}
    for index, record in enumerate(records):
        groups.setdefault(_prompt_key(record.prompt), []).append(index)
    members = list(groups.values())
    eval_count = _eval_group_count(len(members), eval_fraction, eval_size)
    rng = random.Random(seed)
    order = list(range(len(members)))
    rng.shuffle(order)
    eval_indices = [i for group in order[:eval_count] for i in members[group]]
    train_indices = [i for group in order[eval_count:] for i in members[group]]
    rng.shuffle(train_indices)
    rng.shuffle(eval_indices)
    return [records[i] for i in train_indices], [records[i] for i in eval_indices]


def shuffled(records: Iterable[Record], seed: int) -> list:
    """A seeded shuffle (a new list), e.g. one per epoch with ``seed + epoch``."""
    records = list(records)
    random.Random(seed).shuffle(records)
    return records


# ----------------------------------------------------------------------------------------------
# Embedded prompts for the controlled-sentiment demo

REVIEW_OPENINGS_FILE = Path(__file__).with_name("review_openings.txt")


def _read_openings(path: Path = REVIEW_OPENINGS_FILE) -> tuple[str, ...]:
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


# The embedded openings (jobs/data/review_openings.txt, shipped with the package).
DEMO_REVIEW_OPENINGS: tuple[str, ...] = _read_openings()


def demo_prompts() -> list[PromptRecord]:
    """The embedded review openings as prompts (no dataset needed)."""
    return [PromptRecord(text, {}, f"demo: row {number}")
            for number, text in enumerate(DEMO_REVIEW_OPENINGS, start=1)]

"""Dataset adapters: a validated row of HH-RLHF, TL;DR, UltraFeedback, IMDb or a generic file into a record."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterable, Mapping
from typing import Union

from jobs.data.records import (
    DataError,
    HUB_DATASETS,
    LoadReport,
    Messages,
    PreferencePair,
    Prompt,
    PromptRecord,
    Record,
    SCORE_FIELDS,
    _HTML_BREAK,
    _as_list,
    _pair_key,
    _prompt_key,
    _type_name,
    split_hh_transcript,
)
from jobs.data.rows import _Row


def _accepts(layouts: str):
    """Decorate an adapter so its missing-field errors name the row layouts it reads: a user whose
    file has another layout learns what to convert to, not only which key is absent."""
    def wrap(parse):
        @functools.wraps(parse)
        def parse_row(row: _Row):
            try:
                return parse(row)
            except DataError as err:
                if err.reason != "missing_field":
                    raise
                raise DataError(err.source, f"{err.problem}; {layouts}", err.row, err.field, err.reason) from None
        return parse_row
    return wrap


def _hh_turns(row: _Row, name: str) -> tuple[str, str]:
    transcript = row.text(name)
    try:
        prompt, response = split_hh_transcript(transcript)
    except ValueError as err:
        raise row.error(name, str(err), "malformed_transcript") from None
    return prompt, row.checked_text(name, response, "final assistant turn")


@_accepts("HH-RLHF rows hold chosen / rejected transcripts of Human: / Assistant: turns (Anthropic/hh-rlhf)")
def _hh_row(row: _Row) -> PreferencePair:
    prompt, chosen = _hh_turns(row, "chosen")
    rejected_prompt, rejected = _hh_turns(row, "rejected")
    if rejected_prompt != prompt:
        raise row.error("rejected", "chosen and rejected transcripts do not share a prompt", "prompt_mismatch")
    return row.pair(prompt, chosen, rejected)


TLDR_LAYOUTS = ("TL;DR rows are either prompt / chosen / rejected (trl-lib/tldr-preference) or OpenAI's "
                "comparisons (info.post, summaries[i].text, choice)")


def _nested_text(row: _Row, value, name: str) -> str:
    if value is None:
        raise row.error(name, "missing (no such column or key)", "missing_field")
    if not isinstance(value, str):
        raise row.error(name, f"expected text, got {_type_name(value)}", "wrong_type")
    return row.checked_text(name, value)


def _openai_tldr_row(row: _Row) -> PreferencePair:
    """OpenAI's summarize-from-feedback comparisons: the prompt is rendered as trl-lib/tldr-preference
    renders it (SUBREDDIT / TITLE / POST / "TL;DR:"), so both layouts give the same pairs."""
    info = row.raw("info")
    if not isinstance(info, Mapping):
        raise row.error("info", f"expected an object with 'post', got {_type_name(info)}", "wrong_type")
    parts = []
    if info.get("subreddit") is not None:
        parts.append(f"SUBREDDIT: r/{_nested_text(row, info['subreddit'], 'info.subreddit')}")
    if info.get("title") is not None:
        parts.append(f"TITLE: {_nested_text(row, info['title'], 'info.title')}")
    parts.append(f"POST: {_nested_text(row, info.get('post'), 'info.post')}")
    summaries = _as_list(row.raw("summaries"))
    if summaries is None or len(summaries) != 2:
        raise row.error("summaries", "expected a list of two summaries", "wrong_type")
    choice = row.integer("choice")
    if choice not in (0, 1):
        raise row.error("choice", f"expected 0 or 1 (the index of the preferred summary), got {choice}", "wrong_type")
    texts = []
    for index, summary in enumerate(summaries):
        name = f"summaries[{index}].text"
        if not isinstance(summary, Mapping):
            raise row.error(name, f"expected an object with 'text', got {_type_name(summary)}", "wrong_type")
        texts.append(_nested_text(row, summary.get("text"), name).lstrip())
    metadata = {key: info[key] for key in ("id", "subreddit") if isinstance(info.get(key), str)}
    return row.pair("\n\n".join(parts) + "\n\nTL;DR:", texts[choice], texts[1 - choice], metadata)


@_accepts(TLDR_LAYOUTS)
def _tldr_row(row: _Row) -> PreferencePair:
    if not row.has("prompt") and (row.has("summaries") or row.has("info")):
        return _openai_tldr_row(row)
    # TL;DR summaries start with the space after "TL;DR:"; dropped like HH's (join_prompt_response).
    prompt = row.text("prompt")
    chosen, rejected = row.text("chosen").lstrip(), row.text("rejected").lstrip()
    return row.pair(prompt, chosen, rejected, row.extras(("prompt", "chosen", "rejected")))


@_accepts("UltraFeedback rows hold chosen / rejected chat messages and score_chosen / score_rejected "
          "(HuggingFaceH4/ultrafeedback_binarized)")
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

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

from jobs.data.adapters import (
    imdb_prompt_words,
    parse_hh_rows,
    parse_imdb_rows,
    parse_preference_rows,
    parse_prompt_rows,
    parse_tldr_rows,
    parse_ultrafeedback_rows,
    prompts_from_pairs,
)
from jobs.data.demo import DEMO_REVIEW_OPENINGS, demo_prompts
from jobs.data.loading import DataSpec, load_preference_pairs, load_prompts, parse_spec
from jobs.data.readers import load_hub_dataset
from jobs.data.records import (
    COLUMN_FIELDS,
    DataError,
    HUB_DATASETS,
    LoadReport,
    PreferencePair,
    PromptRecord,
    SCORE_FIELDS,
    hh_transcript_to_messages,
    join_prompt_response,
    split_hh_transcript,
)
from jobs.data.split import shuffled, split_records

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

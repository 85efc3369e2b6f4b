"""Spec strings (``hh``, ``jsonl:path``, ``tldr:hub_id@split`` ...) to records: parse, read, adapt, report."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from jobs.data.adapters import (
    RowItem,
    _collect,
    _generic_pair_row,
    _generic_prompt_row,
    _hh_row,
    _imdb_row_parser,
    _pair_prompt,
    _record_prompt_key,
    _tldr_row,
    _ultrafeedback_row,
)
from jobs.data.demo import demo_prompts
from jobs.data.readers import _read_csv, _read_hub, _read_json, _read_jsonl, _read_parquet
from jobs.data.records import (
    DataError,
    FILE_FORMATS,
    HUB_DATASETS,
    LoadReport,
    PreferencePair,
    PromptRecord,
    _SUFFIX_FORMATS,
    _pair_key,
)


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
        # A word before ':' (not a drive letter, not a folder) on a path that does not exist is a
        # misspelt or unsupported prefix ('yaml:x.jsonl'), not a file named 'yaml:x.jsonl'.
        if len(kind) > 1 and kind.isidentifier() and not os.path.exists(text):
            raise ValueError(f"unknown data format prefix {kind + ':'!r} in {text!r}; the prefixes are: "
                             f"{', '.join(p + ':' for p in (*HUB_DATASETS, *FILE_FORMATS, 'hf'))}")
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
    rename = (columns or {}).get
    needed = [rename(name, name) if isinstance(name, str) else tuple(rename(n, n) for n in name)
              for name in needed_fields]
    if data.is_hub:
        default_id, default_split = HUB_DATASETS.get(data.adapter, (None, "train"))
        hub_id, split = data.hub_id or default_id, split or data.split or default_split
        source = f"{hub_id}[{split}]"
        return _read_hub(hub_id, split, source, needed, hub_kwargs or {}), source, False
    if split is not None:
        raise ValueError(f"split={split!r} applies to hub datasets; {data.path} is a local file")
    if data.path.is_dir():
        raise IsADirectoryError(f"{data.path} is a folder, not a data file (name a .jsonl, .json, .parquet or .csv file)")
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
# Columns that must exist in a file's header (CSV, Parquet) or a hub dataset, checked before any row
# (tuples: alternative layouts, one of which must be complete).
_PAIR_COLUMNS = {"hh": ("chosen", "rejected"), "tldr": (("prompt", "chosen", "rejected"), ("info", "summaries", "choice")),
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

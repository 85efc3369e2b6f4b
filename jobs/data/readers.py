"""Readers: JSONL, JSON, CSV, Parquet and hub datasets as numbered rows (or the row's error)."""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from jobs.data.adapters import RowItem
from jobs.data.records import DataError, _UNDECODABLE, _type_name


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
    """A missing column is the file's problem, not a row's: raised even with skip_bad_rows.

    ``needed`` holds column names, or tuples of them for a source read in several layouts (TL;DR):
    then the header must hold one whole layout, and the error names them all."""
    available = list(available)
    needed = list(needed)
    layouts = [tuple(layout) for layout in needed] if needed and not isinstance(needed[0], str) else [needed]
    if any(all(column in available for column in layout) for layout in layouts):
        return
    missing = next(column for column in layouts[0] if column not in available)
    problem = f"no such column; the columns are: {', '.join(map(str, available))}"
    if len(layouts) > 1:
        problem += "; the layouts read are: " + " or ".join(", ".join(layout) for layout in layouts)
    raise DataError(source, problem, field=missing, reason="missing_field")


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

    try:
        return datasets.load_dataset(hub_id, split=split, **load_kwargs)
    except ConnectionError as err:  # offline (HF_HUB_OFFLINE) or no network: datasets says so as ConnectionError
        raise DataError(hub_id, f"cannot reach the Hugging Face Hub ({err}); offline, give a local file with its "
                                f"format prefix instead, e.g. --data jsonl:pairs.jsonl (or hh:, tldr:, "
                                f"ultrafeedback:, imdb: + a file in that dataset's layout)",
                        reason="hub_unreachable") from err


def _read_hub(hub_id: str, split: str, source: str, needed: Iterable[str], load_kwargs: Mapping) -> Iterator[RowItem]:
    dataset = load_hub_dataset(hub_id, split, **load_kwargs)
    if dataset.column_names is not None:  # a streaming dataset may not know its columns up front
        _check_columns(source, dataset.column_names, needed)
    yield from enumerate(dataset, start=1)

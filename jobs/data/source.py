"""The ``data`` section every driver shares, and the splits it yields (same seed, same split for PPO and DPO)."""

from __future__ import annotations

from dataclasses import dataclass, field

from jobs.run.config import ConfigError
from jobs.data import (
    COLUMN_FIELDS,
    PreferencePair,
    PromptRecord,
    load_preference_pairs,
    load_prompts,
    parse_spec,
    split_records,
)


@dataclass
class DataConfig:
    train: str = ""                 # a spec understood by jobs.data (e.g. hh, jsonl:pairs.jsonl, imdb:reviews.csv)
    eval: str | None = None         # a separate held-out spec; default: split off the training data
    eval_fraction: float = 0.1      # of distinct prompts, when eval is not given
    columns: dict[str, str] = field(default_factory=dict)  # e.g. {prompt: question, chosen: good, rejected: bad}
    skip_bad_rows: bool = False     # count and skip malformed rows instead of stopping at the first
    max_pairs: int | None = None    # cap on training records (after the split)

    def validate(self) -> None:
        """Checks what needs no reading: the specs' syntax, the ranges, the column mapping.

        Whether a local file exists is checked when it is read, which every driver does before it
        starts an actor (a pipeline may validate a stage's config before an earlier stage writes the file).
        """
        if not self.train:
            raise ConfigError("data.train is required (e.g. --data jsonl:pairs.jsonl)")
        for key in ("train", "eval"):
            spec = getattr(self, key)
            if spec is not None:
                try:
                    parse_spec(spec)
                except ValueError as err:
                    raise ConfigError(f"data.{key}: {err}") from None
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_pairs is not None and self.max_pairs < 1:
            raise ConfigError(f"data.max_pairs must be >= 1 or null, got {self.max_pairs}")
        for name, column in self.columns.items():
            if name not in COLUMN_FIELDS:
                raise ConfigError(f"data.columns: unknown field {name!r} (fields: {', '.join(COLUMN_FIELDS)})")
            if not isinstance(column, str) or not column:
                raise ConfigError(f"data.columns.{name}: expected a column name, got {column!r}")


def _load(load, spec: str, key: str):
    """``load(spec)``, with a missing local file reported against the config key that named it."""
    try:
        return load(spec)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
        raise ConfigError(f"{key}: {err}") from err


def _split(records, config: DataConfig, seed: int, load):
    if config.eval:
        evals, eval_report = _load(load, config.eval, "data.eval")
        train = records
        reports = {"eval": eval_report.summary()}
    elif config.eval_fraction > 0:
        train, evals = split_records(records, eval_fraction=config.eval_fraction, seed=seed)
        reports = {}
    else:
        train, evals, reports = list(records), [], {}
    if config.max_pairs:
        train = train[: config.max_pairs]
    return train, evals, reports


def load_pair_splits(config: DataConfig, seed: int) -> tuple[list[PreferencePair], list[PreferencePair], dict]:
    def load(spec):
        return load_preference_pairs(spec, config.columns or None, skip_bad_rows=config.skip_bad_rows)

    records, report = _load(load, config.train, "data.train")
    train, evals, reports = _split(records, config, seed, load)
    return train, evals, {"train": report.summary(), **reports}


def load_prompt_splits(config: DataConfig, seed: int) -> tuple[list[PromptRecord], list[PromptRecord], dict]:
    """Prompts for PPO / generation from a prompt source or from a preference source's prompts.

    jobs.data splits by prompt, so a preference source gives PPO exactly DPO's split.
    """

    def load(spec):
        return load_prompts(spec, config.columns or None, skip_bad_rows=config.skip_bad_rows, seed=seed)

    records, report = _load(load, config.train, "data.train")
    train, evals, reports = _split(records, config, seed, load)
    return train, evals, {"train": report.summary(), **reports}

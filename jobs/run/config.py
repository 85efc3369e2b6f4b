"""Typed run configs: dataclasses filled from a YAML preset, then ``key.sub=value`` overrides.

Unknown keys and wrong types fail before any actor starts, naming the key. Every run writes its
resolved config next to its outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from jobs.run.cli import DEBUG_ENV, DEBUG_FLAG, UserError, guarded
from jobs.run.run_folder import before_first_write, check_start, overwriting

PRESETS = Path(__file__).parent.parent / "presets"
T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A bad key or value: the CLI prints ``config error: <message>`` (one line) and exits 2."""

    label = "config error"


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be {value!r}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(hint, value, key)
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as text
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected text, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _build(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key '{where}{unknown[0]}' (valid: {', '.join(sorted(fields))})")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name) for name, value in data.items()}
    return cls(**kwargs)


def _set_path(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def load_preset(preset: str | None) -> dict:
    if not preset:
        return {}
    path = Path(preset)
    if not path.suffix:
        path = PRESETS / f"{preset}.yaml"
    if not path.exists():
        available = sorted(p.stem for p in PRESETS.glob("*.yaml"))
        raise ConfigError(f"preset '{preset}' not found (available: {', '.join(available)}, or a YAML path)")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a preset must be a YAML mapping")
    return data


def build_config(cls: type[T], preset: str | None = None, overrides: list[str] | None = None) -> T:
    """Preset (a name under jobs/presets or a YAML path), then ``key.sub=value`` overrides (YAML values)."""
    data = load_preset(preset)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        _set_path(data, key.strip(), yaml.safe_load(raw))
    config = _build(cls, data)
    validate = getattr(config, "validate", None)
    if validate:
        validate()
    return config


def config_dict(config) -> dict:
    """A config dataclass (or a plain mapping, e.g. a stage key) as plain data."""
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def config_hash(config, length: int = 12) -> str:
    text = json.dumps(config_dict(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def plain_config(config) -> dict:
    """The config as ``config.yaml`` holds it (JSON types: tuples become lists, other objects text)."""
    return json.loads(json.dumps(config_dict(config), default=str))


def save_config(config, folder: str | Path) -> Path:
    """Write ``folder/config.yaml``; drivers call it once the config and data are checked, as the run's
    first write (under ``--overwrite`` the old run in ``folder`` is moved aside just before)."""
    folder = Path(folder)
    before_first_write(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(plain_config(config), sort_keys=False))
    return path


def check_model(key: str, value: str | None) -> None:
    """Fail at config time, not after actors start, when a local model folder is missing.

    Built-in names are created on demand and hub ids can only be checked by loading, so both pass.
    """
    from actors.models import BUILTIN_MODELS, resolve_model_path

    if value is None or value in BUILTIN_MODELS:
        return
    try:
        resolve_model_path(value)
    except FileNotFoundError as exc:
        raise ConfigError(f"{key}: {exc}") from exc


SCORER_KINDS = ("vader", "hf-classifier", "hf-reward", "token-frequency")  # actors.scorers.build_scorer's


def check_scorer(key: str, spec: str | None) -> None:
    """Fail at config time on a scorer spec ``actors.scorers.build_scorer`` would reject inside an
    actor: an unknown kind, a missing model, a local model folder that does not exist."""
    if spec is None:
        return
    kind, _, arg = spec.partition(":")
    if kind not in SCORER_KINDS:
        raise ConfigError(f"{key}: unknown scorer {spec!r} (vader, hf-classifier:<id>[@<label>], "
                          f"hf-reward:<id or folder>, token-frequency:<id>[-<id>])")
    if kind in ("hf-classifier", "hf-reward"):
        model = arg.partition("@")[0] if kind == "hf-classifier" else arg
        if not model:
            raise ConfigError(f"{key}: scorer {kind!r} needs a model: {kind}:<model id or folder>")
        if "/" in model or model.startswith((".", "~")):  # bare legacy hub ids ("gpt2") load as they are
            check_model(key, model)


def check_reward_source(key: str, source) -> None:
    """A reward (PPO's ``reward``, Best-of-N's selector): ``kind`` gold with a scorer spec, or learned with a
    reward-model folder; every field checked here, once, for every job that takes one."""
    if source.kind not in ("gold", "learned"):
        raise ConfigError(f"{key}.kind must be gold or learned, got {source.kind!r}")
    if source.kind == "gold" and not source.scorer:
        raise ConfigError(f"{key}.scorer is required when {key}.kind is gold")
    if source.kind == "learned" and not source.model:
        raise ConfigError(f"{key}.model is required when {key}.kind is learned")
    check_model(f"{key}.model", source.model)
    if source.kind == "gold":
        check_scorer(f"{key}.scorer", source.scorer)


def run_cli(cls: type[T], train: typing.Callable[[T], Any], prog: str, doc: str | None, argv=None,
            override_help: str = "key.sub=value overrides", same_config_continues: bool = False) -> int:
    """The command line every driver shares: ``--preset``, ``--data``, ``--skip-bad-rows``, ``--overwrite``,
    overrides, and ``--resume`` / ``--resume-from PATH`` for drivers whose config has a ``checkpoint`` section.

    A bad config exits with a message naming the key before any actor starts; every user error
    (config, data, paths) is one stderr line and exit status 2 (:func:`jobs.run.cli.guarded`). A run
    folder that already holds a run is refused unless resumed or overwritten (:mod:`jobs.run.run_folder`;
    ``same_config_continues``: a rerun of the same config continues it, as ``jobs.compare``'s stage cache does).
    """
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").strip().splitlines()[0] if doc else None)
    parser.add_argument("--preset", default=None, help="a name under jobs/presets or a YAML path")
    parser.add_argument("--data", default=None, help="training data spec (same as data.train=...)")
    parser.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed rows instead of stopping")
    if any(f.name == "checkpoint" for f in dataclasses.fields(cls)):
        parser.add_argument("--resume", action="store_true",
                            help="continue from the run's newest checkpoint (a fresh start if it has none)")
        parser.add_argument("--resume-from", default=None, metavar="PATH", help="continue from this checkpoint folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="move a run already in the run folder aside (to <folder>.old-<time>) and start afresh")
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help=f"show the traceback of a config or data error (also {DEBUG_ENV}=1)")
    parser.add_argument("overrides", nargs="*", help=override_help)
    # Intermixed: overrides may come before, between or after the options (`--data X seed=1` and
    # `seed=1 --data X` mean the same); plain parse_args stops collecting positionals at the first option.
    args = parser.parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.train={args.data}")
    if args.skip_bad_rows:
        overrides.append("data.skip_bad_rows=true")
    if getattr(args, "resume_from", None):
        overrides.append(f"checkpoint.resume={args.resume_from}")
    elif getattr(args, "resume", False):
        overrides.append("checkpoint.resume=latest")

    def work():
        try:
            config = build_config(cls, args.preset, overrides)
        except ValueError as exc:  # a coercion the config layer did not wrap is still the config's fault
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(str(exc)) from exc
        folder = Path(config.output_dir) / config.run_name
        checkpoint = getattr(config, "checkpoint", None)
        check_start(folder, plain_config(config), resume=getattr(checkpoint, "resume", None),
                    resumable=checkpoint is not None, overwrite=args.overwrite,
                    same_config_continues=same_config_continues)
        with overwriting(folder) if args.overwrite else contextlib.nullcontext():
            train(config)

    return guarded(work, argv)

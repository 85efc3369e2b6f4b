"""The README's "Bad input" table, one test per row: each malformed input gets an error that names the
file, the row and the field (or the config key), or, with ``skip_bad_rows`` / ``--skip-bad-rows``, a
skip counted in the load report while every good row survives. No Ray, no training: config errors
are raised by ``build_config`` and data errors before a driver calls ``init_ray``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.drivers import best_of_n, dpo, online_dpo, policy_gradient, ppo, reward, sft
from jobs.drivers.online_dpo import OnlineDPOConfig
from jobs.drivers.policy_gradient import PolicyGradientConfig
from jobs.run import prompt_run
from jobs.run.batching import OverlongError, TokenizeConfig, encode_pairs
from jobs.drivers.best_of_n import BestOfNConfig
from jobs.run.cli import DEBUG_ENV
from jobs.run.config import ConfigError, build_config, run_cli
from jobs.data import DataError, load_preference_pairs
from jobs.data.source import DataConfig, load_pair_splits
from jobs.drivers.dpo import DPOConfig
from jobs.drivers.ppo import PPOConfig
from jobs.drivers.reward import RewardTrainConfig
from jobs.drivers.sft import SFTConfig

FIXTURES = Path(__file__).parent / "fixtures"
GOOD = [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}."} for i in range(3)]


def jsonl_line(row: dict) -> bytes:
    return json.dumps(row).encode()


def write_with_bad_row(path: Path, bad_line: bytes) -> Path:
    """Rows 1-2 and 4 good, row 3 ``bad_line``: the bad row is in the middle, so skipping it must keep row 4."""
    lines = [jsonl_line(GOOD[0]), jsonl_line(GOOD[1]), bad_line, jsonl_line(GOOD[2])]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def triples(pairs) -> list[tuple]:
    return [(p.prompt, p.chosen, p.rejected) for p in pairs]


GOOD_TRIPLES = [(r["prompt"], r["chosen"], r["rejected"]) for r in GOOD]

# id -> (row 3 of pairs.jsonl, where the error points, the problem it states, the reason a skip is counted under)
BAD_ROWS = {
    "missing_key": (jsonl_line({"prompt": "Q?", "chosen": "A."}),
                       "row 3, field 'rejected'", "missing (no such column or key)", "missing_field"),
    "null_value": (jsonl_line({"prompt": "Q?", "chosen": None, "rejected": "B."}),
                   "row 3, field 'chosen'", "missing value (null)", "missing_field"),
    "wrong_type_number": (jsonl_line({"prompt": "Q?", "chosen": 42, "rejected": "B."}),
                          "row 3, field 'chosen'", "expected text or a list of chat messages, got int", "wrong_type"),
    "wrong_type_object": (jsonl_line({"prompt": "Q?", "chosen": "A.", "rejected": {"text": "B."}}),
                          "row 3, field 'rejected'", "expected text or a list of chat messages, got dict",
                          "wrong_type"),
    "wrong_type_list_of_text": (jsonl_line({"prompt": ["Q?"], "chosen": "A.", "rejected": "B."}),
                                "row 3, field 'prompt'", "message 0: expected an object with 'role' and 'content'",
                                "malformed_messages"),
    "empty_prompt": (jsonl_line({"prompt": "", "chosen": "A.", "rejected": "B."}),
                     "row 3, field 'prompt'", "empty text", "empty_text"),
    "empty_response": (jsonl_line({"prompt": "Q?", "chosen": " \n ", "rejected": "B."}),
                       "row 3, field 'chosen'", "empty text", "empty_text"),
    "chosen_equals_rejected": (jsonl_line({"prompt": "Q?", "chosen": "Same.", "rejected": "Same. "}),
                               "row 3, field 'rejected'", "chosen and rejected responses are identical",
                               "identical_pair"),
    "undecodable_bytes": (b'{"prompt": "Caf\xe9?", "chosen": "A.", "rejected": "B."}',
                          "row 3, field 'prompt'", "holds bytes that are not valid UTF-8", "undecodable"),
    "malformed_json": (b'{"prompt": "Q?", "chosen": "A.",', "row 3", "invalid JSON", "invalid_json"),
    "not_an_object": (b'["Q?", "A.", "B."]', "row 3", "expected a JSON object, got list", "wrong_type"),
    "nan_score": (b'{"prompt": "Q?", "chosen": "A.", "rejected": "B.", "score_chosen": NaN, "score_rejected": 1.0}',
                  "row 3, field 'score_chosen'", "score is nan (expected a finite number)", "nan_score"),
    "infinite_score": (b'{"prompt": "Q?", "chosen": "A.", "rejected": "B.", "chosen_score": 2.0, '
                       b'"rejected_score": -Infinity}',
                       "row 3, field 'rejected_score'", "score is -inf (expected a finite number)", "nan_score"),
    "score_not_a_number": (jsonl_line({"prompt": "Q?", "chosen": "A.", "rejected": "B.", "score_chosen": "high"}),
                           "row 3, field 'score_chosen'", "expected a number, got str", "wrong_type"),
}


# ----------------------------------------------------------------------------------------------
# Row problems: an error naming file, row and field; or, skipping, a counted skip that keeps the rest


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_error_names_file_row_and_field(tmp_path, case):
    line, where, problem, reason = BAD_ROWS[case]
    path = write_with_bad_row(tmp_path / "pairs.jsonl", line)
    with pytest.raises(DataError) as caught:
        load_preference_pairs(f"jsonl:{path}")
    assert f"pairs.jsonl: {where}: {problem}" in str(caught.value)
    assert caught.value.row == 3 and caught.value.reason == reason


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_is_skipped_and_counted_and_the_good_rows_survive(tmp_path, case):
    line, where, problem, reason = BAD_ROWS[case]
    path = write_with_bad_row(tmp_path / "pairs.jsonl", line)
    pairs, report = load_preference_pairs(f"jsonl:{path}", skip_bad_rows=True)
    assert triples(pairs) == GOOD_TRIPLES
    assert [p.source for p in pairs] == [f"{path}: row {n}" for n in (1, 2, 4)]
    assert report.skipped == {reason: 1} and (report.total, report.kept) == (4, 3)
    assert len(report.messages) == 1 and report.messages[0].startswith(f"{path}: {where}: {problem}")
    assert report.summary().endswith(f"4 rows, 3 kept, 1 skipped ({reason}: 1)")


def test_missing_column_in_a_csv_header_is_a_file_error_even_when_skipping(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen\nQ1?,A1\n")
    for skip in (False, True):
        with pytest.raises(DataError, match=r"pairs.csv: field 'rejected': no such column; the columns are: "
                                            r"prompt, chosen"):
            load_preference_pairs(path, skip_bad_rows=skip)


def test_undecodable_bytes_in_csv(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"prompt,chosen,rejected\nQ1?,A1,B1\nQ2?,Caf\xe9,B2\nQ3?,A3,B3\n")
    with pytest.raises(DataError, match=r"latin1.csv: row 2, field 'chosen': holds bytes that are not valid UTF-8"):
        load_preference_pairs(path)
    pairs, report = load_preference_pairs(path, skip_bad_rows=True)
    assert [p.prompt for p in pairs] == ["Q1?", "Q3?"] and report.skipped == {"undecodable": 1}


def test_nan_score_in_a_scored_csv(tmp_path):
    path = tmp_path / "scored.csv"
    path.write_text("q,good,bad,rating\nQ1?,A1,B1,0.9\nQ2?,A2,B2,nan\nQ3?,A3,B3,0.7\n")
    columns = {"prompt": "q", "chosen": "good", "rejected": "bad", "score_chosen": "rating"}
    with pytest.raises(DataError, match=r"scored.csv: row 2, field 'rating': score is nan \(expected a finite "
                                        r"number\) \(column used as 'score_chosen'\)"):
        load_preference_pairs(path, columns)
    pairs, report = load_preference_pairs(path, columns, skip_bad_rows=True)
    assert [p.metadata["score_chosen"] for p in pairs] == [0.9, 0.7] and report.skipped == {"nan_score": 1}


def write_ultrafeedback(tmp_path: Path, edit) -> Path:
    rows = pq.read_table(FIXTURES / "ultrafeedback_binarized.parquet").to_pylist()
    edit(rows)
    schema = pq.read_schema(FIXTURES / "ultrafeedback_binarized.parquet").remove_metadata()
    path = tmp_path / "uf.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def test_nan_score_in_ultrafeedback(tmp_path):
    path = write_ultrafeedback(tmp_path, lambda rows: rows[1].update(score_chosen=math.nan))
    with pytest.raises(DataError, match=r"uf.parquet: row 2, field 'score_chosen': score is nan"):
        load_preference_pairs(f"ultrafeedback:{path}")
    pairs, report = load_preference_pairs(f"ultrafeedback:{path}", skip_bad_rows=True)
    assert len(pairs) == 5 and report.skipped == {"nan_score": 1}
    assert all(math.isfinite(p.metadata["score_chosen"]) for p in pairs)


def test_wrong_type_in_a_parquet_column(tmp_path):
    path = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"prompt": ["Q1", "Q2"], "chosen": ["A", "B"], "rejected": [1.5, 2.5]}), path)
    with pytest.raises(DataError, match=r"numbers.parquet: row 1, field 'rejected': expected text or a list of "
                                        r"chat messages, got float"):
        load_preference_pairs(path)


def test_duplicate_rows_are_dropped_and_counted_or_rejected(tmp_path):
    path = tmp_path / "dups.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GOOD + [GOOD[1]]))
    pairs, report = load_preference_pairs(path)  # the default, with or without skip_bad_rows
    assert triples(pairs) == GOOD_TRIPLES and report.skipped == {"duplicate": 1}
    assert report.summary().endswith("4 rows, 3 kept, 1 skipped (duplicate: 1)")
    with pytest.raises(DataError, match=r"dups.jsonl: row 4: exact duplicate of row 2"):
        load_preference_pairs(path, duplicates="error")


def test_no_usable_rows_is_an_error_even_when_skipping(tmp_path):
    path = tmp_path / "hopeless.jsonl"
    path.write_text(json.dumps({"prompt": "Q?", "chosen": "", "rejected": "B."}) + "\n"
                    + json.dumps({"prompt": "Q?", "chosen": "A.", "rejected": "A."}) + "\n")
    with pytest.raises(DataError) as caught:
        load_preference_pairs(path, skip_bad_rows=True)
    message = str(caught.value)
    assert "hopeless.jsonl: no usable rows" in message
    assert "2 rows, 0 kept, 2 skipped (empty_text: 1, identical_pair: 1)" in message
    assert "hopeless.jsonl: row 1, field 'chosen': empty text" in message  # the first problems, located


# ----------------------------------------------------------------------------------------------
# Over-long rows: tokenize.on_overlong decides (truncate and count, skip and count, or an error)


def overlong_pairs(tmp_path):
    """Row 2's chosen reply is 150,000 characters: more than the csv module's default field limit too."""
    path = tmp_path / "long.csv"
    path.write_text("prompt,chosen,rejected\nQ1?,Yes.,No.\nQ2?," + "great " * 25_000 + ",bad\nQ3?,Fine.,Poor.\n")
    pairs, report = load_preference_pairs(path)
    assert report.kept == 3
    return path, pairs


@pytest.mark.parametrize("policy", ["truncate", "skip", "error"])
def test_overlong_rows_follow_tokenize_on_overlong(tmp_path, tiny_tokenizer, policy):
    path, pairs = overlong_pairs(tmp_path)
    config = TokenizeConfig(max_prompt_length=16, max_length=32, on_overlong=policy)
    if policy == "error":
        with pytest.raises(OverlongError, match=r"long.csv: row 2, field 'chosen': prompt \+ response is \d+ "
                                                r"tokens, more than tokenize.max_length=32"):
            encode_pairs(tiny_tokenizer, pairs, config)
        return
    encoded, counts = encode_pairs(tiny_tokenizer, pairs, config)
    assert all(len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) <= 32 for e in encoded)
    if policy == "truncate":
        assert counts["truncated"] == 1 and [e.source for e in encoded] == [f"{path}: row {n}" for n in (1, 2, 3)]
    else:
        assert counts["skipped_overlong"] == 1 and [e.source for e in encoded] == [f"{path}: row {n}" for n in (1, 3)]


# ----------------------------------------------------------------------------------------------
# Config: a bad key or value stops build_config (so the job) and names the key


@pytest.mark.parametrize("cls, preset, override, message", [
    (DPOConfig, "dpo_tiny", "loss.beta=-1", "loss.beta must be > 0, got -1.0"),
    (DPOConfig, "dpo_tiny", "loss.label_smoothing=0.7", "loss.label_smoothing must be in [0, 0.5), got 0.7"),
    (PPOConfig, "ppo_tiny", "ppo.clip_eps=2", "ppo.clip_eps must be in (0, 1), got 2.0"),
    (PPOConfig, "ppo_tiny", "kl.coef=-0.1", "kl.coef must be >= 0, got -0.1"),
    (DPOConfig, "dpo_tiny", "tokenize.max_prompt_length=0",
     "tokenize.max_prompt_length must be > 0 and < tokenize.max_length, got 0 and 64"),
    (DPOConfig, "dpo_tiny", "tokenize.on_overlong=drop", "tokenize.on_overlong must be truncate, skip or error"),
    (DPOConfig, "dpo_tiny", "data.eval_fraction=1.5", "data.eval_fraction must be in [0, 1), got 1.5"),
    (DPOConfig, "dpo_tiny", "data.columns={promt: question}", "data.columns: unknown field 'promt'"),
    (DPOConfig, "dpo_tiny", "data.train=pairs.txt", "data.train: cannot tell the format of 'pairs.txt'"),
    (DPOConfig, "dpo_tiny", "loss.betta=0.5", "unknown config key 'loss.betta'"),
    (DPOConfig, "dpo_tiny", "loss.beta=high", "loss.beta: expected a number, got 'high'"),
    (DPOConfig, "dpo_tiny", "batch_size=1.5", "batch_size: expected an integer, got 1.5"),
    (PPOConfig, "ppo_tiny", "reward.scorer=vadr", "reward.scorer: unknown scorer 'vadr'"),
])
def test_config_value_out_of_range_names_the_key(cls, preset, override, message):
    with pytest.raises(ConfigError) as caught:
        build_config(cls, preset, [override])
    assert message in str(caught.value)


def test_bad_config_stops_the_cli_before_the_job_runs(tmp_path, capsys):
    def job(config):
        raise AssertionError("the job ran with a bad config")

    with pytest.raises(SystemExit) as caught:
        run_cli(DPOConfig, job, "python -m jobs.dpo", None, ["--preset", "dpo_tiny", "loss.beta=-1"])
    assert caught.value.code == 2
    assert capsys.readouterr().err == f"config error: loss.beta must be > 0, got -1.0 {DEBUG_HINT}\n"


@pytest.mark.parametrize("cls, preset, overrides, message", [
    (DPOConfig, "dpo_tiny", ["model=/no/such/policy"], "model: model path '/no/such/policy' does not exist"),
    (DPOConfig, "dpo_tiny", ["reference_model=./no_such_reference"],
     "reference_model: model path './no_such_reference' does not exist"),
    (PPOConfig, "ppo_tiny", ["critic_model=/no/such/critic"], "critic_model: model path '/no/such/critic'"),
    (PPOConfig, "ppo_tiny", ["reward.kind=learned", "reward.model=./no_such_rm"],
     "reward.model: model path './no_such_rm' does not exist"),
    (PPOConfig, "ppo_tiny", ["eval_scorer=hf-reward:./no_such_judge"],
     "eval_scorer: model path './no_such_judge' does not exist"),
    (SFTConfig, "sft_tiny", ["model=/no/such/base"], "model: model path '/no/such/base' does not exist"),
    (RewardTrainConfig, "reward_tiny", ["normalize.policy=/no/such/policy"],
     "normalize.policy: model path '/no/such/policy' does not exist"),
    (BestOfNConfig, "best_of_n_tiny", ["gold_scorer=hf-classifier:/no/such/classifier@POSITIVE"],
     "gold_scorer: model path '/no/such/classifier' does not exist"),
    (DPOConfig, "dpo_tiny", ["model=runs/no_such_run/checkpoint"],
     "model: model 'runs/no_such_run/checkpoint' is not a built-in"),
])
def test_model_path_that_does_not_exist_names_the_key(cls, preset, overrides, message):
    with pytest.raises(ConfigError) as caught:
        build_config(cls, preset, overrides)
    assert message in str(caught.value)


def test_model_folder_without_config_json_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model: model folder '.*' has no config.json"):
        build_config(DPOConfig, "dpo_tiny", [f"model={tmp_path}"])


# ----------------------------------------------------------------------------------------------
# Data paths and whole-job behaviour: errors come before any actor starts


@pytest.mark.parametrize("key", ["train", "eval"])
def test_data_path_that_does_not_exist_names_the_key(tmp_path, key):
    good = tmp_path / "pairs.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    missing = tmp_path / "missing.jsonl"
    config = DataConfig(**{"train": f"jsonl:{good}", key: f"jsonl:{missing}"})
    config.validate()  # a pipeline may validate a stage before an earlier stage writes its file
    with pytest.raises(ConfigError, match=rf"data.{key}: data file not found: {missing}"):
        load_pair_splits(config, seed=0)


@pytest.mark.parametrize("module, cls, preset", [
    (dpo, DPOConfig, "dpo_tiny"), (ppo, PPOConfig, "ppo_tiny"), (sft, SFTConfig, "sft_tiny"),
    (reward, RewardTrainConfig, "reward_tiny"), (best_of_n, BestOfNConfig, "best_of_n_tiny"),
    (policy_gradient, PolicyGradientConfig, "policy_gradient_tiny"), (online_dpo, OnlineDPOConfig, "online_dpo_tiny"),
], ids=["dpo", "ppo", "sft", "reward", "best_of_n", "policy_gradient", "online_dpo"])
def test_every_driver_reports_a_missing_data_file_before_starting_an_actor(tmp_path, monkeypatch, module, cls, preset):
    # the on-policy drivers (PPO, critic-free RL, online DPO) start Ray in their shared prompt_run
    starts_ray = module if hasattr(module, "init_ray") else prompt_run
    monkeypatch.setattr(starts_ray, "init_ray", lambda *a, **k: pytest.fail("init_ray was called"))
    config = build_config(cls, preset, [f"output_dir={tmp_path}", f"data.train=jsonl:{tmp_path}/missing.jsonl"])
    with pytest.raises(ConfigError, match=rf"data.train: data file not found: {tmp_path}/missing.jsonl"):
        module.train(config)


def test_nothing_left_after_tokenization_stops_the_job_before_any_actor(tmp_path, monkeypatch):
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({**r, "chosen": r["chosen"] + " and more" * 40}) + "\n" for r in GOOD))
    monkeypatch.setattr(dpo, "init_ray", lambda *a, **k: pytest.fail("init_ray was called"))
    config = build_config(DPOConfig, "dpo_tiny", [f"output_dir={tmp_path}", f"data.train=jsonl:{path}",
                                                  "data.eval_fraction=0", "tokenize.on_overlong=skip"])
    with pytest.raises(ConfigError, match=r"data.train: no usable pairs in .* after validation and tokenization"):
        dpo.train(config)


def test_skip_bad_rows_flag_reaches_the_load_report(tmp_path):
    path = write_with_bad_row(tmp_path / "pairs.jsonl", BAD_ROWS["empty_response"][0])
    seen = {}

    def job(config):
        seen["train"], _, seen["report"] = load_pair_splits(config.data, config.seed)

    argv = ["--preset", "dpo_tiny", "--data", f"jsonl:{path}", "data.eval_fraction=0", f"output_dir={tmp_path}"]
    with pytest.raises(DataError, match=r"pairs.jsonl: row 3, field 'chosen': empty text"):
        run_cli(DPOConfig, job, "python -m jobs.dpo", None, argv + ["--debug"])
    assert run_cli(DPOConfig, job, "python -m jobs.dpo", None, argv + ["--skip-bad-rows"]) == 0
    assert sorted(triples(seen["train"])) == GOOD_TRIPLES
    assert seen["report"]["train"].endswith("4 rows, 3 kept, 1 skipped (empty_text: 1)")


def test_overrides_may_come_before_between_and_after_the_options(tmp_path):
    seen = {}

    def job(config):
        seen.update(beta=config.loss.beta, train=config.data.train, seed=config.seed)

    argv = ["loss.beta=0.3", "--preset", "dpo_tiny", "--data", "jsonl:a.jsonl", "seed=7", "--skip-bad-rows",
            f"output_dir={tmp_path}"]
    assert run_cli(DPOConfig, job, "python -m jobs.dpo", None, argv) == 0
    assert seen == {"beta": 0.3, "train": "jsonl:a.jsonl", "seed": 7}


DEBUG_HINT = "[traceback: --debug or RAYALIGN_DEBUG=1]"


def _cli_error(tmp_path, capsys, monkeypatch, extra: list[str]) -> str:
    """The stderr of ``python -m jobs.dpo`` (its real main, in-process) on a bad input: exactly one line,
    exit status 2, and the job never reaches Ray."""
    monkeypatch.setattr(dpo, "init_ray", lambda *a, **k: pytest.fail("init_ray was called"))
    with pytest.raises(SystemExit) as caught:
        dpo.main(["--preset", "dpo_tiny", f"output_dir={tmp_path / 'run'}", *extra])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith(f" {DEBUG_HINT}\n"), err
    return err.removesuffix(f" {DEBUG_HINT}\n")


def test_cli_data_error_is_one_line(tmp_path, capsys, monkeypatch):
    path = write_with_bad_row(tmp_path / "pairs.jsonl", BAD_ROWS["empty_response"][0])
    line = _cli_error(tmp_path, capsys, monkeypatch, ["--data", f"jsonl:{path}"])
    assert line == f"data error: {path}: row 3, field 'chosen': empty text"


def test_cli_missing_data_file_is_one_line(tmp_path, capsys, monkeypatch):
    line = _cli_error(tmp_path, capsys, monkeypatch, ["--data", f"jsonl:{tmp_path}/missing.jsonl"])
    assert line == f"config error: data.train: data file not found: {tmp_path}/missing.jsonl"


def test_cli_directory_given_as_a_data_file(tmp_path, capsys, monkeypatch):
    (tmp_path / "some_dir").mkdir()
    line = _cli_error(tmp_path, capsys, monkeypatch, ["--data", f"jsonl:{tmp_path}/some_dir"])
    assert line == (f"config error: data.train: {tmp_path}/some_dir is a folder, not a data file "
                    "(name a .jsonl, .json, .parquet or .csv file)")


@pytest.mark.parametrize("prefix", ["yaml", "anthropic"])
def test_cli_unknown_format_prefix_lists_the_valid_ones(tmp_path, capsys, monkeypatch, prefix):
    line = _cli_error(tmp_path, capsys, monkeypatch, ["--data", f"{prefix}:x.jsonl"])
    assert line == (f"config error: data.train: unknown data format prefix '{prefix}:' in '{prefix}:x.jsonl'; "
                    "the prefixes are: hh:, tldr:, ultrafeedback:, imdb:, jsonl:, json:, parquet:, csv:, hf:")


def test_cli_unreachable_hub_names_the_offline_alternative(tmp_path, capsys, monkeypatch):
    # datasets decides offline mode when it is imported: a fresh interpreter with the hub switched off
    # and an empty cache is the real offline path (datasets raises ConnectionError without a network call).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop(DEBUG_ENV, None)
    done = subprocess.run([sys.executable, "-m", "jobs.dpo", "--preset", "dpo_tiny", "--data", "hh",
                           f"output_dir={tmp_path / 'run'}"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr == (
        "data error: Anthropic/hh-rlhf: cannot reach the Hugging Face Hub (Couldn't reach 'Anthropic/hh-rlhf' on "
        "the Hub (OfflineModeIsEnabled)); offline, give a local file with its format prefix instead, e.g. --data "
        f"jsonl:pairs.jsonl (or hh:, tldr:, ultrafeedback:, imdb: + a file in that dataset's layout) {DEBUG_HINT}\n")


def test_debug_flag_and_env_show_the_traceback(tmp_path, monkeypatch):
    path = write_with_bad_row(tmp_path / "pairs.jsonl", BAD_ROWS["empty_response"][0])
    argv = ["--preset", "dpo_tiny", "--data", f"jsonl:{path}", f"output_dir={tmp_path / 'run'}"]
    with pytest.raises(DataError):
        dpo.main(argv + ["--debug"])
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(DataError):
        dpo.main(argv)

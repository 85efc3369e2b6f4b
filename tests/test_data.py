"""The shared preference-data layer: adapters on fixtures in each real dataset's schema, per-row
validation with located errors, skip-and-count, the deterministic split, and the demo prompts."""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.data import (
    DEMO_REVIEW_OPENINGS,
    DataError,
    DataSpec,
    LoadReport,
    PreferencePair,
    PromptRecord,
    demo_prompts,
    hh_transcript_to_messages,
    join_prompt_response,
    load_preference_pairs,
    load_prompts,
    parse_hh_rows,
    parse_imdb_rows,
    parse_preference_rows,
    parse_spec,
    parse_ultrafeedback_rows,
    prompts_from_pairs,
    shuffled,
    split_hh_transcript,
    split_records,
)

FIXTURES = Path(__file__).parent / "fixtures"
REPO_ROOT = Path(__file__).resolve().parent.parent
LOCAL_COLUMNS = {"prompt": "question", "chosen": "good", "rejected": "bad"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def good_rows(count: int = 2) -> list[dict]:
    return [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad answer {i}."}
            for i in range(count)]


# ----------------------------------------------------------------------------------------------
# Adapters on fixtures


def test_hh_fixture_splits_prompt_and_final_turns():
    pairs, report = load_preference_pairs(f"hh:{FIXTURES / 'hh_rlhf.jsonl'}")
    assert (report.total, report.kept, report.skipped) == (8, 8, {})
    first = pairs[0]
    assert first.prompt == "\n\nHuman: How do I keep basil alive on a windowsill?\n\nAssistant:"
    assert first.chosen.startswith("Give it at least six hours of sun")
    assert first.rejected == "Basil is a plant."
    assert first.source == f"{FIXTURES / 'hh_rlhf.jsonl'}: row 1"
    assert not first.is_chat

    multi_turn = pairs[5]
    assert multi_turn.prompt.endswith("\n\nHuman: Something with oats. Any tips?\n\nAssistant:")
    assert "Nice! What kind are you thinking of?" in multi_turn.prompt
    assert multi_turn.chosen.startswith("Toast the oats")
    assert multi_turn.rejected == "Oats are fine."

    # Joining prompt and response restores the original transcripts exactly.
    raw = read_jsonl(FIXTURES / "hh_rlhf.jsonl")
    for pair, row in zip(pairs, raw):
        assert join_prompt_response(pair.prompt, pair.chosen) == row["chosen"]
        assert join_prompt_response(pair.prompt, pair.rejected) == row["rejected"]


def test_hh_transcript_to_messages_drops_the_empty_reply_slot():
    pairs, _ = parse_hh_rows(read_jsonl(FIXTURES / "hh_rlhf.jsonl"))
    assert hh_transcript_to_messages(pairs[5].prompt) == [
        {"role": "user", "content": "I want to bake cookies this weekend."},
        {"role": "assistant", "content": "Nice! What kind are you thinking of?"},
        {"role": "user", "content": "Something with oats. Any tips?"},
    ]
    full = hh_transcript_to_messages("\n\nHuman: Hi\n\nAssistant: Hello!")
    assert full == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    with pytest.raises(ValueError):
        hh_transcript_to_messages("no markers here")


def test_split_hh_transcript_uses_the_last_assistant_marker():
    prompt, reply = split_hh_transcript("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d")
    assert prompt == "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    assert reply == "d"


def test_hh_rows_with_different_prompts_are_rejected(tmp_path):
    rows = read_jsonl(FIXTURES / "hh_rlhf.jsonl")[:3]
    rows[2] = {"chosen": rows[2]["chosen"], "rejected": rows[1]["rejected"]}
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    with pytest.raises(DataError) as caught:
        load_preference_pairs(f"hh:{path}")
    message = str(caught.value)
    assert "hh.jsonl: row 3, field 'rejected'" in message
    assert "chosen and rejected transcripts do not share a prompt" in message
    assert caught.value.reason == "prompt_mismatch"


@pytest.mark.parametrize("chosen, reason", [
    ("\n\nHuman: Hi there", "malformed_transcript"),          # no assistant turn
    ("\n\nHuman: Hi there\n\nAssistant:", "empty_text"),       # empty final turn
    ("\n\nHuman: Hi there\n\nAssistant:   ", "empty_text"),
])
def test_hh_malformed_transcripts(tmp_path, chosen, reason):
    rows = [{"chosen": chosen, "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello."}]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    with pytest.raises(DataError) as caught:
        load_preference_pairs(f"hh:{path}")
    assert caught.value.reason == reason
    assert "hh.jsonl: row 1, field 'chosen'" in str(caught.value)


def test_tldr_fixture():
    pairs, report = load_preference_pairs(f"tldr:{FIXTURES / 'tldr_preference.jsonl'}")
    assert report.kept == 6
    first = pairs[0]
    assert first.prompt.startswith("SUBREDDIT: r/gardening\n\nTITLE: My tomato plants")
    assert first.prompt.endswith("\n\nTL;DR:")
    assert first.chosen == "Tomatoes split when dry spells are followed by heavy rain; how do I water to stop it?"
    assert first.rejected == "tomatoes bad"
    raw = read_jsonl(FIXTURES / "tldr_preference.jsonl")
    assert join_prompt_response(first.prompt, first.chosen) == raw[0]["prompt"] + raw[0]["chosen"]


def test_ultrafeedback_fixture_gives_chat_pairs_with_scores():
    path = FIXTURES / "ultrafeedback_binarized.parquet"
    assert pq.read_schema(path).field("chosen").type == pa.list_(
        pa.struct([("content", pa.string()), ("role", pa.string())]))
    pairs, report = load_preference_pairs(f"ultrafeedback:{path}")
    assert report.kept == 6
    first = pairs[0]
    assert first.is_chat
    assert first.prompt == [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]
    assert first.chosen.startswith("Sunlight is scattered")
    assert first.rejected == "The sky is blue because it reflects the ocean."
    assert first.metadata["score_chosen"] == 8.5 and first.metadata["score_rejected"] == 3.0
    assert len(first.metadata["prompt_id"]) == 64


def write_ultrafeedback(tmp_path: Path, edit) -> Path:
    rows = pq.read_table(FIXTURES / "ultrafeedback_binarized.parquet").to_pylist()
    edit(rows)
    path = tmp_path / "uf.parquet"
    schema = pq.read_schema(FIXTURES / "ultrafeedback_binarized.parquet").remove_metadata()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def test_ultrafeedback_nan_score_names_the_field(tmp_path):
    path = write_ultrafeedback(tmp_path, lambda rows: rows[1].update(score_rejected=math.nan))
    with pytest.raises(DataError) as caught:
        load_preference_pairs(f"ultrafeedback:{path}")
    assert "uf.parquet: row 2, field 'score_rejected'" in str(caught.value)
    assert caught.value.reason == "nan_score"


def test_ultrafeedback_conversation_must_end_with_the_assistant(tmp_path):
    def edit(rows):
        rows[3]["rejected"] = rows[3]["rejected"][:1]  # only the user's message

    path = write_ultrafeedback(tmp_path, edit)
    with pytest.raises(DataError) as caught:
        load_preference_pairs(f"ultrafeedback:{path}")
    assert "uf.parquet: row 4, field 'rejected'" in str(caught.value)
    assert caught.value.reason == "malformed_messages"


def test_ultrafeedback_rows_from_datasets_style_dicts():
    rows = pq.read_table(FIXTURES / "ultrafeedback_binarized.parquet").to_pylist()
    pairs, _ = parse_ultrafeedback_rows(rows, source="uf")
    assert pairs[5].chosen == "5 kilometres is about 3.11 miles."
    assert pairs[5].source == "uf: row 6"


def test_local_csv_with_column_mapping_and_json_chat_cells():
    pairs, report = load_preference_pairs(FIXTURES / "local_pairs.csv", LOCAL_COLUMNS)
    assert report.kept == 6
    assert pairs[0] == PreferencePair(
        "What is the boiling point of water at sea level?", "100 degrees Celsius, or 212 degrees Fahrenheit.",
        "It depends on the pot.", {"id": "q1"}, f"{FIXTURES / 'local_pairs.csv'}: row 1")
    assert pairs[4].prompt == [{"role": "system", "content": "You answer briefly."},
                               {"role": "user", "content": "What is 7 times 8?"}]
    assert pairs[4].chosen == "56."


def test_local_csv_missing_column_is_a_file_error_even_when_skipping(tmp_path):
    with pytest.raises(DataError) as caught:
        load_preference_pairs(FIXTURES / "local_pairs.csv", {**LOCAL_COLUMNS, "chosen": "best"},
                              skip_bad_rows=True)
    message = str(caught.value)
    assert "local_pairs.csv" in message and "field 'best'" in message and "question, good, bad" in message


def test_csv_text_that_looks_like_json_stays_text(tmp_path):
    path = tmp_path / "brackets.csv"
    path.write_text('prompt,chosen,rejected\n"[1, 2, 3] sums to?",6,5\n"[1, 2, 3]",a list,a tuple\n')
    pairs, _ = load_preference_pairs(path)
    assert [p.prompt for p in pairs] == ["[1, 2, 3] sums to?", "[1, 2, 3]"]


def test_json_array_and_gzipped_jsonl(tmp_path):
    import gzip

    rows = good_rows(3)
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    with gzip.open(tmp_path / "pairs.jsonl.gz", "wt") as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in rows))
    for name in ("pairs.json", "pairs.jsonl.gz"):
        pairs, _ = load_preference_pairs(tmp_path / name)
        assert [p.chosen for p in pairs] == ["Good answer 0.", "Good answer 1.", "Good answer 2."]
        assert pairs[2].source.endswith(f"{name}: row 3")


def test_chat_jsonl_explicit_and_implicit_prompts():
    pairs, _ = load_preference_pairs(FIXTURES / "chat_pairs.jsonl")
    assert all(pair.is_chat for pair in pairs)
    assert pairs[1].prompt[0] == {"role": "system", "content": "You are a concise assistant."}
    assert pairs[1].chosen == "Au."
    assert [m["role"] for m in pairs[2].prompt] == ["user", "assistant", "user"]
    assert pairs[3].prompt == [{"role": "user", "content": "Is a tomato a fruit?"}]  # implicit prompt
    assert pairs[3].rejected == "No, it is a vegetable."


def test_imdb_prompts_are_short_clean_reproducible_openings():
    prompts, report = load_prompts(f"imdb:{FIXTURES / 'imdb.csv'}", seed=7)
    assert report.kept == 8
    for record in prompts:
        words = record.prompt.split()
        assert 2 <= len(words) <= 8 and record.metadata["prompt_words"] == len(words)
        assert "<br" not in record.prompt
        assert record.metadata["label"] in (0, 1)
    assert prompts[0].prompt == " ".join("I picked this up expecting a light comedy and got".split()[
                                         : prompts[0].metadata["prompt_words"]])
    assert [p.metadata["label"] for p in prompts] == [1, 0, 1, 0, 1, 0, 1, 0]
    again, _ = load_prompts(f"imdb:{FIXTURES / 'imdb.csv'}", seed=7)
    assert again == prompts
    other_seeds = [load_prompts(f"imdb:{FIXTURES / 'imdb.csv'}", seed=s)[0] for s in range(1, 4)]
    assert any(other != prompts for other in other_seeds)


def test_imdb_strips_html_breaks_before_counting_words():
    rows = [{"text": "Great<br /><br />fun<br/>for<BR>all of the family here", "label": 1}]
    prompts, _ = parse_imdb_rows(rows, min_words=4, max_words=4)
    assert prompts[0].prompt == "Great fun for all"


def test_imdb_too_short_and_bad_label(tmp_path):
    with pytest.raises(DataError, match=r"imdb\[x\]: row 2, field 'text'.*fewer than min_words"):
        parse_imdb_rows([{"text": "fine film", "label": 1}, {"text": "Meh", "label": 0}], source="imdb[x]")
    with pytest.raises(DataError, match=r"row 1, field 'label'.*expected an integer"):
        parse_imdb_rows([{"text": "fine film indeed", "label": "positive"}], source="imdb[x]")


def test_demo_prompts_are_unique_short_openings():
    prompts = demo_prompts()
    assert 400 <= len(prompts) <= 500
    texts = [p.prompt for p in prompts]
    assert len(set(texts)) == len(texts)
    assert len({t.lower().strip(" ,") for t in texts}) == len(texts)
    assert all(2 <= len(t.split()) <= 8 for t in texts)
    assert all(isinstance(p, PromptRecord) for p in prompts)
    assert texts == list(DEMO_REVIEW_OPENINGS)
    assert load_prompts("demo")[0] == prompts


def test_prompts_from_preference_data_are_deduplicated_in_order():
    pairs, _ = load_preference_pairs(f"tldr:{FIXTURES / 'tldr_preference.jsonl'}")
    prompts, report = load_prompts(f"tldr:{FIXTURES / 'tldr_preference.jsonl'}")
    assert [p.prompt for p in prompts] == [p.prompt for p in prompts_from_pairs(pairs)]
    assert len(prompts) == 4 and prompts[1].prompt.startswith("SUBREDDIT: r/personalfinance")
    assert report.skipped == {"duplicate": 2}
    chat_prompts, _ = load_prompts(FIXTURES / "chat_pairs.jsonl")
    assert chat_prompts[3].prompt == [{"role": "user", "content": "Is a tomato a fruit?"}]


def test_plain_prompt_file(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Once upon a time"}, {"prompt": "The end"},
                                                    {"prompt": "Once upon a time"}])
    prompts, report = load_prompts(path)
    assert [p.prompt for p in prompts] == ["Once upon a time", "The end"]
    assert report.skipped == {"duplicate": 1}


# ----------------------------------------------------------------------------------------------
# Bad rows: every error names the file, the row and the field


BAD_ROWS = {
    "missing_field": ({"prompt": "Q?", "chosen": "A."}, "rejected"),
    "null_value": ({"prompt": "Q?", "chosen": None, "rejected": "B."}, "chosen"),
    "wrong_type": ({"prompt": "Q?", "chosen": 42, "rejected": "B."}, "chosen"),
    "malformed_messages": ({"prompt": [{"role": "user"}], "chosen": "A.", "rejected": "B."}, "prompt"),
    "unknown_role": ({"prompt": [{"role": "narrator", "content": "x"}], "chosen": "A.", "rejected": "B."}, "prompt"),
    "not_a_message": ({"prompt": ["just text"], "chosen": "A.", "rejected": "B."}, "prompt"),
    "empty_text": ({"prompt": "Q?", "chosen": "A.", "rejected": "  \n "}, "rejected"),
    "empty_prompt": ({"prompt": "", "chosen": "A.", "rejected": "B."}, "prompt"),
    "identical_pair": ({"prompt": "Q?", "chosen": "Same.", "rejected": "Same. "}, "rejected"),
    "prompt_ends_with_assistant": (
        {"prompt": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
         "chosen": "A.", "rejected": "B."}, "prompt"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_errors_name_file_row_and_field(tmp_path, case):
    bad, field_name = BAD_ROWS[case]
    path = write_jsonl(tmp_path / "pairs.jsonl", good_rows(2) + [bad] + good_rows(1))
    with pytest.raises(DataError) as caught:
        load_preference_pairs(path)
    assert f"pairs.jsonl: row 3, field '{field_name}'" in str(caught.value)
    assert caught.value.row == 3 and caught.value.field == field_name


def test_mapped_column_is_named_in_errors(tmp_path):
    path = tmp_path / "mapped.csv"
    path.write_text("question,good,bad\nQ1?,A1,B1\nQ2?,,B2\n")
    with pytest.raises(DataError) as caught:
        load_preference_pairs(path, LOCAL_COLUMNS)
    assert "mapped.csv: row 2, field 'good'" in str(caught.value)
    assert "chosen" in str(caught.value)


def test_undecodable_bytes_in_jsonl_name_the_row_and_field(tmp_path):
    path = tmp_path / "latin1.jsonl"
    lines = [json.dumps(row).encode() for row in good_rows(2)]
    lines.append(b'{"prompt": "Caf\xe9?", "chosen": "Yes.", "rejected": "No."}')
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError) as caught:
        load_preference_pairs(path)
    assert "latin1.jsonl: row 3, field 'prompt'" in str(caught.value)
    assert caught.value.reason == "undecodable"


def test_undecodable_bytes_in_csv_name_the_row_and_field(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"prompt,chosen,rejected\nQ1?,A1,B1\nQ2?,Caf\xe9,B2\n")
    with pytest.raises(DataError) as caught:
        load_preference_pairs(path)
    assert "latin1.csv: row 2, field 'chosen'" in str(caught.value)


def test_undecodable_bytes_in_parquet_name_the_row_and_field(tmp_path):
    raw = pa.array([b"A1", b"A2", b"bad \xff"], type=pa.binary())
    chosen = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())  # skips UTF-8 validation
    table = pa.table({"prompt": ["Q1", "Q2", "Q3"], "chosen": chosen, "rejected": ["B1", "B2", "B3"]})
    path = tmp_path / "broken.parquet"
    pq.write_table(table, path)
    with pytest.raises(DataError) as caught:
        load_preference_pairs(path)
    assert "broken.parquet: row 3, field 'chosen'" in str(caught.value)
    pairs, report = load_preference_pairs(path, skip_bad_rows=True)
    assert len(pairs) == 2 and report.skipped == {"undecodable": 1}


def test_wrong_type_in_parquet(tmp_path):
    path = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"prompt": ["Q1", "Q2"], "chosen": ["A", "B"], "rejected": [1.5, 2.5]}), path)
    with pytest.raises(DataError, match=r"numbers.parquet: row 1, field 'rejected': expected text or a list"):
        load_preference_pairs(path)


def test_invalid_json_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(good_rows(1)[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"broken.jsonl: row 2: invalid JSON"):
        load_preference_pairs(path)


def test_jsonl_rows_are_line_numbers(tmp_path):
    path = tmp_path / "gaps.jsonl"
    rows = good_rows(2)
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps({**rows[1], "chosen": ""}) + "\n")
    with pytest.raises(DataError, match=r"gaps.jsonl: row 3, field 'chosen'"):
        load_preference_pairs(path)


def test_duplicates_skip_error_or_keep(tmp_path):
    rows = good_rows(3)
    path = write_jsonl(tmp_path / "dups.jsonl", rows + [rows[1]])
    pairs, report = load_preference_pairs(path)
    assert len(pairs) == 3 and report.skipped == {"duplicate": 1} and report.total == 4
    with pytest.raises(DataError, match=r"dups.jsonl: row 4: exact duplicate of row 2"):
        load_preference_pairs(path, duplicates="error")
    assert len(load_preference_pairs(path, duplicates="keep")[0]) == 4


def test_skip_bad_rows_counts_by_reason(tmp_path):
    rows = (good_rows(2) + [BAD_ROWS["empty_text"][0], BAD_ROWS["wrong_type"][0], BAD_ROWS["empty_prompt"][0],
                            BAD_ROWS["identical_pair"][0], good_rows(1)[0]] + good_rows(4)[3:])
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with path.open("a") as handle:
        handle.write("{oops\n")
    pairs, report = load_preference_pairs(path, skip_bad_rows=True)
    assert isinstance(report, LoadReport)
    assert [p.prompt for p in pairs] == ["Question 0?", "Question 1?", "Question 3?"]
    assert report.skipped == {"empty_text": 2, "wrong_type": 1, "identical_pair": 1, "duplicate": 1,
                              "invalid_json": 1}
    assert report.total == 9 and report.kept == 3 and report.num_skipped == 6
    assert report.messages[0].startswith(f"{path}: row 3, field 'rejected'")
    assert "6 skipped" in report.summary()


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "hopeless.jsonl", [BAD_ROWS["empty_text"][0]] * 2)
    with pytest.raises(DataError, match=r"hopeless.jsonl: no usable rows"):
        load_preference_pairs(path, skip_bad_rows=True)


def test_parse_functions_take_plain_dicts():
    pairs, report = parse_preference_rows(good_rows(3), source="mem")
    assert len(pairs) == 3 and pairs[2].source == "mem: row 3"
    with pytest.raises(DataError, match="mem: row 1, field 'chosen'"):
        parse_preference_rows([{"prompt": "q", "chosen": "", "rejected": "r"}], source="mem")


def test_data_error_pickles():
    error = DataError("hh.jsonl", "empty text", 3, "chosen", "empty_text")
    clone = pickle.loads(pickle.dumps(error))
    assert str(clone) == str(error) == "hh.jsonl: row 3, field 'chosen': empty text"
    assert (clone.row, clone.field, clone.reason) == (3, "chosen", "empty_text")


# ----------------------------------------------------------------------------------------------
# Specs and the hub path


@pytest.mark.parametrize("spec, expected", [
    ("hh", DataSpec("hh")),
    ("ultrafeedback@test_prefs", DataSpec("ultrafeedback", split="test_prefs")),
    ("hh:data/train.jsonl", DataSpec("hh", Path("data/train.jsonl"), "jsonl")),
    ("hh:data/train.jsonl.gz", DataSpec("hh", Path("data/train.jsonl.gz"), "jsonl")),
    ("hh:someone/hh-variant@test", DataSpec("hh", hub_id="someone/hh-variant", split="test")),
    ("tldr:pairs.parquet", DataSpec("tldr", Path("pairs.parquet"), "parquet")),
    ("imdb", DataSpec("imdb")),
    ("jsonl:data/pairs.txt", DataSpec("generic", Path("data/pairs.txt"), "jsonl")),
    ("pairs.csv", DataSpec("generic", Path("pairs.csv"), "csv")),
    ("hf:me/my-prefs@validation", DataSpec("generic", hub_id="me/my-prefs", split="validation")),
    ("demo", DataSpec("demo")),
])
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize("spec", ["", "notes.txt", "hh:"])
def test_parse_spec_rejects_unclear_specs(spec):
    with pytest.raises(ValueError):
        parse_spec(spec)


def test_missing_file_and_wrong_kind():
    with pytest.raises(FileNotFoundError):
        load_preference_pairs("hh:does/not/exist.jsonl")
    with pytest.raises(ValueError, match="load_prompts"):
        load_preference_pairs("imdb")


def test_hub_specs_go_through_datasets_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(hub_id, split=None, **kwargs):
        calls.append((hub_id, split, kwargs))
        rows = pq.read_table(FIXTURES / "ultrafeedback_binarized.parquet").to_pylist()
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    pairs, report = load_preference_pairs("ultrafeedback@test_prefs")
    assert calls == [("HuggingFaceH4/ultrafeedback_binarized", "test_prefs", {})]
    assert report.source == "HuggingFaceH4/ultrafeedback_binarized[test_prefs]" and len(pairs) == 6
    assert pairs[0].prompt == [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]

    monkeypatch.setattr(datasets, "load_dataset",
                        lambda hub_id, split=None, **kw: datasets.Dataset.from_list(
                            read_jsonl(FIXTURES / "hh_rlhf.jsonl")))
    prompts, _ = load_prompts("hh", hub_kwargs={"data_dir": "harmless-base"})
    assert len(prompts) == 8 and prompts[0].source == "Anthropic/hh-rlhf[train]: row 1"
    with pytest.raises(DataError, match=r"Anthropic/hh-rlhf\[train\]: field 'prompt': no such column"):
        load_preference_pairs("tldr:Anthropic/hh-rlhf")


# ----------------------------------------------------------------------------------------------
# Deterministic split


def numbered_prompts(count: int) -> list[PromptRecord]:
    return [PromptRecord(f"prompt {i}", {"i": i}) for i in range(count)]


def test_split_is_deterministic_disjoint_and_complete():
    records = numbered_prompts(50)
    train, evaluation = split_records(records, 0.2, seed=3)
    assert len(evaluation) == 10 and len(train) == 40
    ids = [r.metadata["i"] for r in train + evaluation]
    assert sorted(ids) == list(range(50))
    assert split_records(records, 0.2, seed=3) == (train, evaluation)
    assert split_records(records, 0.2, seed=4) != (train, evaluation)
    train_sized, eval_sized = split_records(records, eval_size=7, seed=3)
    assert len(eval_sized) == 7 and len(train_sized) == 43


def test_split_keeps_prompts_on_one_side_and_matches_the_prompt_split():
    pairs, _ = load_preference_pairs(f"tldr:{FIXTURES / 'tldr_preference.jsonl'}")
    for seed in range(10):
        train, evaluation = split_records(pairs, eval_size=1, seed=seed)
        assert not {p.prompt for p in train} & {p.prompt for p in evaluation}
        assert len(train) + len(evaluation) == 6
        prompt_train, prompt_eval = split_records(prompts_from_pairs(pairs), eval_size=1, seed=seed)
        assert {p.prompt for p in prompt_eval} == {p.prompt for p in evaluation}
        assert {p.prompt for p in prompt_train} == {p.prompt for p in train}


def test_split_arguments_are_checked():
    records = numbered_prompts(5)
    with pytest.raises(ValueError):
        split_records(records)
    with pytest.raises(ValueError):
        split_records(records, 0.2, eval_size=1)
    with pytest.raises(ValueError):
        split_records(records, eval_size=5)
    with pytest.raises(ValueError):
        split_records(records, 1.0)
    assert split_records(records, 0.0)[1] == []
    assert len(split_records(numbered_prompts(3), 0.01)[1]) == 1  # a requested eval set is never empty


def test_split_and_shuffle_do_not_depend_on_the_hash_seed():
    code = ("from jobs.data import load_preference_pairs, split_records, shuffled;"
            f"pairs, _ = load_preference_pairs({str(FIXTURES / 'chat_pairs.jsonl')!r});"
            "train, ev = split_records(pairs, 0.4, seed=11);"
            "print([p.source for p in train], [p.source for p in ev], [p.source for p in shuffled(pairs, 2)])")
    outputs = set()
    for hash_seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO_ROOT)}
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True, cwd=REPO_ROOT, timeout=120)
        outputs.add(result.stdout)
    assert len(outputs) == 1


def test_shuffled_is_seeded_and_leaves_the_input_alone():
    records = numbered_prompts(20)
    assert shuffled(records, 1) == shuffled(records, 1) != records
    assert records == numbered_prompts(20)


def _openai_comparison(raw: dict, choice: int) -> dict:
    """The fixture's first row rewritten in OpenAI's summarize-from-feedback comparisons layout."""
    header, post = raw["prompt"].removesuffix("\n\nTL;DR:").split("\n\nPOST: ")
    subreddit, title = header.removeprefix("SUBREDDIT: r/").split("\n\nTITLE: ")
    summaries = [{"text": raw["chosen"], "policy": "ref"}, {"text": raw["rejected"], "policy": "sup"}]
    if choice == 1:
        summaries.reverse()
    return {"info": {"id": "t3_x", "post": post, "title": title, "subreddit": subreddit},
            "summaries": summaries, "choice": choice, "worker": "w1"}


@pytest.mark.parametrize("file_format", ["jsonl", "parquet"])
def test_tldr_reads_openai_comparisons_layout_as_the_same_pair(tmp_path, file_format):
    raw = read_jsonl(FIXTURES / "tldr_preference.jsonl")[0]
    expected, _ = load_preference_pairs(f"tldr:{write_jsonl(tmp_path / 'trl.jsonl', [raw])}")
    rows = [_openai_comparison(raw, 0), _openai_comparison(raw, 1) | {"info": {"post": "Other post."}}]
    if file_format == "parquet":
        path = tmp_path / "openai.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path = write_jsonl(tmp_path / "openai.jsonl", rows)
    pairs, report = load_preference_pairs(f"tldr:{path}")
    assert report.kept == 2
    # Same rendering as trl-lib/tldr-preference; choice picks the preferred summary whatever its index.
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == (expected[0].prompt, expected[0].chosen,
                                                                    expected[0].rejected)
    assert (pairs[1].prompt, pairs[1].chosen) == ("POST: Other post.\n\nTL;DR:", expected[0].chosen)


def test_tldr_missing_field_names_both_layouts(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"summaries": [{"text": " a"}, {"text": " b"}], "choice": 0}])
    with pytest.raises(DataError) as caught:
        load_preference_pairs(f"tldr:{path}")
    assert str(caught.value) == (
        f"{path}: row 1, field 'info': missing (no such column or key); TL;DR rows are either prompt / chosen / "
        "rejected (trl-lib/tldr-preference) or OpenAI's comparisons (info.post, summaries[i].text, choice)")
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("prompt,chosen\nQ?,A.\n")
    with pytest.raises(DataError, match=r"field 'rejected': no such column; the columns are: prompt, chosen; "
                                        r"the layouts read are: prompt, chosen, rejected or info, summaries, choice"):
        load_preference_pairs(f"tldr:{csv_path}")


def test_hh_and_ultrafeedback_missing_field_names_their_layout(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "Q?"}])
    with pytest.raises(DataError, match=r"field 'chosen': missing .*; HH-RLHF rows hold chosen / rejected "
                                        r"transcripts of Human: / Assistant: turns"):
        load_preference_pairs(f"hh:{path}")
    with pytest.raises(DataError, match=r"; UltraFeedback rows hold chosen / rejected chat messages and "
                                        r"score_chosen / score_rejected"):
        load_preference_pairs(f"ultrafeedback:{path}")

"""Tokenization of prompts and pairs: exact boundaries, truncation rules, chat templates."""

from __future__ import annotations

import pytest

from jobs.run.batching import OverlongError, TokenizeConfig, encode_pairs, encode_prompt, encode_response, fit_lengths
from jobs.data import PreferencePair


def test_response_ends_with_eos_and_prompt_is_separate(tiny_tokenizer):
    prompt = encode_prompt(tiny_tokenizer, "The film was", TokenizeConfig(chat_template="never"))
    response = encode_response(tiny_tokenizer, " great.")
    assert response[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(prompt + response[:-1]) == "The film was great."


def test_chat_messages_use_the_template_with_a_generation_prompt(tiny_tokenizer):
    messages = [{"role": "user", "content": "Review this film."}]
    ids = encode_prompt(tiny_tokenizer, messages, TokenizeConfig(chat_template="auto"))
    text = tiny_tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert "Review this film." in text
    plain = encode_prompt(tiny_tokenizer, "Review this film.", TokenizeConfig(chat_template="auto"))
    assert "<|im_start|>" not in tiny_tokenizer.decode(plain)


def test_fit_lengths_shortens_the_prompt_first_keeping_its_end():
    config = TokenizeConfig(max_prompt_length=3, max_length=6)
    prompt, (a, b) = fit_lengths(list(range(10)), [[100, 101], [200, 201, 202, 203, 204]], config)
    assert prompt == [7, 8, 9]
    assert a == [100, 101] and b == [200, 201, 202]
    keep_start = TokenizeConfig(max_prompt_length=3, max_length=6, truncation_side="keep_start")
    assert fit_lengths(list(range(10)), [[1]], keep_start)[0] == [0, 1, 2]
    assert fit_lengths([1, 2], [[3]], config) == ([1, 2], [[3]])  # fits: unchanged


def test_overlong_rows_can_be_skipped_or_rejected():
    with pytest.raises(OverlongError, match="pairs.jsonl: row 4.*max_length=6"):
        fit_lengths(list(range(10)), [[1]], TokenizeConfig(max_prompt_length=3, max_length=6, on_overlong="error"),
                    "pairs.jsonl: row 4")
    assert fit_lengths(list(range(10)), [[1]], TokenizeConfig(max_prompt_length=3, max_length=6, on_overlong="skip")) is None


def test_encode_pairs_counts_truncation_and_drops_pairs_made_identical(tiny_tokenizer):
    pairs = [PreferencePair("A short prompt", " good", " bad", source="f: row 1"),
             PreferencePair("word " * 40, " same start then good", " same start then bad", source="f: row 2")]
    config = TokenizeConfig(max_prompt_length=8, max_length=11)
    encoded, counts = encode_pairs(tiny_tokenizer, pairs, config)
    assert counts["truncated"] == 1
    assert counts["skipped_identical_after_truncation"] == 1  # only "same start" survived in both
    assert len(encoded) == 1 and encoded[0].source == "f: row 1"


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="max_prompt_length"):
        TokenizeConfig(max_prompt_length=10, max_length=5).validate()
    with pytest.raises(ValueError, match="on_overlong"):
        TokenizeConfig(on_overlong="drop").validate()

"""Model loading (shipped SmolLM2, tiny Llama) and the gold scorers, with real weights."""

from __future__ import annotations

import pytest
import torch

from actors.models import load_causal_lm, load_tokenizer
from actors.scorers import build_scorer


def test_smollm2_loads_offline_with_a_separate_pad_token():
    tokenizer = load_tokenizer("smollm2")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.eos_token == "<|im_end|>"
    model = load_causal_lm("smollm2")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert not model.training
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0][ids["input_ids"].shape[1]:])


def test_tiny_model_is_identical_on_every_load():
    a, b = load_causal_lm("tiny"), load_causal_lm("tiny")
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    assert a.config.num_hidden_layers == 2


def test_vader_scorer_orders_sentiment_and_is_deterministic():
    scorer = build_scorer("vader")
    scores = scorer(["This movie was"] * 2, [" wonderful and moving.", " a boring, awful mess."], [[1], [2]])
    assert scores[0] > 0.5 and scores[1] < -0.5
    assert scorer(["This movie was"], [" fine."], [[1]]) == scorer(["This movie was"], [" fine."], [[1]])


def test_token_frequency_scorer():
    scorer = build_scorer("token-frequency:7")
    assert scorer(["", ""], ["", ""], [[7, 7, 1, 2], []]) == [0.5, 0.0]
    ranged = build_scorer("token-frequency:0-9")
    assert ranged(["", ""], ["", ""], [[7, 70, 1, 2], [10]]) == [0.75, 0.0]


def test_hf_classifier_scorer_reads_the_positive_label(tmp_path):
    """A real sequence classifier saved locally (random weights) goes through the same code as a hub id."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = load_tokenizer("tiny")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=2,
                         id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1},
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    scorer = build_scorer(f"hf-classifier:{tmp_path}")
    scores = scorer(["A film", "Another"], [" that I liked.", " that I did not like."], [[1], [2]])
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)
    negative = build_scorer(f"hf-classifier:{tmp_path}@NEGATIVE")
    flipped = negative(["A film", "Another"], [" that I liked.", " that I did not like."], [[1], [2]])
    assert [a + b for a, b in zip(scores, flipped)] == pytest.approx([1.0, 1.0], abs=1e-5)


def test_hf_reward_scorer_returns_the_single_logit_of_the_pair(tmp_path):
    """A one-logit reward model (random weights, saved locally) scores (prompt, response) as a text pair."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = load_tokenizer("tiny")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    scorer = build_scorer(f"hf-reward:{tmp_path}")
    prompts, responses = ["A film", "Another one"], [" that I liked.", " that I did not like at all."]
    scores = scorer(prompts, responses, [[1], [2]])
    with torch.no_grad():
        expected = [float(model(**tokenizer(p, r, return_tensors="pt")).logits[0, 0]) for p, r in zip(prompts, responses)]
    assert scores == pytest.approx(expected, abs=1e-4)  # batched with padding = one at a time
    with pytest.raises(ValueError, match="labels"):
        build_scorer(f"hf-classifier:{tmp_path}")  # a reward model has no positive label to read


@pytest.mark.parametrize("spec, message", [("sentiment", "unknown scorer"), ("token-frequency:x", "token id"),
                                           ("hf-classifier:", "needs a model"), ("hf-reward:", "needs a model")])
def test_bad_scorer_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        build_scorer(spec)

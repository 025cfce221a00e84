"""The demo model folder: loadable by transformers, deterministic, tokenizer sized to the vocab."""

from __future__ import annotations

import hashlib

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from peer.demo_model import (
    EOS_ID,
    IM_END_ID,
    MARKER,
    SPECIAL_TOKENS,
    create_demo_model,
    ensure_demo_model,
    model_config,
)


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True, scope="module")
def _quiet_transformers():
    """No "Loading weights" progress bars in test output; restored for other modules."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    yield
    if enabled:
        hf_logging.enable_progress_bar()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return create_demo_model(tmp_path_factory.mktemp("demo") / "model", seed=0)


def test_same_seed_same_bytes_other_seed_other_weights(demo, tmp_path):
    again = create_demo_model(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert digest(again / name) == digest(demo / name), name
    other = create_demo_model(tmp_path / "other", seed=1)
    assert digest(other / "model.safetensors") != digest(demo / "model.safetensors")


def test_loads_with_transformers_and_tokenizer_covers_the_vocab(demo):
    model = AutoModelForCausalLM.from_pretrained(demo)
    tokenizer = AutoTokenizer.from_pretrained(demo)
    assert model.config.vocab_size == len(tokenizer) == 1024
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert model.generation_config.eos_token_id == [EOS_ID, IM_END_ID]
    # Every id decodes to something, padding ids included.
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    assert all(texts)
    text = "The lighthouse keeper baked bread, café ☕ 42!"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_chat_template_is_chatml_with_generation_prompt(demo):
    tokenizer = AutoTokenizer.from_pretrained(demo)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]},
        {"role": "assistant", "content": None},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\n<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [1, 3]  # <s> <|im_start|> as single special tokens
    without = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=False)
    assert not without.endswith("assistant\n")


def test_ensure_reuses_a_complete_folder_and_replaces_a_half_written_one(tmp_path):
    overrides = {"num_hidden_layers": 1, "hidden_size": 64, "num_attention_heads": 2, "vocab_size": 300}
    first = ensure_demo_model(tmp_path, preset="tiny", **overrides)
    assert (first / MARKER).is_file()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_model(tmp_path, preset="tiny", **overrides) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    (first / MARKER).unlink()  # as if a writer had crashed before the end
    assert ensure_demo_model(tmp_path, preset="tiny", **overrides) == first
    assert (first / MARKER).is_file()
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no staging folders left


def test_presets_and_validation(tmp_path):
    with torch.device("meta"):
        bench = LlamaForCausalLM(LlamaConfig(**model_config("bench")))
    assert 150e6 < sum(p.numel() for p in bench.parameters()) < 160e6
    with pytest.raises(ValueError, match="preset"):
        model_config("huge")
    with pytest.raises(ValueError, match="vocab_size"):
        create_demo_model(tmp_path / "small", vocab_size=100)
    assert not (tmp_path / "small").exists()

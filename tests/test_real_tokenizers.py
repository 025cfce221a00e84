"""Real tokenizers of six families through the gateway and two real peers, with the OpenAI SDK.

The tokenizers are llama.cpp's vocab-only GGUFs converted once (`tests.real_tokenizers`; fetched
by the test setup). Each family's test model is a small random model of that family
(`peer.demo_families`) with its vocabulary sized to the real one, whose weights are then set so
that greedy decoding writes one known reply: each block's output projections are scaled down to
1% (the blocks still run and still count, but the residual stream stays close to the current
token's embedding) and the LM-head row of each reply token is pointed at the embedding of the
token before it, a chain from the prompt's last token through the reply to the family's
end-of-turn token. So the model really generates the reply through the swarm, and the test can
ask for what a random model never writes: a tool call in the family's format, and multi-byte text
whose characters are split across tokens. Every reply token is distinct (a chain needs it).

Checked per family: the gateway renders the real chat template (prompt token count equal to
transformers' `apply_chat_template`), generation stops at the end-of-turn id, the text equals
transformers' greedy output decoded by the same tokenizer, streamed chunks never carry a broken
character and join to the same text, and, for the tool formats (Llama 3.1 JSON, Hermes/Qwen,
Mistral), the reply comes back as `tool_calls` with and without streaming.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from peer.demo_families import family_config
from tests.real_tokenizers import VOCABS, load_tokenizer, tokenizer_folder
from tests.test_gateway_handlers import MODEL, app_in_process, in_process_peers

CALL = {"name": "get_weather", "arguments": {"cities": ["東京🌧"]}}
REPLIES = {  # the text each test model writes; a tool call in its family's format where it has one
    "llama3": '{"name":"get_weather","parameters":{"cities":["東京🌧"]}}',
    "qwen2": '<tool_call>{"name":"get_weather","arguments":{"cities":["東京🌧"]}}</tool_call>',
    "mistral": '[TOOL_CALLS][{"name":"get_weather","arguments":{"cities":["東京🌧"]}}]',
    "phi3": "東京は雨🌧です",
    "deepseek": "東京は雨🌧です",
    "falcon": "東京は雨🌧です",
}
TOOL_FORMATS = {"llama3": "llama3_json", "qwen2": "hermes", "mistral": "mistral"}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in some cities",
            "parameters": {
                "type": "object",
                "properties": {"cities": {"type": "array", "items": {"type": "string"}}},
                "required": ["cities"],
            },
        },
    }
]
MESSAGES = [{"role": "user", "content": "東京の天気は？ 🌂"}]
OUT_PROJECTIONS = re.compile(r"(o_proj|down_proj|self_attention\.dense|dense_4h_to_h)\.(weight|bias)$")


def chain_model(path: Path, name: str):  # noqa: ANN201
    """The family's test model writing `REPLIES[name]` after `MESSAGES`; (folder, reply ids,
    tokenizer)."""
    vocab = VOCABS[name]
    source = tokenizer_folder(name)
    tokenizer = load_tokenizer(name)
    end = tokenizer.convert_tokens_to_ids(vocab.end_of_turn)
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    last = tokenizer.encode(prompt, add_special_tokens=False)[-1]
    reply = tokenizer.encode(REPLIES[name], add_special_tokens=False)
    chain = [last, *reply, end]
    if len(set(chain)) != len(chain):
        raise ValueError(f"{name}: the reply's tokens repeat, a chain cannot write it: {chain}")
    config = family_config(
        vocab.arch, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if OUT_PROJECTIONS.search(param_name):
                param.mul_(0.01)
        embedding = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        for before, after in zip(chain, chain[1:], strict=False):
            row = embedding[before]
            head[after] += 4 * (row - row.mean()) / row.std()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = sorted({tokenizer.eos_token_id, end})
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    for file in source.iterdir():
        shutil.copy(file, path / file.name)
    return path, reply, tokenizer


def reference_text(model_dir: Path, tokenizer, prompt_ids: list[int]) -> str:
    """transformers' greedy reply, stopped at the end-of-turn / EOS ids, decoded."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=64)
    ids = out[0, len(prompt_ids) :].tolist()
    stops = set(model.generation_config.eos_token_id)
    assert ids[-1] in stops, f"transformers did not stop: {ids}"
    return tokenizer.decode(ids[:-1], skip_special_tokens=True)


@pytest.mark.parametrize("name", list(REPLIES))
async def test_real_tokenizer_through_the_swarm(name, tmp_path):
    model_dir, reply_ids, tokenizer = chain_model(tmp_path / name, name)
    prompt_ids = tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    expected = reference_text(model_dir, tokenizer, prompt_ids)
    assert expected == tokenizer.decode(reply_ids, skip_special_tokens=True)
    if name not in TOOL_FORMATS:  # the multi-byte reply really splits characters across tokens
        assert any("\ufffd" in tokenizer.decode([token]) for token in reply_ids)

    async with (
        in_process_peers(model_dir, cache_tokens=4096) as peers,
        app_in_process(peers, model_dir) as (client, _, _, app),
    ):
        sdk = openai.AsyncOpenAI(base_url="http://gateway/v1", api_key="unused", http_client=client)
        served = next(iter(app.state.gateway.models.values()))
        assert served.tool_format == TOOL_FORMATS.get(name, "hermes")

        answer = await sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=64)
        choice = answer.choices[0]
        assert (choice.message.content, choice.finish_reason) == (expected, "stop")
        assert answer.usage.prompt_tokens == len(prompt_ids)
        assert answer.usage.completion_tokens == len(reply_ids) + 1  # the end-of-turn token

        stream = await sdk.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=64, stream=True)
        chunks = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices]
        texts = [text for text in chunks if text]
        assert "".join(texts) == expected
        assert not any("\ufffd" in text for text in texts), texts

        if name in TOOL_FORMATS:
            await check_tool_calls(sdk)


async def check_tool_calls(sdk: openai.AsyncOpenAI) -> None:
    answer = await sdk.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=64)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (CALL["name"], CALL["arguments"])

    stream = await sdk.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=64, stream=True
    )
    calls, finish = [], None
    async for chunk in stream:
        if chunk.choices:
            calls += chunk.choices[0].delta.tool_calls or []
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (CALL["name"], CALL["arguments"])
    ]

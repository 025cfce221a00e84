"""A real tokenizer through real processes: the DHT, two peers with an uneven split and the
gateway, with the OpenAI SDK as client. The Mistral-format model of tests/test_real_tokenizers.py
(Llama 2's SentencePiece vocabulary, where an emoji is four byte-fallback tokens, and the
`[TOOL_CALLS]` control token): the streamed text is transformers' reply with no broken character
in any chunk, generation stops at `</s>`, and with tools the reply is one streamed tool call."""

from __future__ import annotations

import json

import openai
import pytest

from tests.test_real_tokenizers import CALL, MESSAGES, TOOLS, chain_model, reference_text

pytestmark = pytest.mark.slow


def test_mistral_tokenizer_through_peer_processes(make_swarm, tmp_path):
    model_dir, reply_ids, tokenizer = chain_model(tmp_path / "mistral", "mistral")
    prompt_ids = tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    expected = reference_text(model_dir, tokenizer, prompt_ids)

    local = make_swarm(model_dir, model_name="m")
    local.start_dht()
    local.start_peers([(0, 1), (1, 4)], "--threads", "1")
    gateway = local.start_gateway()
    client = openai.OpenAI(base_url=f"{gateway.address}/v1", api_key="unused", max_retries=0)

    stream = client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=64, stream=True, stream_options={"include_usage": True}
    )
    texts, finish, usage = [], None, None
    for chunk in stream:
        usage = chunk.usage or usage
        if chunk.choices:
            texts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(texts) == expected and finish == "stop"
    assert not any("\ufffd" in text for text in texts), texts
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt_ids), len(reply_ids) + 1)

    stream = client.chat.completions.create(
        model="m", messages=MESSAGES, tools=TOOLS, max_tokens=64, stream=True
    )
    calls, finish = [], None
    for chunk in stream:
        if chunk.choices:
            calls += chunk.choices[0].delta.tool_calls or []
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (CALL["name"], CALL["arguments"])
    ]

"""Request validation and the exact JSON shape of responses (gateway.protocol).

Shapes are checked key for key, and also parsed with the openai SDK's own types, since
that SDK is what most clients run.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai._models import construct_type
from openai.types import Completion as SDKCompletion
from openai.types import Model as SDKModel
from openai.types.chat import ChatCompletion as SDKChatCompletion
from openai.types.chat import ChatCompletionChunk as SDKChatCompletionChunk
from pydantic import ValidationError

from gateway import protocol as p


def chat(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
    body.update(fields)
    return body


def error_locs(exc: ValidationError) -> list[str]:
    return [".".join(str(x) for x in err["loc"]) for err in exc.errors()]


def assert_invalid(model: type, body: dict[str, Any], loc_prefix: str) -> None:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    locs = error_locs(info.value)
    assert any(loc.startswith(loc_prefix) for loc in locs), locs


# --- chat requests ---------------------------------------------------------------------------


def test_chat_request_minimal_defaults() -> None:
    req = p.ChatCompletionRequest.model_validate(chat())
    assert req.temperature == 1.0 and req.top_p == 1.0 and req.n == 1
    assert req.stream is False and req.include_usage is False
    assert req.effective_max_tokens() is None and req.effective_max_tokens(100) == 100
    assert req.stop_sequences() == [] and req.logit_bias_ids() == {}
    assert req.effective_tool_choice() == "none"
    assert req.unknown_fields() == []


def test_chat_request_full() -> None:
    body = chat(
        messages=[
            {"role": "system", "content": "sys"},
            {"role": "developer", "content": "dev"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                "name": "bob",
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "content": "42", "tool_call_id": "call_1"},
        ],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=10,
        max_completion_tokens=20,
        temperature=0.5,
        top_p=0.9,
        n=2,
        stop=["\n", "END"],
        seed=1234,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias={"42": -100, "7": 5.5},
        logprobs=True,
        top_logprobs=5,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        tool_choice={"type": "function", "function": {"name": "f"}},
        parallel_tool_calls=False,
        user="u",
        top_k=40,
        min_p=0.05,
        repetition_penalty=1.1,
        ignore_eos=True,
        chat_template_kwargs={"enable_thinking": False},
    )
    req = p.ChatCompletionRequest.model_validate(body)
    assert req.include_usage is True
    assert req.effective_max_tokens() == 20
    assert req.stop_sequences() == ["\n", "END"]
    assert req.logit_bias_ids() == {42: -100.0, 7: 5.5}
    assert req.response_format is not None and req.response_format.json_schema is not None
    assert req.response_format.json_schema.json_schema == {"type": "object"}
    assert isinstance(req.effective_tool_choice(), p.NamedToolChoice)
    assert req.unknown_fields() == []
    msgs = req.template_messages()
    assert msgs[2] == {"role": "user", "content": "a\nb", "name": "bob"}
    assert msgs[3]["content"] == "" and msgs[3]["tool_calls"][0]["function"]["name"] == "f"
    assert msgs[4] == {"role": "tool", "content": "42", "tool_call_id": "call_1"}
    assert req.template_tools() == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    ]


def test_max_tokens_fallback_and_single_stop() -> None:
    req = p.ChatCompletionRequest.model_validate(chat(max_tokens=7, stop="###"))
    assert req.effective_max_tokens(100) == 7
    assert req.stop_sequences() == ["###"]
    assert p.ChatCompletionRequest.model_validate(chat(stop=["", "x"])).stop_sequences() == ["x"]


def test_null_means_default() -> None:
    req = p.ChatCompletionRequest.model_validate(
        chat(temperature=None, top_p=None, n=None, stream=None, logprobs=None, max_tokens=None)
    )
    assert req.temperature == 1.0 and req.top_p == 1.0 and req.n == 1
    assert req.stream is False and req.logprobs is False and req.max_tokens is None


def test_unknown_fields_are_collected() -> None:
    body = chat(store=True, metadata={"a": 1}, service_tier="auto")
    body["messages"][0]["refusal"] = None
    req = p.ChatCompletionRequest.model_validate(body)
    assert sorted(req.unknown_fields()) == ["messages.0.refusal", "metadata", "service_tier", "store"]


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": None}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages.0.content",
        ),
        ({"messages": "hello"}, "messages"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": p.MAX_N + 1}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"-1": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stop": ["x"] * (p.MAX_STOP_SEQUENCES + 1)}, "stop"),
        ({"seed": 2**64}, "seed"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
        ),
        ({"tools": [{"type": "function", "function": {}}]}, "tools.0.function.name"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
    ],
)
def test_chat_request_invalid(fields: dict[str, Any], loc: str) -> None:
    assert_invalid(p.ChatCompletionRequest, chat(**fields), loc)


def test_missing_messages() -> None:
    assert_invalid(p.ChatCompletionRequest, {"model": "m"}, "messages")


def test_assistant_content_may_be_null_and_model_optional() -> None:
    req = p.ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]}
    )
    assert req.model is None and req.messages[1].text() == ""


def test_logprobs_with_zero_top_logprobs_is_fine() -> None:
    req = p.ChatCompletionRequest.model_validate(chat(top_logprobs=0))
    assert req.top_logprobs == 0


# --- completion requests ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("hello", ["hello"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_completion_prompt_forms(prompt: Any, expected: list[Any]) -> None:
    req = p.CompletionRequest.model_validate({"model": "m", "prompt": prompt})
    assert req.prompts() == expected
    assert req.max_tokens == 16 and req.effective_max_tokens() == 16


def test_completion_request_full_and_nulls() -> None:
    req = p.CompletionRequest.model_validate(
        {
            "model": "m",
            "prompt": "def f(",
            "suffix": "\n    return x",
            "echo": True,
            "max_tokens": None,
            "temperature": 0.2,
            "stream": True,
            "presence_penalty": 0.1,
            "logprobs": 3,
            "n": 2,
            "best_of": 2,
            "stop": ["\n\n"],
            "unknown_knob": 1,
        }
    )
    # As in vLLM, an explicit null max_tokens means "up to the context window".
    assert req.max_tokens is None and req.effective_max_tokens(500) == 500
    assert req.unknown_fields() == ["unknown_knob"]
    assert req.best_of == 2 and req.logprobs == 3


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": [1, -2]}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"logprobs": 6}, "logprobs"),
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"n": 1, "best_of": 3}, "best_of"),  # best_of > n is not implemented: refused, not ignored
        ({"max_tokens": -1}, "max_tokens"),
        ({"echo": "maybe"}, "echo"),
    ],
)
def test_completion_request_invalid(fields: dict[str, Any], loc: str) -> None:
    body = {"model": "m", "prompt": "x"}
    body.update(fields)
    assert_invalid(p.CompletionRequest, body, loc)


def test_completion_prompt_required() -> None:
    assert_invalid(p.CompletionRequest, {"model": "m"}, "prompt")


# --- responses -------------------------------------------------------------------------------


def roundtrip(model: Any) -> dict[str, Any]:
    data = json.loads(model.model_dump_json())
    assert data == model.model_dump(mode="json")
    return data


def test_chat_completion_response_shape() -> None:
    resp = p.ChatCompletionResponse(
        model="m",
        choices=[
            p.ChatCompletionChoice(index=0, message=p.ChatMessage(content="Hello"), finish_reason="stop")
        ],
        usage=p.Usage.of(5, 1),
    )
    data = roundtrip(resp)
    assert set(data) == {"id", "object", "created", "model", "choices", "usage", "system_fingerprint"}
    assert data["id"].startswith("chatcmpl-") and data["object"] == "chat.completion"
    choice = data["choices"][0]
    assert choice == {
        "index": 0,
        "message": {"role": "assistant", "content": "Hello", "refusal": None},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert data["usage"] == {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    sdk = SDKChatCompletion.model_validate(data)
    assert sdk.choices[0].message.content == "Hello"


def test_chat_response_with_tool_calls_and_logprobs() -> None:
    logprobs = p.ChatCompletionLogprobs(
        content=[
            p.ChatCompletionTokenLogprob(
                token="Hi",
                logprob=-0.1,
                bytes=[72, 105],
                top_logprobs=[p.TopLogprob(token="Hi", logprob=-0.1, bytes=[72, 105])],
            )
        ]
    )
    message = p.ChatMessage(
        content=None, tool_calls=[p.ToolCall(function=p.FunctionCall(name="f", arguments='{"a":1}'))]
    )
    choice = p.ChatCompletionChoice(index=0, message=message, logprobs=logprobs, finish_reason="tool_calls")
    data = roundtrip(choice)
    assert data["message"]["content"] is None
    call = data["message"]["tool_calls"][0]
    assert set(call) == {"id", "type", "function"} and call["id"].startswith("call_")
    assert data["logprobs"] == {
        "content": [
            {
                "token": "Hi",
                "logprob": -0.1,
                "bytes": [72, 105],
                "top_logprobs": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105]}],
            }
        ]
    }


def test_chat_chunk_sequence_shape() -> None:
    stream = p.ChatChunkStream("m", system_fingerprint="fp_x")
    role = json.loads(stream.role())
    content = json.loads(stream.content("Hel"))
    finish = json.loads(stream.finish("length"))
    usage = json.loads(stream.usage(p.Usage.of(3, 2)))
    for chunk in (role, content, finish, usage):
        assert chunk["id"] == stream.id and chunk["id"].startswith("chatcmpl-")
        assert chunk["object"] == "chat.completion.chunk" and chunk["created"] == stream.created
        assert chunk["system_fingerprint"] == "fp_x"
        SDKChatCompletionChunk.model_validate(chunk)
    assert role["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    assert "usage" not in role
    assert content["choices"][0]["delta"] == {"content": "Hel"}
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
    }


def test_chat_chunk_tool_call_delta() -> None:
    stream = p.ChatChunkStream("m")
    delta = p.DeltaMessage(
        tool_calls=[
            p.DeltaToolCall(index=0, id="call_1", type="function", function=p.DeltaFunctionCall(name="f"))
        ]
    )
    chunk = json.loads(stream.delta(delta))
    assert chunk["choices"][0]["delta"] == {
        "tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f"}}]
    }
    more = p.DeltaMessage(
        tool_calls=[p.DeltaToolCall(index=0, function=p.DeltaFunctionCall(arguments='{"a"'))]
    )
    assert more.model_dump(mode="json") == {"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]}


def test_completion_response_shape() -> None:
    logprobs = p.CompletionLogprobs(
        tokens=["Hel", "lo"],
        token_logprobs=[None, -0.5],
        top_logprobs=[None, {"lo": -0.5}],
        text_offset=[0, 3],
    )
    resp = p.CompletionResponse(
        model="m",
        choices=[p.CompletionChoice(index=0, text="Hello", logprobs=logprobs, finish_reason="length")],
        usage=p.Usage.of(2, 2),
    )
    data = roundtrip(resp)
    assert set(data) == {"id", "object", "created", "model", "choices", "usage", "system_fingerprint"}
    assert data["id"].startswith("cmpl-") and data["object"] == "text_completion"
    assert set(data["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}
    assert set(data["choices"][0]["logprobs"]) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    # The SDK's strict type says token_logprobs are floats, but OpenAI itself sends null for
    # the first echoed token; the SDK parses responses leniently, as construct_type does.
    sdk = construct_type(type_=SDKCompletion, value=data)
    assert isinstance(sdk, SDKCompletion) and sdk.choices[0].text == "Hello"


def test_completion_chunk_shape() -> None:
    stream = p.CompletionChunkStream("m")
    piece = json.loads(stream.text("def"))
    last = json.loads(stream.finish("stop"))
    usage = json.loads(stream.usage(p.Usage.of(1, 1)))
    for chunk in (piece, last, usage):
        assert chunk["object"] == "text_completion" and chunk["id"] == stream.id
        assert chunk["id"].startswith("cmpl-")
        # finish_reason is null until the last chunk, as OpenAI streams it; the SDK parses
        # stream chunks leniently.
        assert isinstance(construct_type(type_=SDKCompletion, value=chunk), SDKCompletion)
    assert piece["choices"] == [{"index": 0, "text": "def", "logprobs": None, "finish_reason": None}]
    assert "usage" not in piece
    assert last["choices"][0]["finish_reason"] == "stop" and last["choices"][0]["text"] == ""
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 2


def test_model_list_shape() -> None:
    data = roundtrip(p.ModelList(data=[p.ModelCard(id="llama", created=1, owned_by="swarm")]))
    assert data == {
        "object": "list",
        "data": [{"id": "llama", "object": "model", "created": 1, "owned_by": "swarm"}],
    }
    SDKModel.model_validate(data["data"][0])
    with_len = p.ModelCard(id="x", created=1, max_model_len=4096).model_dump(mode="json")
    assert with_len["max_model_len"] == 4096


def test_ids() -> None:
    assert p.new_chat_completion_id().startswith("chatcmpl-")
    assert p.new_completion_id().startswith("cmpl-")
    assert p.new_tool_call_id().startswith("call_") and len(p.new_tool_call_id()) == 29
    assert p.new_chat_completion_id() != p.new_chat_completion_id()


def test_response_models_reject_unknown_fields() -> None:
    with pytest.raises(ValidationError):
        p.Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2, bogus=1)  # type: ignore[call-arg]


def test_openapi_schema_builds() -> None:
    """FastAPI derives the OpenAPI schema from these models; it must not fail."""
    for model in (p.ChatCompletionRequest, p.CompletionRequest):
        assert "properties" in model.model_json_schema()
    for model in (p.ChatCompletionResponse, p.ChatCompletionChunk, p.CompletionResponse, p.ModelList):
        assert "properties" in model.model_json_schema(mode="serialization")


def test_fastapi_response_model_keeps_the_shape() -> None:
    """FastAPI re-serialises returned models itself; omitted keys must stay omitted."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()

    @app.get("/chat", response_model=p.ChatCompletionResponse)
    async def chat_route() -> p.ChatCompletionResponse:
        return p.ChatCompletionResponse(
            model="m",
            choices=[
                p.ChatCompletionChoice(index=0, message=p.ChatMessage(content="x"), finish_reason="stop")
            ],
            usage=p.Usage.of(1, 1),
        )

    @app.get("/models", response_model=p.ModelList)
    async def models_route() -> p.ModelList:
        return p.ModelList(data=[p.ModelCard(id="m", created=1)])

    client = TestClient(app)
    choice = client.get("/chat").json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "x", "refusal": None}
    assert choice["logprobs"] is None
    assert client.get("/models").json()["data"][0] == {
        "id": "m",
        "object": "model",
        "created": 1,
        "owned_by": "swarm",
    }

"""Structured output and tool calling from real client libraries against a running gateway (in front
of conftest's shared `demo_swarm` of real processes, random weights): the openai SDK's
``chat.completions.parse()``, instructor, and a pydantic-ai ``Agent`` with a tool and a structured
``output_type``. Only the constraints make a random model's answers parse."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.conftest import DEMO_MODEL_NAME

MODEL = DEMO_MODEL_NAME
API_KEY = "sk-structured-test"
MESSAGES = [{"role": "user", "content": "Describe a person."}]
pytestmark = pytest.mark.slow


class Verdict(BaseModel):
    reason: str


class Contact(BaseModel):
    name: str = Field(max_length=16)
    email: str | None = None
    age: int | None = Field(default=None, ge=0, le=120)
    tags: list[str] | None = Field(default=None, max_length=2)


class City(BaseModel):
    city: str = Field(max_length=12)
    population: int = Field(ge=0)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                        "unit": {"enum": ["C", "F"]}},
                       "required": ["city", "unit"], "additionalProperties": False},
    },
}  # fmt: skip
ORDER = {
    "type": "function",
    "function": {
        "name": "place_order",
        "parameters": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
                                                        "quantity": {"type": "integer", "minimum": 1}},
                       "required": ["sku", "quantity"], "additionalProperties": False},
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def base_url(demo_gateway) -> str:
    return demo_gateway("structured", "--api-key", API_KEY).address


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0)


def test_sdk_parse_closes_on_the_last_token(client):
    """The string is closed by the constraint on the very last token allowed: `parse()` gets a
    complete answer with `finish_reason: "stop"` (it raised LengthFinishReasonError before)."""
    for max_tokens in (10, 14):
        completion = client.chat.completions.parse(
            model=MODEL, messages=MESSAGES, response_format=Verdict, max_tokens=max_tokens, seed=max_tokens
        )
        choice = completion.choices[0]
        assert completion.usage.completion_tokens == max_tokens
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Verdict)


def test_sdk_required_tool_choice_over_two_tools(client):
    parameters = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, ORDER)}
    chosen = set()
    for seed in range(1, 9):
        response = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Help me."}], tools=[WEATHER, ORDER],
            tool_choice="required", parallel_tool_calls=False, max_tokens=60, seed=seed,
        )  # fmt: skip
        choice = response.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        jsonschema.validate(json.loads(call.function.arguments), parameters[call.function.name])
        chosen.add(call.function.name)
    assert chosen == {"get_weather", "place_order"}


def test_sdk_forced_call_cut_off_is_length_without_wrapper_text(client):
    kwargs = dict(model=MODEL, messages=MESSAGES, tools=[WEATHER, ORDER],
                  tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=4, seed=2)  # fmt: skip
    choice = client.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content is None and not choice.message.tool_calls
    streamed, finishes = "", []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for item in chunk.choices:
            streamed += item.delta.content or ""
            assert not item.delta.tool_calls
            finishes.append(item.finish_reason)
    assert streamed == "" and finishes[-1] == "length"


def test_instructor_with_optional_fields(base_url):
    instructor = pytest.importorskip("instructor")
    client = instructor.from_openai(openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0))
    for seed in (1, 2, 3):
        contact = client.chat.completions.create(
            model=MODEL, response_model=Contact, messages=[{"role": "user", "content": "Extract: Ada, 36."}],
            max_tokens=64, seed=seed, max_retries=0,
        )  # fmt: skip
        assert isinstance(contact, Contact)
    json_mode = instructor.from_openai(
        openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0),
        mode=instructor.Mode.JSON_SCHEMA,
    )
    assert isinstance(
        json_mode.chat.completions.create(model=MODEL, response_model=Contact, messages=MESSAGES, max_tokens=64,
                                          seed=4, max_retries=0),
        Contact,
    )  # fmt: skip


def test_pydantic_ai_agent_with_a_tool_and_structured_output(base_url):
    pytest.importorskip("pydantic_ai")
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel(MODEL, provider=OpenAIProvider(base_url=f"{base_url}/v1", api_key=API_KEY))
    calls: list[str] = []
    # seed 6: the model calls the tool first, then answers through pydantic-ai's output tool (the
    # seed picks the draws, peer.sampling: a change of the sampler may need another seed)
    agent = Agent(model, output_type=City, model_settings={"max_tokens": 64, "seed": 6, "temperature": 1.0})

    @agent.tool_plain
    def lookup_population(city: str) -> int:
        """The population of a city."""
        calls.append(city)
        return 1000

    result = agent.run_sync("What is the biggest city, and how many live there?")
    assert isinstance(result.output, City)
    assert calls and all(isinstance(city, str) for city in calls)
    parts = [type(part).__name__ for message in result.all_messages() for part in message.parts]
    assert parts.count("ToolReturnPart") >= 2  # our tool's result, then the output tool's

"""Pydantic models for every OpenAI request and response the gateway handles.

One model per request and response type, in the style of vLLM's
``entrypoints/openai/protocol.py``: FastAPI validates bodies against them and derives the
OpenAPI schema from them, so the checks live in one place.

Requests
    Unknown fields are accepted (``extra="allow"``) rather than rejected: clients and SDKs
    send fields we do not implement (``store``, ``metadata``, ``service_tier``...), and
    refusing them would break those clients for no gain. :meth:`RequestModel.unknown_fields`
    lists them so the app can log them, as vLLM does.

    An explicit JSON ``null`` for a field that has a non-null default means "use the
    default": several client libraries serialise every unset parameter as ``null``.

    Cross-field rules (``top_logprobs`` needs ``logprobs``, ``stream_options`` needs
    ``stream``...) are field validators on the later field, so a violation is reported
    with that field's name as the error's ``param``.

Responses
    The JSON must match what OpenAI sends, key for key, because clients index into it
    blindly. Fields OpenAI always sends (``logprobs: null`` in a choice, ``finish_reason:
    null`` in a stream chunk, ``content`` in a message) are plain fields; fields OpenAI
    leaves out when empty (everything in a stream ``delta``, ``usage`` on ordinary chunks,
    ``tool_calls`` in a message) use ``exclude_if`` so that ``model_dump`` /
    ``model_dump_json`` drop them when they are ``None`` (FastAPI's response serialisation
    and ``model_dump_json`` both honour it).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway import errors
from protos import swarm_pb2

__all__ = [
    "MAX_N",
    "MAX_STOP_SEQUENCES",
    "MAX_TOP_LOGPROBS",
    "MAX_COMPLETION_LOGPROBS",
    "RequestModel",
    "ResponseModel",
    "TextContentPart",
    "FunctionCallParam",
    "ToolCallParam",
    "ChatMessageParam",
    "FunctionDefinition",
    "ChatCompletionTool",
    "NamedFunction",
    "NamedToolChoice",
    "JsonSchemaSpec",
    "ResponseFormat",
    "StructuredOutputs",
    "StreamOptions",
    "SamplingRequest",
    "ChatCompletionRequest",
    "CompletionRequest",
    "Usage",
    "FunctionCall",
    "ToolCall",
    "ChatMessage",
    "TopLogprob",
    "ChatCompletionTokenLogprob",
    "ChatCompletionLogprobs",
    "ChatCompletionChoice",
    "ChatCompletionResponse",
    "DeltaFunctionCall",
    "DeltaToolCall",
    "DeltaMessage",
    "ChunkChoice",
    "ChatCompletionChunk",
    "CompletionLogprobs",
    "CompletionChoice",
    "CompletionResponse",
    "CompletionChunk",
    "ModelCard",
    "ModelList",
    "ChatChunkStream",
    "CompletionChunkStream",
    "new_chat_completion_id",
    "new_completion_id",
    "new_tool_call_id",
    "now",
]

# Limits. OpenAI allows n up to 128; every choice costs a full generation through the
# swarm, so we cap lower. OpenAI allows 4 stop sequences; vLLM allows any number. We
# allow more than OpenAI (clients such as Continue send 5+) but keep a bound, because the
# stop matcher's per-token cost grows with their number and length.
MAX_N = 16
MAX_STOP_SEQUENCES = 32
MAX_STOP_CHARS = 1024  # per stop sequence; the matcher holds back up to this much text
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
# Bounds on every list of a request. Strings (message content, prompts) are bounded by the body
# limit (`--max-body-bytes`, 4 MiB) and then by the model's context; lists here are bounded so that
# the work per request (choices, tools, bias entries) cannot grow without limit inside that body.
MAX_MESSAGES = 4096
MAX_CONTENT_PARTS = 256
MAX_TOOLS = 128
MAX_TOOL_CALLS = 128  # on one earlier assistant message
MAX_LOGIT_BIAS = 1024  # entries
MAX_PROMPTS = 64  # prompts of one completion request
MAX_CHOICES = 64  # prompts x n
MAX_NAME_CHARS = 256  # tool and function names, message names, `user`
GREEDY_BELOW_TEMPERATURE = 1e-5
MIN_REPETITION_PENALTY = 0.01

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


def _omit_none() -> Any:
    """A ``Field`` default of ``None`` that is left out of the JSON while it is ``None``."""
    return Field(default=None, exclude_if=lambda v: v is None)


# --------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------


class RequestModel(BaseModel):
    """Base of every request model: accepts unknown fields and lets ``null`` mean default."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    #: Fields whose explicit null is meaningful and must not be replaced by the default.
    nullable_fields: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # Clients such as LangChain send every parameter, unset ones as null. Dropping
        # those keys lets the declared default apply instead of forcing every consumer of
        # the model to handle None for, say, temperature.
        if not isinstance(data, dict):
            return data
        drop = []
        for name, field in cls.model_fields.items():
            if field.is_required() or field.default is None or name in cls.nullable_fields:
                continue
            for key in (name, field.alias):
                if key is not None and key in data and data[key] is None:
                    drop.append(key)
        if not drop:
            return data
        return {k: v for k, v in data.items() if k not in drop}

    def unknown_fields(self) -> list[str]:
        """Dotted paths of every field this model (and nested models) did not declare.

        For logging only: the request is still served, ignoring them. Paths look like
        ``store`` or ``messages.0.refusal``.
        """
        found: list[str] = []
        _collect_unknown(self, "", found)
        return found


def _collect_unknown(value: Any, prefix: str, found: list[str]) -> None:
    if isinstance(value, BaseModel):
        for key in value.model_extra or {}:
            found.append(f"{prefix}{key}")
        for name in type(value).model_fields:
            _collect_unknown(getattr(value, name), f"{prefix}{name}.", found)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, (BaseModel, list)):
                _collect_unknown(item, f"{prefix}{i}.", found)


class TextContentPart(RequestModel):
    """``{"type": "text", "text": ...}``, the only content part a text model can use."""

    type: Literal["text"]
    text: str


class FunctionCallParam(RequestModel):
    """The function a previous assistant turn called. ``arguments`` is a JSON string."""

    name: str
    # OpenAI sends a JSON-encoded string; a few clients send the object itself.
    arguments: str | dict[str, Any] = ""


class ToolCallParam(RequestModel):
    """A tool call made by an earlier assistant message, echoed back by the client."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallParam


Role = Literal["system", "developer", "user", "assistant", "tool"]


class ChatMessageParam(RequestModel):
    """One message of ``messages``.

    ``content`` is a string or a list of text parts; the parts are joined with newlines
    (as vLLM does) when the prompt is rendered. ``content`` may be null only on assistant
    messages, which carry ``tool_calls`` instead.
    """

    role: Role
    content: str | list[TextContentPart] | None = Field(default=None, validate_default=True)
    name: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    tool_calls: list[ToolCallParam] | None = Field(default=None, max_length=MAX_TOOL_CALLS)
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _check_content(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            role = info.data.get("role")
            if role is not None and role != "assistant":
                raise ValueError(f"content is required for a message with role '{role}'")
            return value
        if isinstance(value, list):
            if len(value) > MAX_CONTENT_PARTS:
                raise ValueError(f"at most {MAX_CONTENT_PARTS} content parts are allowed")
            for part in value:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind is not None and kind != "text":
                    # A clear message instead of pydantic's union noise: the swarm serves a
                    # text-only model, so images and audio cannot be honoured.
                    raise ValueError(
                        f"content part type '{kind}' is not supported; this model accepts only 'text' parts"
                    )
        return value

    def text(self) -> str:
        """The content as one string (parts joined with newlines, null as empty)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def to_template_dict(self) -> dict[str, Any]:
        """The message as the plain dict chat templates expect (see ``text.render_chat``)."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [call.model_dump(exclude_none=True) for call in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionDefinition(RequestModel):
    """A function the model may call: name, description and JSON-schema parameters."""

    name: str = Field(max_length=MAX_NAME_CHARS)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatCompletionTool(RequestModel):
    """One entry of ``tools``."""

    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(RequestModel):
    """The ``function`` of a named ``tool_choice``."""

    name: str


class NamedToolChoice(RequestModel):
    """``{"type": "function", "function": {"name": ...}}``: force a call to one tool."""

    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaSpec(RequestModel):
    """``response_format.json_schema``. ``schema`` is aliased: it shadows a BaseModel attribute."""

    name: str
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestModel):
    """``{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type 'json_schema' requires 'json_schema'")
        return self


class StructuredOutputs(RequestModel):
    """vLLM's ``structured_outputs``: exactly one of ``json`` (a JSON Schema, or its JSON text),
    ``json_object``, ``regex``, ``choice`` or ``grammar`` (Lark or GBNF); see `gateway.tools`.
    ``json`` is aliased: it shadows a BaseModel attribute."""

    json_schema: dict[str, Any] | str | bool | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class StreamOptions(RequestModel):
    """``stream_options``; ``include_usage`` adds a last chunk with ``usage`` and no choices."""

    include_usage: bool = False


NonNegativeInt = Annotated[int, Field(ge=0)]
LogitBiasValue = Annotated[float, Field(ge=-100, le=100)]


class SamplingRequest(RequestModel):
    """Fields shared by chat and text completions: model, streaming, stops and sampling.

    Field order matters: a cross-field validator can only see fields declared before it.
    """

    # OpenAI requires ``model``; we accept its absence and let the app serve its default
    # model, which makes curl-style use easier and costs clients nothing.
    model: str | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=_INT64_MIN, le=_INT64_MAX)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, LogitBiasValue] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    user: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    # vLLM extensions. top_k <= 0 and min_p == 0 mean "off"; repetition_penalty 1.0 is off.
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    # numerically safe range: logits are divided by it, and 1e-38 made them infinite
    repetition_penalty: float | None = Field(default=None, ge=MIN_REPETITION_PENALTY, le=10.0)
    ignore_eos: bool = False
    # vLLM's structured outputs, and the older guided_* fields (gateway.tools.structured_grammar)
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | bool | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(
        cls, value: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        # OpenAI and vLLM both reject this combination; silently ignoring it would let a
        # client believe it will get usage it never receives.
        if value is not None and info.data.get("stream") is False:
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_limits(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(len(stop) > MAX_STOP_CHARS for stop in stops):
            raise ValueError(f"a stop sequence may be at most {MAX_STOP_CHARS} characters long")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return value
        for key in value:
            try:
                token_id = int(key)
            except ValueError:
                raise ValueError(f"logit_bias keys must be token ids, got '{key}'") from None
            if token_id < 0:
                raise ValueError(f"logit_bias keys must be non-negative token ids, got '{key}'")
        return value

    @property
    def include_usage(self) -> bool:
        """Whether a streamed response must end with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def stop_sequences(self) -> list[str]:
        """``stop`` as a list, empty strings dropped (they would stop before any text)."""
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return [s for s in stops if s]

    def logit_bias_ids(self) -> dict[int, float]:
        """``logit_bias`` keyed by int token id (checked against the vocabulary by
        `to_sampling_params`)."""
        return {int(k): float(v) for k, v in (self.logit_bias or {}).items()}

    def to_sampling_params(
        self, vocab_size: int, *, logprobs: bool, top_logprobs: int
    ) -> swarm_pb2.SamplingParams:
        """The sampling parameters the last span applies (`swarm.proto`, `SamplingParams`).

        Raises `OpenAIError` (400) for a ``logit_bias`` token outside the vocabulary."""
        bias = self.logit_bias_ids()
        for token in bias:
            if token >= vocab_size:
                raise errors.invalid_request(
                    f"logit_bias token id {token} is outside the vocabulary", param="logit_bias"
                )
        message = swarm_pb2.SamplingParams(
            # top_p == 0 keeps no token but the best: greedy (0 means "off" on the wire); so is a
            # temperature too small to divide logits by (vLLM's rule: 1e-45 made them infinite)
            temperature=0.0
            if self.top_p == 0 or self.temperature < GREEDY_BELOW_TEMPERATURE
            else self.temperature,
            top_p=self.top_p,
            top_k=max(0, self.top_k or 0),
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )
        message.logit_bias.update(bias)
        if self.seed is not None:
            message.seed = self.seed % (1 << 64)
        return message


class ChatCompletionRequest(SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessageParam] = Field(min_length=1, max_length=MAX_MESSAGES)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # ``max_tokens`` is deprecated by OpenAI in favour of ``max_completion_tokens``;
    # clients still send either.
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None
    tools: list[ChatCompletionTool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    # Deprecated by OpenAI, still accepted there: mapped onto tools / tool_choice (answered with
    # ``message.function_call`` and ``finish_reason: "function_call"``, as OpenAI does)
    functions: list[FunctionDefinition] | None = None
    function_call: Literal["none", "auto"] | NamedFunction | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs", True):
            raise ValueError("top_logprobs requires logprobs to be true")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_matches_tools(cls, value: Any, info: ValidationInfo) -> Any:
        if "tools" not in info.data:  # tools itself failed validation: reported there
            return value
        tools: list[ChatCompletionTool] | None = info.data["tools"]
        if isinstance(value, NamedToolChoice):
            names = {tool.function.name for tool in tools or []}
            if value.function.name not in names:
                raise ValueError(f"tool_choice names '{value.function.name}', which is not in tools")
        elif value == "required" and not tools:
            raise ValueError("tool_choice 'required' needs at least one tool in tools")
        return value

    @model_validator(mode="after")
    def _functions_as_tools(self) -> ChatCompletionRequest:
        if self.functions is None and self.function_call is None:
            return self
        if self.tools is not None or self.tool_choice is not None:
            raise ValueError("give tools / tool_choice or the deprecated functions / function_call, not both")
        names = {function.name for function in self.functions or []}
        if isinstance(self.function_call, NamedFunction) and self.function_call.name not in names:
            raise ValueError(f"function_call names '{self.function_call.name}', which is not in functions")
        self.tools = [ChatCompletionTool(function=function) for function in self.functions or []] or None
        if isinstance(self.function_call, NamedFunction):
            self.tool_choice = NamedToolChoice(function=self.function_call)
        else:
            self.tool_choice = self.function_call
        return self

    @property
    def legacy_functions(self) -> bool:
        """The request used ``functions``: a call is answered as ``message.function_call``."""
        return self.functions is not None

    def effective_max_tokens(self, default: int | None = None) -> int | None:
        """The requested completion length: ``max_completion_tokens``, else ``max_tokens``,
        else ``default`` (typically what is left of the context window)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        if self.max_tokens is not None:
            return self.max_tokens
        return default

    def effective_tool_choice(self) -> Literal["none", "auto", "required"] | NamedToolChoice:
        """``tool_choice`` with OpenAI's default: ``auto`` when tools are given, else ``none``."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    def template_messages(self) -> list[dict[str, Any]]:
        """``messages`` as plain dicts for :func:`gateway.text.render_chat`."""
        return [message.to_template_dict() for message in self.messages]

    def template_tools(self) -> list[dict[str, Any]] | None:
        """``tools`` as plain dicts for the chat template, or None when there are none."""
        if not self.tools:
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]


PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions`` (legacy text completions, used by editor autocomplete)."""

    # As in vLLM, ``"max_tokens": null`` means "up to the context window", not 16.
    nullable_fields: ClassVar[frozenset[str]] = frozenset({"max_tokens"})

    prompt: PromptInput
    suffix: str | None = None
    echo: bool = False
    # OpenAI's default is 16. 0 is allowed so that ``echo`` + ``logprobs`` can score a
    # prompt without generating (lm-eval-harness does this); the app refuses it without ``echo``.
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value: PromptInput) -> PromptInput:
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt must not be an empty list")
            if isinstance(value[0], (str, list)) and len(value) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts are allowed in one request")
            for item in value:
                if isinstance(item, list):
                    if not item:
                        raise ValueError("prompt must not contain an empty token list")
                    if any(token < 0 for token in item):
                        raise ValueError("prompt token ids must be non-negative")
                elif isinstance(item, int) and item < 0:
                    raise ValueError("prompt token ids must be non-negative")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_covers_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n")
        if value is not None and n is not None and value < n:
            raise ValueError(f"best_of must be greater than or equal to n ({n})")
        # best_of > n means generating extra choices and returning those with the best total
        # logprob: not implemented, so refused rather than silently ignored
        if value is not None and value > (n or 1):
            raise ValueError("best_of greater than n is not supported; use n")
        return value

    @model_validator(mode="after")
    def _choices_bounded(self) -> CompletionRequest:
        # every choice is a generation through the swarm: n per prompt
        if len(self.prompts()) * self.n > MAX_CHOICES:
            raise ValueError(f"prompts x n must be at most {MAX_CHOICES}")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list, each a string or a list of token ids.

        OpenAI returns ``n`` choices per prompt; choice ``i * n + j`` belongs to prompt ``i``.
        """
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def effective_max_tokens(self, default: int | None = None) -> int | None:
        """``max_tokens`` (16 unless given), or ``default`` when the client sent null."""
        return self.max_tokens if self.max_tokens is not None else default


# --------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------


class ResponseModel(BaseModel):
    """Base of every response model. Only ``exclude_if`` fields may disappear from the JSON."""

    model_config = ConfigDict(extra="forbid")


class Usage(ResponseModel):
    """Token counts for one request (all choices together)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        """Build a Usage with ``total_tokens`` filled in."""
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class FunctionCall(ResponseModel):
    """A function the model called; ``arguments`` is a JSON-encoded string."""

    name: str
    arguments: str


class ToolCall(ResponseModel):
    """One tool call in a non-stream assistant message."""

    id: str = Field(default_factory=lambda: new_tool_call_id())
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(ResponseModel):
    """The assistant message of a non-stream choice.

    ``content`` is always present (null when the turn is only tool calls) and so is
    ``refusal`` (always null here), as OpenAI sends them; ``tool_calls`` only when any.
    """

    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = _omit_none()
    function_call: FunctionCall | None = _omit_none()  # the deprecated `functions` request field's answer


class TopLogprob(ResponseModel):
    """One alternative at a position: token text, its logprob and its UTF-8 bytes."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionTokenLogprob(ResponseModel):
    """The logprob of one generated token and its ``top_logprobs`` alternatives."""

    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatCompletionLogprobs(ResponseModel):
    """``choice.logprobs`` of a chat completion: ``{"content": [...]}``."""

    content: list[ChatCompletionTokenLogprob] | None = None


class ChatCompletionChoice(ResponseModel):
    """One non-stream chat choice. ``logprobs`` is present, null unless requested."""

    index: int
    message: ChatMessage
    logprobs: ChatCompletionLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletionResponse(ResponseModel):
    """The body of a non-stream ``/v1/chat/completions`` response."""

    id: str = Field(default_factory=lambda: new_chat_completion_id())
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: now())
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaFunctionCall(ResponseModel):
    """A piece of a streamed function call: the name once, then argument fragments."""

    name: str | None = _omit_none()
    arguments: str | None = _omit_none()


class DeltaToolCall(ResponseModel):
    """A piece of a streamed tool call; ``index`` says which call it extends."""

    index: int
    id: str | None = _omit_none()
    type: Literal["function"] | None = _omit_none()
    function: DeltaFunctionCall | None = _omit_none()


class DeltaMessage(ResponseModel):
    """A stream ``delta``: only the keys that changed.

    First chunk ``{"role": "assistant", "content": ""}``, then ``{"content": "..."}``, and
    ``{}`` on the chunk that carries ``finish_reason``.
    """

    role: Literal["assistant"] | None = _omit_none()
    content: str | None = _omit_none()
    tool_calls: list[DeltaToolCall] | None = _omit_none()
    function_call: DeltaFunctionCall | None = _omit_none()


class ChunkChoice(ResponseModel):
    """One choice of a stream chunk. ``logprobs`` and ``finish_reason`` are always present."""

    index: int
    delta: DeltaMessage
    logprobs: ChatCompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(ResponseModel):
    """One ``chat.completion.chunk`` event. ``usage`` appears only on the usage chunk."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: Usage | None = _omit_none()


class CompletionLogprobs(ResponseModel):
    """Legacy completions logprobs: parallel lists, one entry per token.

    ``top_logprobs`` entries map token text to logprob; the first prompt token (echo) has
    ``None`` in ``token_logprobs`` and ``top_logprobs``.
    """

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(ResponseModel):
    """One text-completion choice, used both in responses and in stream chunks."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(ResponseModel):
    """The body of a non-stream ``/v1/completions`` response."""

    id: str = Field(default_factory=lambda: new_completion_id())
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: now())
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionChunk(ResponseModel):
    """One streamed text-completion event. OpenAI reuses ``object: "text_completion"``."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = _omit_none()


class ModelCard(ResponseModel):
    """One entry of ``GET /v1/models``. ``max_model_len`` is vLLM's extra, omitted if unknown."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: now())
    owned_by: str = "swarm"
    max_model_len: int | None = _omit_none()
    #: Our extra: precisions the live peers serve (``float32``, ``bfloat16``, ``int8`` ...); ask
    #: for one with a ``<model>:<precision>`` model id (see gateway/precision.py).
    precisions: list[str] | None = _omit_none()


class ModelList(ResponseModel):
    """The body of ``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def new_chat_completion_id() -> str:
    """A fresh ``chatcmpl-…`` id."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def new_completion_id() -> str:
    """A fresh ``cmpl-…`` id."""
    return f"cmpl-{uuid.uuid4().hex}"


def new_tool_call_id() -> str:
    """A fresh ``call_…`` id (OpenAI uses 24 alphanumerics)."""
    return f"call_{uuid.uuid4().hex[:24]}"


def now() -> int:
    """Unix seconds, for ``created``."""
    return int(time.time())


class _ChunkStream:
    """The header every chunk of one stream repeats (``id``, ``created``, ``model``,
    ``system_fingerprint``, identical on every chunk as clients expect) and the usage chunk."""

    chunk_type: ClassVar[type[ResponseModel]]
    new_id: ClassVar[Any]  # a function giving the stream's ``id``

    def __init__(
        self,
        model: str,
        *,
        id: str | None = None,
        created: int | None = None,
        system_fingerprint: str | None = None,
    ) -> None:
        self.model = model
        self.id = id or self.new_id()
        self.created = created if created is not None else now()
        self.system_fingerprint = system_fingerprint

    def chunk(self, choices: list, usage: Usage | None = None):
        """A chunk model with this stream's header fields."""
        return self.chunk_type(
            id=self.id,
            created=self.created,
            model=self.model,
            system_fingerprint=self.system_fingerprint,
            choices=choices,
            usage=usage,
        )

    def usage(self, usage: Usage) -> str:
        """The usage chunk sent after all choices finish: ``choices: []``."""
        return self.chunk([], usage=usage).model_dump_json()


class ChatChunkStream(_ChunkStream):
    """The JSON text of every chunk of one streamed chat completion, in OpenAI's order:
    :meth:`role` first for each choice, :meth:`content` per piece of text, :meth:`finish` with the
    reason, then :meth:`usage` when ``include_usage`` was asked for (sse-starlette adds the
    ``data:`` framing)."""

    chunk_type = ChatCompletionChunk
    new_id = staticmethod(new_chat_completion_id)

    def delta(
        self,
        delta: DeltaMessage,
        index: int = 0,
        *,
        logprobs: ChatCompletionLogprobs | None = None,
        finish_reason: FinishReason | None = None,
    ) -> str:
        """Any single-choice chunk (tool-call deltas, for example)."""
        choice = ChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)
        return self.chunk([choice]).model_dump_json()

    def role(self, index: int = 0) -> str:
        """The first chunk of a choice: ``delta: {"role": "assistant", "content": ""}``."""
        return self.delta(DeltaMessage(role="assistant", content=""), index)

    def content(self, text: str, index: int = 0, logprobs: ChatCompletionLogprobs | None = None) -> str:
        """A chunk carrying a piece of generated text."""
        return self.delta(DeltaMessage(content=text), index, logprobs=logprobs)

    def finish(self, finish_reason: FinishReason, index: int = 0) -> str:
        """The last chunk of a choice: empty delta and its ``finish_reason``."""
        return self.delta(DeltaMessage(), index, finish_reason=finish_reason)


class CompletionChunkStream(_ChunkStream):
    """The JSON text of every chunk of one streamed text completion. OpenAI's completion streams
    have no role chunk: each chunk carries ``text`` (possibly empty on the final one) and
    ``finish_reason`` null until the last chunk of a choice."""

    chunk_type = CompletionChunk
    new_id = staticmethod(new_completion_id)

    def text(
        self,
        text: str,
        index: int = 0,
        *,
        logprobs: CompletionLogprobs | None = None,
        finish_reason: FinishReason | None = None,
    ) -> str:
        """A chunk carrying a piece of text, and optionally the choice's ``finish_reason``."""
        choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish_reason)
        return self.chunk([choice]).model_dump_json()

    def finish(self, finish_reason: FinishReason, index: int = 0) -> str:
        """The last chunk of a choice: empty text and its ``finish_reason``."""
        return self.text("", index, finish_reason=finish_reason)

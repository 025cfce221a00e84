from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("data", "dtype", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "logit_bias", "top_logprobs", "logprobs", "penalty_start")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PENALTY_START_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    seed: int
    logit_bias: _containers.ScalarMap[int, float]
    top_logprobs: int
    logprobs: bool
    penalty_start: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., seed: _Optional[int] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., top_logprobs: _Optional[int] = ..., logprobs: _Optional[bool] = ..., penalty_start: _Optional[int] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("session_id", "start_block", "end_block", "max_length", "sampling", "request_id", "wire_dtype", "resume", "resume_tokens")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKENS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    start_block: int
    end_block: int
    max_length: int
    sampling: SamplingParams
    request_id: str
    wire_dtype: str
    resume: bool
    resume_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_id: _Optional[str] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., max_length: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., request_id: _Optional[str] = ..., wire_dtype: _Optional[str] = ..., resume: _Optional[bool] = ..., resume_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("token_ids", "hidden", "position", "sample", "allowed_token_ids", "prompt_logprobs", "pass_id", "allowed_token_mask", "forward", "seq", "forward_timeout_ms", "loop")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PASS_ID_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_TOKEN_MASK_FIELD_NUMBER: _ClassVar[int]
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    FORWARD_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    LOOP_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    hidden: Tensor
    position: int
    sample: bool
    allowed_token_ids: _containers.RepeatedScalarFieldContainer[int]
    prompt_logprobs: int
    pass_id: int
    allowed_token_mask: bytes
    forward: _containers.RepeatedCompositeFieldContainer[Forward]
    seq: int
    forward_timeout_ms: int
    loop: Loop
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., position: _Optional[int] = ..., sample: _Optional[bool] = ..., allowed_token_ids: _Optional[_Iterable[int]] = ..., prompt_logprobs: _Optional[int] = ..., pass_id: _Optional[int] = ..., allowed_token_mask: _Optional[bytes] = ..., forward: _Optional[_Iterable[_Union[Forward, _Mapping]]] = ..., seq: _Optional[int] = ..., forward_timeout_ms: _Optional[int] = ..., loop: _Optional[_Union[Loop, _Mapping]] = ...) -> None: ...

class Loop(_message.Message):
    __slots__ = ("hops", "remaining", "stop_ids", "id")
    HOPS_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    STOP_IDS_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    hops: _containers.RepeatedCompositeFieldContainer[Forward]
    remaining: int
    stop_ids: _containers.RepeatedScalarFieldContainer[int]
    id: int
    def __init__(self, hops: _Optional[_Iterable[_Union[Forward, _Mapping]]] = ..., remaining: _Optional[int] = ..., stop_ids: _Optional[_Iterable[int]] = ..., id: _Optional[int] = ...) -> None: ...

class Forward(_message.Message):
    __slots__ = ("address", "push_id")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PUSH_ID_FIELD_NUMBER: _ClassVar[int]
    address: str
    push_id: str
    def __init__(self, address: _Optional[str] = ..., push_id: _Optional[str] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("push_id", "step", "more")
    PUSH_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    push_id: str
    step: Step
    more: _containers.RepeatedCompositeFieldContainer[PushEntry]
    def __init__(self, push_id: _Optional[str] = ..., step: _Optional[_Union[Step, _Mapping]] = ..., more: _Optional[_Iterable[_Union[PushEntry, _Mapping]]] = ...) -> None: ...

class PushEntry(_message.Message):
    __slots__ = ("push_id", "step")
    PUSH_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    push_id: str
    step: Step
    def __init__(self, push_id: _Optional[str] = ..., step: _Optional[_Union[Step, _Mapping]] = ...) -> None: ...

class PushAck(_message.Message):
    __slots__ = ("code", "message", "more", "batches")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    more: _containers.RepeatedCompositeFieldContainer[PushVerdict]
    batches: bool
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., more: _Optional[_Iterable[_Union[PushVerdict, _Mapping]]] = ..., batches: _Optional[bool] = ...) -> None: ...

class PushVerdict(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class Close(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Halt(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InferenceRequest(_message.Message):
    __slots__ = ("open", "step", "close", "halt")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    HALT_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    step: Step
    close: Close
    halt: Halt
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., step: _Optional[_Union[Step, _Mapping]] = ..., close: _Optional[_Union[Close, _Mapping]] = ..., halt: _Optional[_Union[Halt, _Mapping]] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token_id", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class PromptLogprob(_message.Message):
    __slots__ = ("token_id", "logprob", "top_logprobs")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top_logprobs: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("hidden", "token_id", "logprob", "top_logprobs", "cache_length", "draining", "prompt_logprobs", "pass_id", "forwarded", "forward_error", "forward_error_code", "seq", "error_code", "error_message", "looped", "loop_refused")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CACHE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PASS_ID_FIELD_NUMBER: _ClassVar[int]
    FORWARDED_FIELD_NUMBER: _ClassVar[int]
    FORWARD_ERROR_FIELD_NUMBER: _ClassVar[int]
    FORWARD_ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LOOPED_FIELD_NUMBER: _ClassVar[int]
    LOOP_REFUSED_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    token_id: int
    logprob: float
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    cache_length: int
    draining: bool
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[PromptLogprob]
    pass_id: int
    forwarded: bool
    forward_error: str
    forward_error_code: int
    seq: int
    error_code: int
    error_message: str
    looped: bool
    loop_refused: bool
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ..., token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top_logprobs: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ..., cache_length: _Optional[int] = ..., draining: _Optional[bool] = ..., prompt_logprobs: _Optional[_Iterable[_Union[PromptLogprob, _Mapping]]] = ..., pass_id: _Optional[int] = ..., forwarded: _Optional[bool] = ..., forward_error: _Optional[str] = ..., forward_error_code: _Optional[int] = ..., seq: _Optional[int] = ..., error_code: _Optional[int] = ..., error_message: _Optional[str] = ..., looped: _Optional[bool] = ..., loop_refused: _Optional[bool] = ...) -> None: ...

class Opened(_message.Message):
    __slots__ = ("peer_id", "cache_length", "push_id")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    CACHE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PUSH_ID_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    cache_length: int
    push_id: str
    def __init__(self, peer_id: _Optional[str] = ..., cache_length: _Optional[int] = ..., push_id: _Optional[str] = ...) -> None: ...

class InferenceResponse(_message.Message):
    __slots__ = ("opened", "result")
    OPENED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    opened: Opened
    result: StepResult
    def __init__(self, opened: _Optional[_Union[Opened, _Mapping]] = ..., result: _Optional[_Union[StepResult, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("peer_id", "model", "start_block", "end_block", "num_blocks", "dtype", "quant", "live_sessions", "free_cache_tokens", "throughput", "version", "state", "idle_sessions", "cache_budget_tokens", "tokens_processed", "forward_passes", "steps", "evictions", "prepacked", "pipeline_groups", "batching", "pushed_steps", "pushes_received", "next_rtt_ms", "push_requests_received", "looped_steps")
    class NextRttMsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    END_BLOCK_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    QUANT_FIELD_NUMBER: _ClassVar[int]
    LIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    FREE_CACHE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    THROUGHPUT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    IDLE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    CACHE_BUDGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    PREPACKED_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_GROUPS_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    PUSHED_STEPS_FIELD_NUMBER: _ClassVar[int]
    PUSHES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    NEXT_RTT_MS_FIELD_NUMBER: _ClassVar[int]
    PUSH_REQUESTS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    LOOPED_STEPS_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    model: str
    start_block: int
    end_block: int
    num_blocks: int
    dtype: str
    quant: str
    live_sessions: int
    free_cache_tokens: int
    throughput: float
    version: str
    state: str
    idle_sessions: int
    cache_budget_tokens: int
    tokens_processed: int
    forward_passes: int
    steps: int
    evictions: int
    prepacked: bool
    pipeline_groups: int
    batching: str
    pushed_steps: int
    pushes_received: int
    next_rtt_ms: _containers.ScalarMap[str, float]
    push_requests_received: int
    looped_steps: int
    def __init__(self, peer_id: _Optional[str] = ..., model: _Optional[str] = ..., start_block: _Optional[int] = ..., end_block: _Optional[int] = ..., num_blocks: _Optional[int] = ..., dtype: _Optional[str] = ..., quant: _Optional[str] = ..., live_sessions: _Optional[int] = ..., free_cache_tokens: _Optional[int] = ..., throughput: _Optional[float] = ..., version: _Optional[str] = ..., state: _Optional[str] = ..., idle_sessions: _Optional[int] = ..., cache_budget_tokens: _Optional[int] = ..., tokens_processed: _Optional[int] = ..., forward_passes: _Optional[int] = ..., steps: _Optional[int] = ..., evictions: _Optional[int] = ..., prepacked: _Optional[bool] = ..., pipeline_groups: _Optional[int] = ..., batching: _Optional[str] = ..., pushed_steps: _Optional[int] = ..., pushes_received: _Optional[int] = ..., next_rtt_ms: _Optional[_Mapping[str, float]] = ..., push_requests_received: _Optional[int] = ..., looped_steps: _Optional[int] = ...) -> None: ...

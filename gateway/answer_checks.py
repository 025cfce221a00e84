"""What the gateway checks in every answer a peer gives, and how two answers are compared.

A peer's `StepResult` is network input like any other. Before the gateway forwards a span's hidden
states to the next peer, or hands a sampled token to the client, `malformed` checks it against
what the step asked for: hidden states of a known dtype whose bytes hold exactly `[rows, hidden]`
finite values (a NaN passed on would make the next peer answer INVALID_ARGUMENT, which reads as the
client's fault), and on the last span a token id inside the vocabulary, inside the allowed mask
of a constrained step, with finite logprobs. A malformed answer convicts its sender
(`gateway.failure_policy.BadAnswer`), and the hop fails over like a crashed one.

`hidden_distance` and `tokens_agree` compare a step's answer with its re-execution on a replica
(`gateway.verification`). The gateway has no torch: tensors are read with numpy (bfloat16 is the
upper half of a float32, so it is widened by a shift).

Cost: one pass of numpy over the hidden bytes per hop per step (~2 µs for a decode step of a
1024-wide model, ~1 ms for a 2k-token prefill), small beside the gRPC hop itself.
"""

from __future__ import annotations

import math

import numpy as np

from discovery.records import DTYPE_NAMES
from protos import swarm_pb2

_NUMPY = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
LOGPROB_SLACK = 1e-3  # a log-probability above this is not one (rounding leaves it at <= ~1e-6)


def rows_as_float32(tensor: swarm_pb2.Tensor) -> np.ndarray:
    """The tensor's values as a float32 array of its shape (ValueError when its bytes do not fit)."""
    if tensor.dtype not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {tensor.dtype!r}")
    shape = tuple(int(dim) for dim in tensor.shape)
    if any(dim < 0 for dim in shape):
        raise ValueError(f"negative dimension in shape {list(shape)}")
    kind = np.dtype(_NUMPY[tensor.dtype])
    if len(tensor.data) != math.prod(shape) * kind.itemsize:
        raise ValueError(
            f"{len(tensor.data)} bytes do not hold a {tensor.dtype} tensor of shape {list(shape)}"
        )
    values = np.frombuffer(tensor.data, dtype=kind.newbyteorder("<"))
    if tensor.dtype == "bfloat16":
        values = (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32, copy=False).reshape(shape)


def malformed(
    result: swarm_pb2.StepResult,
    *,
    rows: int,
    hidden_size: int,
    vocab_size: int,
    last: bool,
    sampled: bool,
    wire_dtype: str = "",
    allowed_mask: bytes | None = None,
) -> str | None:
    """Why `result` cannot be the answer to a step of `rows` tokens (None: it can).

    `last`: the hop is the route's last span (no hidden states to pass on); `sampled`: it was asked
    to sample. `hidden_size` / `vocab_size` 0: not checked (a model whose config lacks them). `wire_dtype`: the dtype the gateway asked the peers to send in ("" = any).
    """
    if not last:
        if not result.HasField("hidden"):
            return "no hidden states"
        hidden = result.hidden
        if wire_dtype and hidden.dtype != wire_dtype:
            return f"hidden states in {hidden.dtype!r}, asked for {wire_dtype!r}"
        shape = list(hidden.shape)
        if len(shape) != 2 or shape[0] != rows or (hidden_size and shape[1] != hidden_size):
            return f"hidden states of shape {shape}, expected {[rows, hidden_size or 'hidden']}"
        try:
            values = rows_as_float32(hidden)
        except ValueError as exc:
            return f"hidden states do not decode: {exc}"
        if not np.isfinite(values).all():
            return "hidden states hold NaN or infinity"
        return None
    if not sampled:
        return None
    if result.token_id < 0 or (vocab_size and result.token_id >= vocab_size):
        return f"token id {result.token_id} outside the vocabulary [0, {vocab_size})"
    if allowed_mask and not allowed_mask[result.token_id // 8] >> (result.token_id % 8) & 1:
        return f"token id {result.token_id} is not allowed by the step's constraint"
    if not math.isfinite(result.logprob) or result.logprob > LOGPROB_SLACK:
        return f"logprob {result.logprob} is not a log-probability"
    for alternative in result.top_logprobs:
        if alternative.token_id < 0 or (vocab_size and alternative.token_id >= vocab_size):
            return f"top_logprobs token id {alternative.token_id} outside the vocabulary"
        if not math.isfinite(alternative.logprob) or alternative.logprob > LOGPROB_SLACK:
            return f"top_logprobs logprob {alternative.logprob} is not a log-probability"
    return None


def hidden_distance(answer: swarm_pb2.Tensor, reference: swarm_pb2.Tensor, rows: int) -> float:
    """How far the last `rows` rows of two hidden-state tensors are apart: max |a - b| over max |b|
    (scale-free, so one tolerance per precision fits every model and every block). `inf` when
    they cannot be compared (shapes differ, bytes do not decode)."""
    try:
        a = rows_as_float32(answer)[-rows:]
        b = rows_as_float32(reference)[-rows:]
    except (ValueError, IndexError):
        return math.inf
    if a.shape != b.shape or a.shape[0] != rows:
        return math.inf
    scale = float(np.abs(b).max(initial=0.0))
    return float(np.abs(a - b).max(initial=0.0)) / max(scale, 1e-6)


def tokens_agree(answer: swarm_pb2.StepResult, reference: swarm_pb2.StepResult, margin: float) -> bool:
    """Whether two last-span answers to the same step agree: the same token, or (the reference
    giving both logprobs) a near tie that rounding may break either way: the answer's token is
    among the reference's alternatives within `margin` of the reference's own token."""
    if answer.token_id == reference.token_id:
        return True
    for alternative in reference.top_logprobs:
        if alternative.token_id == answer.token_id:
            return reference.logprob - alternative.logprob <= margin
    return False

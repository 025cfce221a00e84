"""Precision routing: serve a request only through peers of one precision.

A client picks a precision with a model id suffix, ``<model>:<precision>`` (``swarm-demo:int8``).
We chose the suffix over a request extension field because every OpenAI client, editor plugin and
SDK can set ``model`` while few can add arbitrary body fields. A peer's precision is its weight
quantization when it has one, else its compute dtype (``discovery.records.precision_name``):
``float32``, ``bfloat16``, ``float16``, ``int8`` or ``nf4``; ``fp32``/``bf16``/``fp16`` are accepted
as aliases. ``GET /v1/models`` lists the precisions live peers serve in each card's
``precisions`` field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from discovery.records import PRECISIONS, PeerRecord, PeerState

ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "f32": "float32", "f16": "float16"}


def record_precision(record: PeerRecord) -> str:
    return record.precision


def split_model_id(name: str, known: Iterable[str]) -> tuple[str, str | None]:
    """``"swarm-demo:int8"`` -> ``("swarm-demo", "int8")``; an id that is itself known is kept whole.

    Returns ``(name, None)`` when there is no recognised precision suffix, so the caller's normal
    "model does not exist" answer applies.
    """
    if name in known or ":" not in name:
        return name, None
    base, _, suffix = name.rpartition(":")
    precision = ALIASES.get(suffix.lower(), suffix.lower())
    if base in known and precision in PRECISIONS:
        return base, precision
    return name, None


def accepts(precision: str | None) -> Callable[[PeerRecord], bool] | None:
    """A ``plan_route`` predicate keeping only peers of ``precision`` (None: any peer)."""
    if precision is None:
        return None
    return lambda record: record_precision(record) == precision


def precisions(records: Iterable[PeerRecord]) -> list[str]:
    """The precisions live peers of a model serve, in a stable order."""
    live = {record_precision(record) for record in records if record.state == PeerState.ONLINE}
    return [name for name in PRECISIONS if name in live] + sorted(live - set(PRECISIONS))

"""The KV memory budget counts a sliding-window layer's trimmed store, not its full length.

A real peer (in this process, no DHT) of a Mistral model whose every layer has a window, beside
the same weights without windows, with the same budget: sessions are opened through the peer's
own `_open` (what an `OpenSession` runs) until it answers RESOURCE_EXHAUSTED, then each admitted
session is filled to its `max_length` by real forward passes in chunks of the scheduler's pass
size, and the bytes all caches allocate are measured against the budget.
"""

from __future__ import annotations

import uuid

import grpc
import torch

from peer.demo_families import WINDOW, create_family_model
from peer.kv_cache import REWIND_SLACK, KVCache
from peer.server import PeerConfig, PeerServer
from peer.servicer import StepError
from protos import swarm_pb2
from tests.test_gateway_handlers import free_port

LENGTH = 1024  # each session's max_length
STEP = 256  # the scheduler's pass size: the longest prefill chunk
BUDGET = 3 * LENGTH  # room for three full-attention sessions


async def fill_admitted(model_dir) -> tuple[int, int, int]:
    """(sessions admitted, bytes their caches hold when full, bytes the budget stands for)."""
    config = PeerConfig(
        model_dir=model_dir, model_id="m", start=0, end=4, port=free_port(), dht_bootstrap=None,
        cache_tokens=BUDGET, threads=1, max_batch_tokens=STEP,
    )  # fmt: skip
    server = PeerServer(config)
    await server.start()
    try:
        servicer = server.servicer
        servicer.table.open_wait = 0.0
        sessions = []
        while True:
            request = swarm_pb2.OpenSession(
                session_id=uuid.uuid4().hex, start_block=0, end_block=4, max_length=LENGTH
            )
            try:
                session, _ = await servicer._open(request, "client")
            except StepError as exc:
                assert exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                break
            sessions.append(session)
        tokens = torch.randint(9, 320, (LENGTH,), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            for session in sessions:
                for start in range(0, LENGTH, STEP):
                    chunk = tokens[start : start + STEP]
                    servicer.span(chunk, [session.cache], [len(chunk)])
                assert session.cache.length == LENGTH
        held = sum(session.cache.nbytes for session in sessions)
        budget_bytes = BUDGET * sessions[0].cache.bytes_per_token
        for session in sessions:
            servicer._close(session, keep=False)
        return len(sessions), held, budget_bytes
    finally:
        server.config.drain_timeout = 0.0
        await server.stop()


async def test_window_model_admits_more_sessions_within_the_same_budget(tmp_path):
    windowed = create_family_model(tmp_path / "windowed", "mistral")
    full = create_family_model(tmp_path / "full", "mistral", sliding_window=None)

    full_sessions, full_held, budget_bytes = await fill_admitted(full)
    window_sessions, window_held, same_budget = await fill_admitted(windowed)

    assert same_budget == budget_bytes
    assert full_sessions == BUDGET // LENGTH
    assert full_held <= budget_bytes
    # every layer keeps ~WINDOW + 128 positions plus one chunk, not 1024: more than twice as many fit
    assert WINDOW < 16 and window_sessions > 2 * full_sessions
    assert window_held <= same_budget


def test_a_resumed_cache_is_counted_as_its_layers_are_stored():
    """A window longer than a session's first `max_length` is stored at full length; resumed
    with a longer one, that cache can grow to it on every layer, and is counted so."""
    step = STEP
    fresh = KVCache(4, 2, 16, windows=(64,) * 4, max_capacity=LENGTH)
    assert fresh.budget_tokens(LENGTH, step) == 64 - 1 + REWIND_SLACK + step < LENGTH
    first_short = KVCache(4, 2, 16, windows=(64,) * 4, max_capacity=32)
    assert first_short.budget_tokens(LENGTH, step) == LENGTH
    mixed = KVCache(4, 2, 16, windows=(64, 0, 64, 0), max_capacity=LENGTH)
    assert mixed.budget_tokens(LENGTH, step) == (LENGTH + 64 - 1 + REWIND_SLACK + step + 1) // 2

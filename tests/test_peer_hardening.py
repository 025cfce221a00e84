"""No single request, client or abandoned stream takes a peer down.

* Sampling cannot poison a batch: unsafe sampling parameters are refused or made greedy at the
  open, non-finite hidden states are refused at the step, and a session whose own rows go
  non-finite (or whose sampling raises) fails alone while its pass completes for the others.
* Abandoned opens: a session that is not stepped within `first_step_timeout` is closed and its
  cache room released; one client holds at most `max_sessions_per_client` sessions.
* Session ids are capabilities: never logged, and a resume finds only exactly its own cache.

In-process peers (`PeerServer`, no DHT) on 127.0.0.1, driven over gRPC with `common.peer_client`;
the scheduler's isolation is also checked directly, with poison the edge would refuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from types import SimpleNamespace

import grpc
import httpx
import pytest
import pytest_asyncio
import torch

from common.peer_client import ChannelPool, PeerError, PeerSession, peer_info
from peer import tensor_codec
from peer.model import BlockSpan
from peer.sampling import Sampler, SamplingParams
from peer.scheduler import BatchScheduler, StepFailed, StepWork
from peer.server import PeerConfig, PeerServer
from peer.servicer import client_host
from protos import swarm_pb2

MODEL = "m"
LAST = (2, 4)  # the demo model has 4 blocks: this span owns the LM head
FIRST = (0, 2)


async def start_peer(demo_model, span: tuple[int, int], **overrides) -> PeerServer:
    settings = {"cache_tokens": 4096, "threads": 1, **overrides}
    config = PeerConfig(
        model_dir=demo_model,
        model_id=MODEL,
        start=span[0],
        end=span[1],
        port=0,
        dht_bootstrap=None,
        **settings,
    )
    server = PeerServer(config)
    await server.start()
    return server


async def stop_peer(server: PeerServer) -> None:
    server.config.drain_timeout = 0.0
    await server.stop()


@pytest_asyncio.fixture
async def pool():
    channels = ChannelPool()
    yield channels
    await channels.close()


def hidden(rows: int, seed: int, fill: float | None = None) -> swarm_pb2.Tensor:
    """Finite random hidden states of the demo model's width (256), or all `fill`."""
    values = torch.randn(rows, 256, generator=torch.Generator().manual_seed(seed))
    if fill is not None:
        values.fill_(fill)
    return tensor_codec.encode(values, torch.float32)


def open_last(max_length: int = 64, **sampling) -> swarm_pb2.OpenSession:
    return swarm_pb2.OpenSession(
        session_id=uuid.uuid4().hex, start_block=LAST[0], end_block=LAST[1], max_length=max_length,
        sampling=swarm_pb2.SamplingParams(**sampling),
    )  # fmt: skip


async def open_session(pool, address: str, message: swarm_pb2.OpenSession) -> PeerSession:
    session = PeerSession(pool, address)
    await session.open(message)
    return session


async def stream_end(session: PeerSession) -> grpc.StatusCode:
    """Wait for the peer to end `session`'s stream; its status."""
    call = session._call
    try:
        response = await call.read()
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    assert response is grpc.aio.EOF, "the peer sent something unasked"
    return await call.code()


PROMPT = [5, 17, 42]


async def prefill(session: PeerSession, states: int) -> None:
    """PROMPT's hidden states into the last span's cache, nothing sampled; pass id 11 for all, so
    the next steps of every session prefilled here are expected together (peer.batch_window)."""
    await session.step(swarm_pb2.Step(token_ids=PROMPT, hidden=hidden(3, states), position=0, pass_id=11))


async def decode(session: PeerSession, states: int, poison: swarm_pb2.Tensor | None = None) -> int:
    """One decode step that samples; `poison` replaces its hidden state. The sampled token."""
    row = poison if poison is not None else hidden(1, states + 1)
    step = swarm_pb2.Step(token_ids=[7], hidden=row, position=3, sample=True, pass_id=12)
    return (await session.step(step)).token_id


# -- 1. sampling cannot poison a batch ----------------------------------------------------------
@pytest_asyncio.fixture
async def last_peer(demo_model):
    # a long batching window: a pass waits for every session of the previous pass (same pass id),
    # so the two sessions' decode steps below share one forward pass
    server = await start_peer(demo_model, LAST, batch_wait_ms=400)
    yield server
    await stop_peer(server)


async def _co_batched(pool, address: str, good: dict, poisoned: dict, poison=None):
    """The good session (hidden states 1) and the poisoned one (states 3) side by side: their
    decode steps share a pass. Returns (good token, poisoned token or error, passes of the decode)."""
    a = await open_session(pool, address, open_last(**good))
    b = await open_session(pool, address, open_last(**poisoned))
    try:
        await asyncio.gather(prefill(a, states=1), prefill(b, states=3))
        before = await peer_info(pool, address)
        good_token, poisoned_token = await asyncio.gather(
            decode(a, states=1), decode(b, states=3, poison=poison), return_exceptions=True
        )
        after = await peer_info(pool, address)
        return good_token, poisoned_token, after.forward_passes - before.forward_passes
    finally:
        for session in (a, b):
            # PeerSession.close raises InvalidStateError on a stream the peer already ended
            with contextlib.suppress(asyncio.InvalidStateError):
                await session.close()


async def _alone(pool, address: str, states: int, **sampling) -> int:
    session = await open_session(pool, address, open_last(**sampling))
    try:
        await prefill(session, states)
        return await decode(session, states)
    finally:
        await session.close()


async def _still_serving(pool, address: str) -> None:
    await _alone(pool, address, states=9, temperature=0.0)
    info = await peer_info(pool, address)
    deadline = time.monotonic() + 5
    while info.live_sessions and time.monotonic() < deadline:  # closes reach the peer asynchronously
        await asyncio.sleep(0.05)
        info = await peer_info(pool, address)
    assert info.live_sessions == 0


GOOD = {"temperature": 0.8, "seed": 5}


async def test_nan_hidden_state_fails_only_its_own_session(last_peer, pool):
    address = last_peer.address
    expected = await _alone(pool, address, states=1, **GOOD)
    good, poisoned, _ = await _co_batched(
        pool, address, GOOD, {"temperature": 0.8, "seed": 6}, hidden(1, 0, fill=float("nan"))
    )
    assert good == expected, good
    assert isinstance(poisoned, PeerError) and poisoned.code == grpc.StatusCode.INVALID_ARGUMENT, poisoned
    assert "finite" in poisoned.message
    good, poisoned, _ = await _co_batched(
        pool, address, GOOD, {"temperature": 0.8}, hidden(1, 0, fill=float("inf"))
    )
    assert good == expected, good
    assert isinstance(poisoned, PeerError) and poisoned.code == grpc.StatusCode.INVALID_ARGUMENT, poisoned
    await _still_serving(pool, address)


@pytest.mark.parametrize("temperature", [1e-45, 1e-40, 1e-6])
async def test_tiny_temperature_is_greedy_and_harms_no_one(last_peer, pool, temperature):
    address = last_peer.address
    expected = await _alone(pool, address, states=1, **GOOD)
    greedy = await _alone(pool, address, states=3, temperature=0.0)
    good, tiny, passes = await _co_batched(pool, address, GOOD, {"temperature": temperature, "seed": 6})
    assert good == expected, good
    assert tiny == greedy, tiny
    assert passes == 1, "the decode steps did not share a pass"
    await _still_serving(pool, address)


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 1.0, "repetition_penalty": 1e-38},
        {"repetition_penalty": 1e9},
        {"repetition_penalty": -1.0},
        {"repetition_penalty": float("nan")},
        {"temperature": -1.0},
        {"temperature": float("inf")},
        {"temperature": float("nan")},
        {"top_p": 1.5},
        {"top_p": -0.5},
        {"top_p": float("nan")},
        {"min_p": 2.0},
        {"min_p": -0.1},
        {"presence_penalty": 1e30},
        {"frequency_penalty": -1e30},
        {"frequency_penalty": float("inf")},
        {"logit_bias": {3: 1e30}},
        {"logit_bias": {3: float("-inf")}},
        {"top_logprobs": 100000},
    ],
    ids=repr,
)
async def test_unsafe_sampling_parameters_are_refused_at_the_open(last_peer, pool, sampling):
    with pytest.raises(PeerError) as refused:
        await open_session(pool, last_peer.address, open_last(**sampling))
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT, refused.value


def test_sampling_params_ranges():
    assert SamplingParams(temperature=1e-45).greedy and SamplingParams(temperature=9e-6).greedy
    assert not SamplingParams(temperature=1e-5).greedy
    for kwargs in (
        {"repetition_penalty": 1e-38},
        {"repetition_penalty": 101},
        {"presence_penalty": 101},
        {"frequency_penalty": -101},
        {"logit_bias": {1: 100.5}},
    ):
        with pytest.raises(ValueError):
            SamplingParams(**kwargs)
    edge = SamplingParams(
        repetition_penalty=0.01, presence_penalty=-100, logit_bias={1: 100.0}, top_logprobs=20
    )
    assert edge.repetition_penalty == 0.01
    with pytest.raises(ValueError, match="finite"):
        Sampler(SamplingParams()).sample(torch.tensor([0.0, float("nan"), 1.0]))


async def test_scheduler_fails_only_the_session_whose_rows_are_not_finite(demo_model):
    """Poison that the edge refuses, handed to the scheduler directly: NaN hidden states with
    sampling on, and a sampler whose temperature was forced below the greedy threshold."""
    span = BlockSpan.load(demo_model, *LAST)
    scheduler = BatchScheduler(span, max_batch_tokens=64)
    scheduler.start()

    def session(temperature: float, seed: int):
        sampler = Sampler(SamplingParams(temperature=0.8, seed=seed))
        sampler.params.temperature = temperature  # past the validation, as a bug would
        return SimpleNamespace(
            cache=span.new_cache(), sampler=sampler, wire_dtype=torch.float32, history=[], penalty_start=0,
            in_forward=False,
        )  # fmt: skip

    def work(owner, inputs: torch.Tensor, *, prompt_logprobs=None) -> StepWork:
        return StepWork(
            session=owner, inputs=inputs, token_ids=list(range(1, inputs.shape[0] + 1)), sample=True, allowed=None,
            future=asyncio.get_running_loop().create_future(), prompt_logprobs=prompt_logprobs,
        )  # fmt: skip

    states = torch.randn(3, 256, generator=torch.Generator().manual_seed(1))
    nan = torch.full((3, 256), float("nan"))
    try:
        alone = await scheduler.submit(work(session(0.8, 5), states))
        passes = scheduler.steps
        cases = [
            (session(0.8, 6), nan, None),  # NaN rows, sampled
            (session(1e-45, 6), states, None),  # infinite scores after the temperature
            (session(0.8, 6), nan, 2),  # NaN rows, scored (prompt logprobs)
        ]
        for poisoned, inputs, scoring in cases:
            results = await asyncio.gather(
                scheduler.submit(work(session(0.8, 5), states)),
                scheduler.submit(work(poisoned, inputs, prompt_logprobs=scoring)),
                return_exceptions=True,
            )
            good, bad = results
            assert not isinstance(good, BaseException), good
            assert good.token_id == alone.token_id
            assert good.logprob == pytest.approx(alone.logprob, abs=1e-4)  # other row buckets: other kernels
            assert isinstance(bad, StepFailed) and bad.bad_input, bad
            assert scheduler.steps == passes + 1, "the two steps did not share a pass"
            passes = scheduler.steps
        later = await scheduler.submit(work(session(0.8, 5), states))  # the scheduler goes on
        assert later.token_id == alone.token_id
    finally:
        await scheduler.stop()


# -- 2. abandoned opens ---------------------------------------------------------------------------
SESSIONS, LENGTH = 32, 2048


async def test_abandoned_opens_are_closed_and_their_room_released(demo_model, pool):
    server = await start_peer(
        demo_model, FIRST, cache_tokens=SESSIONS * LENGTH, open_wait=0.2, first_step_timeout=1.0
    )
    address = server.address
    hogs: list[PeerSession] = []
    try:
        opens = swarm_pb2.OpenSession(start_block=FIRST[0], end_block=FIRST[1], max_length=LENGTH)
        began = time.monotonic()
        hogs += await asyncio.gather(*(open_session(pool, address, opens) for _ in range(SESSIONS)))
        # the budget is full: a normal session is refused after --open-wait
        with pytest.raises(PeerError) as refused:
            await open_session(pool, address, opens)
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        # within the deadline, the peer ends every stream that never stepped
        ends = await asyncio.gather(*(stream_end(hog) for hog in hogs))
        assert set(ends) == {grpc.StatusCode.DEADLINE_EXCEEDED}, ends
        assert time.monotonic() - began < 5.0
        info = await peer_info(pool, address)
        assert info.live_sessions == 0 and info.free_cache_tokens == SESSIONS * LENGTH
        # a normal session opens and serves, also past the deadline once it has stepped
        normal = await open_session(pool, address, opens)
        first = await normal.step(swarm_pb2.Step(token_ids=PROMPT, position=0))
        await asyncio.sleep(1.5)
        second = await normal.step(swarm_pb2.Step(token_ids=[7], position=3))
        assert first.cache_length == 3 and second.cache_length == 4
        await normal.close()
    finally:
        for hog in hogs:
            hog.abort()
        await stop_peer(server)


@pytest.mark.slow
def test_gateway_serves_again_once_abandoned_opens_expire(make_swarm, demo_model):
    """The issue's scenario through real processes: 32 streams that open 2048 tokens each on a
    peer and never step make the gateway answer 503, until --first-step-timeout closes them."""
    swarm = make_swarm(demo_model, model_name="swarm-demo")
    swarm.start_dht()
    peers = swarm.start_peers(
        [FIRST, LAST], "--threads", "1", "--cache-tokens", str(SESSIONS * LENGTH), "--open-wait", "0.5",
        "--first-step-timeout", "3",
    )  # fmt: skip
    gateway = swarm.start_gateway(None)
    body = {"model": "swarm-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    async def scenario():
        pool, hogs = ChannelPool(), []
        opens = swarm_pb2.OpenSession(start_block=FIRST[0], end_block=FIRST[1], max_length=LENGTH)
        try:
            hogs += await asyncio.gather(
                *(open_session(pool, peers[0].address, opens) for _ in range(SESSIONS))
            )
            async with httpx.AsyncClient(timeout=60) as http:
                blocked = await http.post(f"{gateway.address}/v1/chat/completions", json=body)
                ends = await asyncio.gather(*(stream_end(hog) for hog in hogs))
                # the gateway plans over the peers' DHT records, which show the freed room from
                # the peer's next heartbeat on (1 s here)
                deadline = time.monotonic() + 20
                served = await http.post(f"{gateway.address}/v1/chat/completions", json=body)
                while served.status_code == 503 and time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
                    served = await http.post(f"{gateway.address}/v1/chat/completions", json=body)
            return blocked, ends, served
        finally:
            for hog in hogs:
                hog.abort()
            await pool.close()

    blocked, ends, served = asyncio.run(scenario())
    assert blocked.status_code == 503, blocked.text
    assert set(ends) == {grpc.StatusCode.DEADLINE_EXCEEDED}
    assert served.status_code == 200, served.text
    assert served.json()["usage"]["completion_tokens"] >= 1


def test_peer_flags_and_their_environment_variables(monkeypatch):
    from swarm.cli import build_parser

    args = build_parser().parse_args(["peer", "--model", "m", "--blocks", "0:2"])
    assert (args.first_step_timeout, args.max_sessions_per_client) == (30.0, 1024)
    monkeypatch.setenv("SWARM_PEER_FIRST_STEP_TIMEOUT", "2.5")
    monkeypatch.setenv("SWARM_PEER_MAX_SESSIONS_PER_CLIENT", "64")
    args = build_parser().parse_args(["peer", "--model", "m", "--blocks", "0:2"])
    assert (args.first_step_timeout, args.max_sessions_per_client) == (2.5, 64)
    assert (
        "--first-step-timeout" in build_parser()._subparsers._group_actions[0].choices["peer"].format_help()
    )


async def test_open_that_waited_for_room_still_gets_the_whole_deadline(demo_model, pool):
    """The deadline counts from the `opened` reply, not from the open request."""
    server = await start_peer(demo_model, FIRST, cache_tokens=LENGTH, open_wait=5.0, first_step_timeout=1.0)
    address = server.address
    opens = swarm_pb2.OpenSession(start_block=FIRST[0], end_block=FIRST[1], max_length=LENGTH)
    try:
        hog = await open_session(pool, address, opens)
        waiter = asyncio.create_task(open_session(pool, address, opens))
        assert await stream_end(hog) == grpc.StatusCode.DEADLINE_EXCEEDED  # after ~1 s
        session = await waiter
        await asyncio.sleep(0.6)  # 1.6 s after its open request, 0.6 s after its reply
        result = await session.step(swarm_pb2.Step(token_ids=PROMPT, position=0))
        assert result.cache_length == 3
        await session.close()
    finally:
        await stop_peer(server)


async def test_one_client_holds_at_most_max_sessions_per_client(demo_model, pool):
    server = await start_peer(demo_model, FIRST, max_sessions_per_client=3)
    address = server.address
    opens = swarm_pb2.OpenSession(start_block=FIRST[0], end_block=FIRST[1], max_length=16)
    try:
        held = [await open_session(pool, address, opens) for _ in range(3)]
        with pytest.raises(PeerError) as refused:
            await open_session(pool, address, opens)
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-sessions-per-client" in refused.value.message
        await held.pop().close()
        deadline = time.monotonic() + 5
        while (await peer_info(pool, address)).live_sessions > 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        held.append(await open_session(pool, address, opens))  # room again
        for session in held:
            await session.close()
    finally:
        await stop_peer(server)


def test_client_host_of_grpc_peer_strings():
    assert client_host("ipv4:10.0.0.5:51234") == "10.0.0.5"
    assert client_host("ipv6:[::1]:51234") == "::1"
    assert client_host("ipv6:%5B::1%5D:51234") == "::1"
    assert client_host("unix:/tmp/peer.sock") == "unix:/tmp/peer.sock"
    assert client_host("") == "unknown"


# -- 3. session ids are capabilities --------------------------------------------------------------
async def test_session_ids_are_never_logged_and_resume_only_their_own_cache(demo_model, pool, caplog):
    server = await start_peer(demo_model, FIRST)
    address = server.address
    secret = uuid.uuid4().hex
    tokens = [5, 17, 42, 99, 7]

    def opens(session_id: str, resume: bool = False) -> swarm_pb2.OpenSession:
        return swarm_pb2.OpenSession(
            session_id=session_id, start_block=FIRST[0], end_block=FIRST[1], max_length=32, resume=resume,
            resume_tokens=tokens,
        )  # fmt: skip

    try:
        with caplog.at_level(logging.DEBUG):
            session = await open_session(pool, address, opens(secret))
            await session.step(swarm_pb2.Step(token_ids=tokens, position=0))
            await session.close()
            deadline = time.monotonic() + 5
            while (await peer_info(pool, address)).idle_sessions < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            # a guessed (here: wrong) id finds nothing, even with the right tokens
            for guess in (
                uuid.uuid4().hex,
                secret[:-1] + ("0" if secret[-1] != "0" else "1"),
                secret[:8],
                "",
            ):
                other = PeerSession(pool, address)
                assert (await other.open(opens(guess, resume=True))).cache_length == 0, guess
                await other.close()
            mine = PeerSession(pool, address)
            assert (await mine.open(opens(secret, resume=True))).cache_length == len(tokens)
            await mine.close()
        logged = [
            " ".join([record.getMessage(), *(str(value) for value in vars(record).values())])
            for record in caplog.records
        ]
        assert logged, "the peer logged nothing"
        assert not [line for line in logged if secret in line], "a session id was logged"
        tag = hashlib.sha256(secret.encode()).hexdigest()[:8]
        assert [record for record in caplog.records if getattr(record, "session", None) == tag]
    finally:
        await stop_peer(server)


async def test_short_session_ids_are_not_resumable(demo_model, pool):
    server = await start_peer(demo_model, FIRST)
    address = server.address
    tokens = [5, 17, 42]
    opens = swarm_pb2.OpenSession(session_id="s1", start_block=FIRST[0], end_block=FIRST[1], max_length=32,
                                  resume=True, resume_tokens=tokens)  # fmt: skip
    try:
        session = await open_session(pool, address, opens)
        await session.step(swarm_pb2.Step(token_ids=tokens, position=0))
        await session.close()
        again = PeerSession(pool, address)
        assert (await again.open(opens)).cache_length == 0
        await again.close()
        too_long = PeerSession(pool, address)
        with pytest.raises(PeerError) as refused:
            await too_long.open(
                swarm_pb2.OpenSession(session_id="x" * 200, start_block=0, end_block=2, max_length=8)
            )
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await stop_peer(server)


def test_allowed_token_mask_decodes_and_refuses_malformed_masks():
    """`Step.allowed_token_mask` (what the gateway sends for constrained output: 19 KB instead of
    ~430 KB of ids on a 150k vocabulary) is the same restriction as the id list."""
    import numpy as np

    from peer.servicer import StepError, _allowed_tokens
    from protos import swarm_pb2

    vocab = 1001  # 126 bytes: the last one has 7 bits past the vocabulary
    wanted = [0, 7, 8, 513, 1000]
    bits = np.zeros(vocab, dtype=bool)
    bits[wanted] = True
    mask = np.packbits(bits, bitorder="little").tobytes()
    assert _allowed_tokens(swarm_pb2.Step(allowed_token_mask=mask), vocab).tolist() == wanted
    assert _allowed_tokens(swarm_pb2.Step(allowed_token_ids=wanted), vocab).tolist() == wanted
    assert _allowed_tokens(swarm_pb2.Step(), vocab) is None
    past = bytearray(mask)
    past[-1] |= 0x80  # bit 1007: past the vocabulary
    for step in (
        swarm_pb2.Step(allowed_token_mask=mask[:-1]),  # too short
        swarm_pb2.Step(allowed_token_mask=bytes(len(mask))),  # allows nothing
        swarm_pb2.Step(allowed_token_mask=bytes(past)),
        swarm_pb2.Step(allowed_token_mask=mask, allowed_token_ids=wanted),  # both
        swarm_pb2.Step(allowed_token_ids=[vocab]),
    ):
        with pytest.raises(StepError) as caught:
            _allowed_tokens(step, vocab)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT

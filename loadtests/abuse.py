"""Abuse benchmark: hostile requests and misbehaving peers while a normal client keeps chatting.

    python -m loadtests.abuse [--stall 10] [--first-step-timeout 10] [--step-timeout 4] \\
        [--opens-per-peer 32] [--big-prompts 8] [--big-prompt-bytes 4000000] [--no-redis] \\
        [--output loadtests/results/abuse.json] [--markdown docs/benchmarks-abuse.md]

It starts a local swarm of real processes (`swarm.launcher.LocalSwarm`: one DHT node, spans [0,2)
and [2,4) of the demo model with two replicas each, `--threads 1`, the CLI's heartbeat 5 s and ttl
15 s, `--first-step-timeout 10` so that case 6 is short; a gateway with a real `redis-server` on
a free port when one is installed, else in-memory pins), then runs the cases of the hardening
issue one after the other:

1. poison sampling: temperature 1e-45 and 1e-40 (200, greedy), repetition_penalty 1e-38 (400);
2. a 1 MiB stop string (400);
3. a 50 MiB body sent `Transfer-Encoding: chunked` over a raw socket (413 after a few MiB);
4. eight concurrent 4 MB prompts (400 context length, after tokenizing each);
5. stalled peers: SIGSTOP the peer of the normal client's route for `--stall` s, SIGCONT, then the
   same on its replica;
6. abandoned opens: `--opens-per-peer` `Inference` streams per peer, opened over gRPC and never
   stepped (the peers close them after `--first-step-timeout`);
7. another client (another bearer key, and one with none) reusing a conversation's
   `X-Session-Id`: the conversation's next turn must be what it is without the intruder;
8. NaN / inf hidden states sent over gRPC to the last-span peers in a sampling step
   (INVALID_ARGUMENT).

All the while a "normal" client streams small chat completions (`max_tokens` 16) back to back.
Per case it records the requests tried (abuse + normal), 5xx answers (HTTP, or a server error
event inside a 200 stream; goal 0), peer bans (from the gateway's log and from `/swarm/api`; goal 0
caused by client input; in case 5 they are the point and are reported apart), the normal client's
end-to-end latency (p50 and worst), and the peak RSS (`VmHWM`) of the gateway and of each peer.
Results go to JSON and to a markdown table.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from loadtests.swarm_bench import round1, wait_models, write_results
from swarm.launcher import DEFAULT_CACHE, Child, LocalSwarm, free_port, num_blocks_of

MODEL = "swarm-demo"
PEER_ID = re.compile(r"peer ([0-9a-f]{16}) serving")
BAN_LINE = re.compile(r"banning peer ([0-9a-f]{16})")
SPANS = [(0, 2), (2, 4)]
SERVER_ERROR_TYPES = {"server_error", "unavailable_error", "timeout_error"}


# --------------------------------------------------------------------------------------------
# bookkeeping


@dataclass
class Call:
    """One HTTP request (or gRPC exchange) of a case."""

    kind: str  # "abuse" or "normal"
    what: str
    status: int | str  # HTTP status, or a gRPC status name, or an exception name
    latency_s: float
    server_error: bool = False  # HTTP 5xx, or a server error event inside a 200 stream
    detail: str = ""
    route: list[str] = field(default_factory=list)
    began: float = 0.0  # time.perf_counter()
    ended: float = 0.0


@dataclass
class Case:
    number: int
    name: str
    expected: str
    calls: list[Call] = field(default_factory=list)
    began: float = 0.0
    ended: float = 0.0
    outcome: str = ""
    ok: bool | None = None
    details: dict = field(default_factory=dict)
    ban_events: list[str] = field(default_factory=list)  # peer ids, from the gateway's log
    seen_banned: set[str] = field(default_factory=set)  # peer ids `/swarm/api` showed banned
    stalled: set[str] = field(default_factory=set)  # case 5: the peers that were SIGSTOPped
    peak_rss_kib: dict[str, int] = field(default_factory=dict)

    def abuse(self, what: str, status, latency_s: float, detail: str = "", server_error: bool | None = None,
              route: list[str] | None = None) -> None:  # fmt: skip
        if server_error is None:
            server_error = isinstance(status, int) and status >= 500
        now = time.perf_counter()
        self.calls.append(Call("abuse", what, status, latency_s, server_error, detail[:300], route or [],
                               now - latency_s, now))  # fmt: skip


class State:
    """What the background tasks (normal client, ban monitor) share with the cases."""

    def __init__(self) -> None:
        self.case: Case | None = None  # the case running now (bans seen on /swarm/api go to it)
        self.normal: list[Call] = []  # every normal request; a case takes those overlapping it
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.last_route: list[str] = []
        self.stop = False
        self.ban_offset = 0  # how much of the gateway's log earlier cases read


def vm_hwm_kib(pid: int, field: str = "VmHWM") -> int | None:
    """Peak resident memory of a process (`field` "VmRSS": resident now), KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def error_of(body: bytes | str) -> dict:
    try:
        data = json.loads(body)
    except (ValueError, TypeError):
        return {}
    return data.get("error") or {} if isinstance(data, dict) else {}


# --------------------------------------------------------------------------------------------
# the swarm


@dataclass
class Peer:
    peer_id: str
    child: Child
    span: tuple[int, int]


def peers_of(swarm: LocalSwarm) -> list[Peer]:
    found = []
    for child in swarm.children:
        if not child.name.startswith("peer"):
            continue
        match = PEER_ID.search(child.log())
        args = child.process.args
        start, end = args[args.index("--blocks") + 1].split(":")
        if match:
            found.append(Peer(match.group(1), child, (int(start), int(end))))
    return found


def start_redis(workdir: Path) -> tuple[subprocess.Popen, str] | None:
    """A throwaway redis-server in the foreground (as tests/conftest.py's `RedisServer`)."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(workdir)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return process, f"redis://127.0.0.1:{port}/0"
        time.sleep(0.05)
    process.kill()
    raise TimeoutError("redis-server did not start")


async def swarm_peers(client: httpx.AsyncClient) -> list[dict]:
    response = await client.get("/swarm/api", timeout=10)
    models = response.json()["models"]
    return models[0]["peers"] if models else []


# --------------------------------------------------------------------------------------------
# background: the normal client and the ban monitor


async def sse_lines(response: httpx.Response):
    """The lines of an event stream. Not `aiter_lines`: that splits on every `str.splitlines`
    boundary, and a random model's text may carry U+0085 or U+2028, which JSON and SSE leave raw."""
    buffer = b""
    async for chunk in response.aiter_bytes():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8", errors="replace")
    if buffer:
        yield buffer.rstrip(b"\r").decode("utf-8", errors="replace")


async def normal_client(client: httpx.AsyncClient, state: State, max_tokens: int) -> None:
    """Stream small chat completions back to back (each case takes the ones that overlap it)."""
    turn = 0
    while not state.stop:
        turn += 1
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"Normal request {turn}: tell me about the swarm."}],
            "max_tokens": max_tokens,
            "stream": True,
        }
        state.in_flight += 1
        state.idle.clear()
        began = time.perf_counter()
        status: int | str = "?"
        server_error, detail, route = False, "", []
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body, timeout=120) as response:
                status = response.status_code
                if status != 200:
                    detail = (await response.aread()).decode(errors="replace")[:300]
                else:
                    route = [p for p in response.headers.get("x-swarm-route", "").split(",") if p]
                    done = False
                    async for line in sse_lines(response):
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            done = True
                            break
                        chunk = json.loads(data)
                        if "error" in chunk:
                            error = chunk["error"]
                            detail = str(error.get("message", error))[:300]
                            server_error = server_error or error.get("type") in SERVER_ERROR_TYPES
                    if not done:
                        detail = detail or "stream ended without [DONE]"
                        server_error = True
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            status, detail, server_error = type(exc).__name__, str(exc)[:300], True
        finally:
            state.in_flight -= 1
            state.idle.set()
        latency = time.perf_counter() - began
        server_error = server_error or (isinstance(status, int) and status >= 500)
        if route:
            state.last_route = route
        state.normal.append(
            Call(
                "normal", "chat stream", status, latency, server_error, detail, route, began, began + latency
            )
        )
        if server_error or status != 200:
            print(f"  normal request {turn}: {status} {detail}", flush=True)


async def ban_monitor(client: httpx.AsyncClient, state: State, interval: float = 0.5) -> None:
    """Which peers `/swarm/api` shows banned, attributed to the current case."""
    while not state.stop:
        case = state.case
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
            for peer in await swarm_peers(client):
                if peer.get("banned") and case is not None:
                    case.seen_banned.add(peer["peer_id"])
        await asyncio.sleep(interval)


# --------------------------------------------------------------------------------------------
# the cases


async def completion(client: httpx.AsyncClient, body: dict, headers: dict | None = None,
                     timeout: float = 120) -> tuple[httpx.Response, float]:  # fmt: skip
    began = time.perf_counter()
    response = await client.post("/v1/completions", json={"model": MODEL, **body}, headers=headers,
                                 timeout=timeout)  # fmt: skip
    return response, time.perf_counter() - began


async def case_poison_sampling(case: Case, client: httpx.AsyncClient, args, ctx) -> None:
    prompt = {"prompt": "Hello there my friend", "max_tokens": 20}
    reference, latency = await completion(client, {**prompt, "temperature": 0})
    case.abuse("temperature 0 (reference)", reference.status_code, latency)
    greedy = reference.json()["choices"][0]["text"] if reference.status_code == 200 else None
    seen, ok = [], reference.status_code == 200
    for label, extra, expected in (
        ("temperature 1e-45", {"temperature": 1e-45}, 200),
        ("temperature 1e-40", {"temperature": 1e-40}, 200),
        ("temperature 1.0, repetition_penalty 1e-38", {"temperature": 1.0, "repetition_penalty": 1e-38}, 400),
    ):
        response, latency = await completion(client, {**prompt, **extra})
        note = ""
        if response.status_code == 200:
            same = response.json()["choices"][0]["text"] == greedy
            note = " greedy" if same else " NOT greedy"
            ok = ok and same
        else:
            error = error_of(response.content)
            note = f" (param {error.get('param')})" if error.get("param") else ""
        case.abuse(label, response.status_code, latency, response.text[:200])
        ok = ok and response.status_code == expected
        seen.append(f"{label}: {response.status_code}{note}")
    case.outcome, case.ok = "; ".join(seen), ok


async def case_megabyte_stop(case: Case, client: httpx.AsyncClient, args, ctx) -> None:
    before = vm_hwm_kib(ctx["gateway"].process.pid)
    statuses, params = [], set()
    for _ in range(args.repeat):
        response, latency = await completion(
            client, {"prompt": "Hello there", "max_tokens": 4, "stop": ["x" * (1 << 20)]}
        )
        case.abuse("1 MiB stop string", response.status_code, latency, response.text[:200])
        statuses.append(response.status_code)
        params.add(error_of(response.content).get("param"))
    grew = (vm_hwm_kib(ctx["gateway"].process.pid) or 0) - (before or 0)
    case.details["gateway_vmhwm_growth_kib"] = grew
    case.ok = set(statuses) == {400} and params == {"stop"}
    case.outcome = (f"{len(statuses)} x {'/'.join(map(str, sorted(set(statuses))))} (param "
                    f"{'/'.join(map(str, params))}); gateway peak RSS +{grew / 1024:.1f} MiB")  # fmt: skip


def chunked_flood(address: str, total_mib: int) -> tuple[str, int, float]:
    """POST a chunked body of up to `total_mib` MiB, 1 MiB a chunk, until the server answers.
    Returns the status line, the MiB handed to the socket before the answer, and the seconds."""
    host, port = address.removeprefix("http://").split(":")
    sent = 0
    began = time.perf_counter()
    answer = b""
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * (1 << 20)
        framed = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
        sock.settimeout(0.05)
        try:
            while sent < total_mib and not answer:
                with contextlib.suppress(TimeoutError):  # the server stopped reading: look for its answer
                    sock.sendall(framed)
                    sent += 1
                with contextlib.suppress(TimeoutError):
                    answer = sock.recv(4096)
        except (BrokenPipeError, ConnectionResetError):  # the server closed after its answer
            pass
        sock.settimeout(10)
        if not answer:
            with contextlib.suppress(OSError):
                answer = sock.recv(4096)
    status = answer.split(b"\r\n", 1)[0].decode(errors="replace") or "no answer"
    return status, sent, time.perf_counter() - began


async def case_chunked_body(case: Case, client: httpx.AsyncClient, args, ctx) -> None:
    status_line, sent, elapsed = await asyncio.to_thread(chunked_flood, ctx["gateway"].address, 50)
    parts = status_line.split()
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else status_line
    case.abuse("50 MiB chunked body", status, elapsed, status_line)
    case.details["mib_sent_before_answer"] = sent
    case.ok = status == 413 and sent <= args.chunked_limit_mib
    case.outcome = f"{status} after {sent} MiB sent ({elapsed:.2f} s)"


async def case_big_prompts(case: Case, client: httpx.AsyncClient, args, ctx) -> None:
    sentence = "Hello there my friend, how are you today? "

    async def one(index: int) -> tuple[int, str]:
        text = f"Prompt {index}. " + sentence * ((args.big_prompt_bytes - 16) // len(sentence))
        text = text.ljust(args.big_prompt_bytes, ".")
        try:
            response, latency = await completion(client, {"prompt": text, "max_tokens": 16}, timeout=300)
        except httpx.HTTPError as exc:
            case.abuse("4 MB prompt", type(exc).__name__, 0.0, str(exc), server_error=True)
            return type(exc).__name__, ""
        code = str(error_of(response.content).get("code") or "")
        case.abuse(
            f"{args.big_prompt_bytes / 1e6:g} MB prompt", response.status_code, latency, response.text[:200]
        )
        return response.status_code, code

    began = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(args.big_prompts)))
    latencies = [c.latency_s for c in case.calls if c.kind == "abuse"]
    case.details["answer_s_min_max"] = [round(min(latencies), 2), round(max(latencies), 2)]
    counts = Counter(f"{status} {code}".strip() for status, code in results)
    case.ok = set(counts) == {"400 context_length_exceeded"}
    case.outcome = (", ".join(f"{n} x {label}" for label, n in counts.items())
                    + f"; answers after {min(latencies):.1f}-{max(latencies):.1f} s "
                    f"(all {time.perf_counter() - began:.1f} s)")  # fmt: skip


async def case_stalled_peers(case: Case, client: httpx.AsyncClient, args, ctx) -> None:
    """As tests/test_abuse.py: SIGSTOP the serving peer, SIGCONT it, at once SIGSTOP its replica
    (the first must be readmitted by then, else its span has no peer), SIGCONT."""
    swarm, state = ctx["swarm"], ctx["state"]
    peers = peers_of(swarm)
    route = state.last_route
    if not route:
        raise RuntimeError("the normal client has no route yet")
    serving = route[min(args.stall_hop, len(route) - 1)]
    first = next(p for p in peers if p.peer_id == serving)
    replica = next(p for p in peers if p.span == first.span and p.peer_id != serving and p.child.alive())
    stop = asyncio.Event()

    async def prober() -> None:  # requests of our own during the stalls, as the tester sent
        while not stop.is_set():
            began = time.perf_counter()
            try:
                response, latency = await completion(client, {"prompt": "Hello there", "max_tokens": 4})
                route = [p for p in response.headers.get("x-swarm-route", "").split(",") if p]
                case.abuse("completion during a stall", response.status_code, latency, response.text[:200],
                           route=route)  # fmt: skip
            except httpx.HTTPError as exc:
                case.abuse("completion during a stall", type(exc).__name__, time.perf_counter() - began, str(exc),
                           server_error=True)  # fmt: skip

    async def back_after(peer: Peer, since: float) -> float | None:
        """Seconds from SIGCONT until the gateway lists the peer reachable and not banned."""
        while time.perf_counter() - since < 30:
            with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                entry = {p["peer_id"]: p for p in await swarm_peers(client)}.get(peer.peer_id)
                if entry and not entry["banned"] and entry["reachable"]:
                    return round(time.perf_counter() - since, 2)
            await asyncio.sleep(0.2)
        return None

    task = asyncio.create_task(prober())
    windows, watchers = [], []
    try:
        for peer in (first, replica):
            case.stalled.add(peer.peer_id)
            stopped = time.perf_counter()
            peer.child.signal(signal.SIGSTOP)
            try:
                await asyncio.sleep(args.stall)
            finally:
                peer.child.signal(signal.SIGCONT)
            resumed = time.perf_counter()
            windows.append((peer, stopped, resumed))
            watchers.append(asyncio.create_task(back_after(peer, resumed)))
            print(f"  SIGSTOP {peer.peer_id} {list(peer.span)} for {args.stall:.0f} s, SIGCONT", flush=True)
        back = await asyncio.gather(*watchers)
    finally:
        stop.set()
        await task
        for watcher in watchers:
            watcher.cancel()
    await asyncio.sleep(0.5)  # the normal request in flight
    calls = case.calls + [c for c in state.normal if c.ended > case.began]
    stalls = []
    for (peer, stopped, resumed), readmitted in zip(windows, back, strict=True):
        caught = [c for c in calls if peer.peer_id in c.route and c.began < resumed and c.ended > stopped]
        stalls.append({
            "peer": peer.peer_id, "span": list(peer.span), "stall_s": args.stall,
            "requests_on_it_during_stall": len(caught),
            "their_statuses": dict(Counter(str(c.status) for c in caught)),
            "their_latency_ms_max": round1(max((c.latency_s * 1000 for c in caught), default=None)),
            "readmitted_s_after_sigcont": readmitted,
        })  # fmt: skip
    case.details["stalls"] = stalls
    statuses = Counter(c.status for c in case.calls if c.kind == "abuse")
    failed = [c for c in calls if c.server_error or c.status != 200]
    case.ok = not failed and all(s["readmitted_s_after_sigcont"] is not None for s in stalls)
    case.outcome = (f"{first.peer_id[:8]} then its replica {replica.peer_id[:8]} (blocks {list(first.span)}) "
                    f"stalled {args.stall:g} s each, requests caught: "
                    + " and ".join(f"{s['requests_on_it_during_stall']} (worst {s['their_latency_ms_max']} ms)"
                                   for s in stalls)
                    + ", readmitted "
                    + " and ".join(f"{s['readmitted_s_after_sigcont']} s" for s in stalls)
                    + " after SIGCONT; completions during the stalls: "
                    + ", ".join(f"{n} x {s}" for s, n in sorted(statuses.items(), key=str))
                    + (f"; {len(failed)} request(s) FAILED ({failed[0].detail[:120]})" if failed else ""))  # fmt: skip


async def case_abandoned_opens(case: Case, client: httpx.AsyncClient, args, ctx) -> None:
    import grpc

    from common.peer_client import ChannelPool, PeerError, PeerSession, peer_info
    from protos import swarm_pb2

    peers = [p for p in peers_of(ctx["swarm"]) if p.child.alive()]
    pool = ChannelPool()
    before = {p.peer_id: await peer_info(pool, p.child.address) for p in peers}

    async def open_one(peer: Peer) -> tuple[PeerSession | None, float]:
        session = PeerSession(pool, peer.child.address)
        message = swarm_pb2.OpenSession(start_block=peer.span[0], end_block=peer.span[1], max_length=2048,
                                        session_id=uuid.uuid4().hex)  # fmt: skip
        began = time.perf_counter()
        try:
            await asyncio.wait_for(session.open(message), 30)
        except (PeerError, TimeoutError) as exc:
            code = getattr(exc, "code", None)
            case.abuse("open, never step", code.name if code else type(exc).__name__, time.perf_counter() - began,
                       str(exc))  # fmt: skip
            return None, began
        return session, began

    async def wait_end(session: PeerSession, began: float) -> str:
        """The peer ends the stream (we never write again); its status."""
        call = session._call  # the open RPC: read its end without stepping
        try:
            response = await asyncio.wait_for(call.read(), args.first_step_timeout + 20)
            code = (await call.code()).name if response is grpc.aio.EOF else "unexpected message"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        except TimeoutError:
            session.abort()
            code = "still open"
        case.abuse("open, never step", code, time.perf_counter() - began)
        return code

    try:
        opened = await asyncio.gather(*(open_one(p) for p in peers for _ in range(args.opens_per_peer)))
        sessions = [(s, t) for s, t in opened if s is not None]
        during = {p.peer_id: await peer_info(pool, p.child.address) for p in peers}
        codes = await asyncio.gather(*(wait_end(s, t) for s, t in sessions))
        closed_after = [
            c.latency_s for c in case.calls if c.kind == "abuse" and c.status == "DEADLINE_EXCEEDED"
        ]
        await asyncio.sleep(0.5)
        after = {p.peer_id: await peer_info(pool, p.child.address) for p in peers}
    finally:
        await pool.close()
    case.details["peers"] = {
        pid: {
            "live_sessions_before_during_after": [before[pid].live_sessions, during[pid].live_sessions,
                                                  after[pid].live_sessions],
            "free_cache_tokens_before_during_after": [before[pid].free_cache_tokens, during[pid].free_cache_tokens,
                                                      after[pid].free_cache_tokens],
        }
        for pid in before
    }  # fmt: skip
    counts = Counter(codes)
    case.details["closed_after_s_min_max"] = (
        [round(min(closed_after), 2), round(max(closed_after), 2)] if closed_after else None
    )
    # (the normal client's own session, a few dozen tokens, may be open at either reading)
    released = all(after[pid].free_cache_tokens >= before[pid].free_cache_tokens - 2048 for pid in before)
    held = all(
        before[pid].free_cache_tokens - during[pid].free_cache_tokens >= (args.opens_per_peer - 1) * 2048
        for pid in before
    )
    case.ok = (len(sessions) == len(peers) * args.opens_per_peer and set(counts) == {"DEADLINE_EXCEEDED"}
               and released and held)  # fmt: skip
    span = f"{min(closed_after):.1f}-{max(closed_after):.1f} s" if closed_after else "never"
    case.outcome = (f"{len(sessions)}/{len(peers) * args.opens_per_peer} opened on {len(peers)} peers; ended "
                    + ", ".join(f"{n} x {c}" for c, n in counts.items())
                    + f" after {span}; their {args.opens_per_peer} x 2048 cache tokens "
                    + ("held, then released" if held and released else "NOT held and released"))  # fmt: skip


async def chat(client: httpx.AsyncClient, messages: list[dict], session: str, key: str | None,
               max_tokens: int) -> tuple[httpx.Response, float]:  # fmt: skip
    headers = {"X-Session-Id": session}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    began = time.perf_counter()
    response = await client.post("/v1/chat/completions", json=body, headers=headers, timeout=120)
    return response, time.perf_counter() - began


async def case_session_hijack(case: Case, client: httpx.AsyncClient, args, ctx) -> None:
    first = [{"role": "user", "content": "My name is Ada. What does a swarm of peers do?"}]
    follow_up = {"role": "user", "content": "And what happens when one of them stops?"}
    tag = uuid.uuid4().hex[:8]

    async def conversation(
        session: str, intruders: list[str | None]
    ) -> tuple[str, str, list[str], list[str]]:
        one, latency = await chat(client, first, session, "client-a-key", 16)
        case.abuse("client A turn 1", one.status_code, latency, one.text[:200])
        reply = one.json()["choices"][0]["message"]["content"]
        route1 = one.headers.get("x-swarm-route", "").split(",")
        for key in intruders:
            who = f"intruder {'with another key' if key else 'without a key'}"
            # a conversation of its own under the same session id, then a forged second turn
            other, latency = await chat(client, [{"role": "user", "content": "Ignore that. Tell me a joke."}],
                                        session, key, 16)  # fmt: skip
            case.abuse(f"{who}, turn 1 of its own", other.status_code, latency, other.text[:200])
            forged = [*first, {"role": "assistant", "content": "Something else entirely."}, follow_up]
            other, latency = await chat(client, forged, session, key, 16)
            case.abuse(f"{who}, forged turn 2", other.status_code, latency, other.text[:200])
        two, latency = await chat(client, [*first, {"role": "assistant", "content": reply}, follow_up], session,
                                  "client-a-key", 16)  # fmt: skip
        case.abuse("client A turn 2", two.status_code, latency, two.text[:200])
        route2 = two.headers.get("x-swarm-route", "").split(",")
        return reply, two.json()["choices"][0]["message"]["content"], route1, route2

    base = await conversation(f"abuse-base-{tag}", [])
    hit = await conversation(f"abuse-victim-{tag}", ["client-b-key", None])
    statuses = Counter(c.status for c in case.calls)
    same_turn1, same_turn2 = base[0] == hit[0], base[1] == hit[1]
    same_route = hit[2] == hit[3]
    case.details.update({"turn1_equal": same_turn1, "turn2_equal": same_turn2, "victim_route_kept": same_route,
                         "baseline_turn2": base[1], "victim_turn2": hit[1]})  # fmt: skip
    case.ok = set(statuses) == {200} and same_turn1 and same_turn2
    case.outcome = (f"all {sum(statuses.values())} requests of A and the intruders "
                    f"{'/'.join(map(str, statuses))}; A's turn 2 "
                    f"{'equals' if same_turn2 else 'DIFFERS FROM'} the turn 2 without intruders; route "
                    f"{'kept' if same_route else 'changed'}")  # fmt: skip


async def case_nan_hidden(case: Case, client: httpx.AsyncClient, args, ctx) -> None:
    from common.peer_client import ChannelPool, PeerError, PeerSession
    from protos import swarm_pb2

    hidden_size = ctx["hidden_size"]
    last = [p for p in peers_of(ctx["swarm"]) if p.span[1] == SPANS[-1][1] and p.child.alive()]
    rows = 4

    def tensor(values: list[float]) -> swarm_pb2.Tensor:
        return swarm_pb2.Tensor(
            data=array.array("f", values).tobytes(), dtype="float32", shape=[rows, hidden_size]
        )

    finite = [((i * 7919) % 200 - 100) / 100.0 for i in range(rows * hidden_size)]
    one_nan = list(finite)
    one_nan[hidden_size + 3] = math.nan
    variants = [
        ("all NaN", tensor([math.nan] * rows * hidden_size)),
        ("one NaN", tensor(one_nan)),
        ("+inf", tensor([math.inf] * rows * hidden_size)),
        ("finite (control)", tensor(finite)),
    ]
    pool = ChannelPool()
    seen = Counter()
    try:
        for peer in last:
            for label, hidden in variants:
                session = PeerSession(pool, peer.child.address)
                sampling = swarm_pb2.SamplingParams(temperature=1.0, top_p=0.9, logprobs=True)
                message = swarm_pb2.OpenSession(start_block=peer.span[0], end_block=peer.span[1], max_length=64,
                                                session_id=uuid.uuid4().hex, sampling=sampling)  # fmt: skip
                began = time.perf_counter()
                try:
                    await session.open(message)
                    await session.step(swarm_pb2.Step(token_ids=[1, 20, 30, 40], hidden=hidden, position=0,
                                                      sample=True))  # fmt: skip
                    status = "OK"
                except PeerError as exc:
                    status = exc.code.name if exc.code else "stream closed"
                finally:
                    await session.close()
                case.abuse(f"{label} hidden states, sampling step", status, time.perf_counter() - began,
                           server_error=status not in ("OK", "INVALID_ARGUMENT"))  # fmt: skip
                seen[(label, status)] += 1
    finally:
        await pool.close()
    alive = all(p.child.alive() for p in last)
    expected = {label: ("OK" if label.startswith("finite") else "INVALID_ARGUMENT") for label, _ in variants}
    case.ok = alive and all(status == expected[label] for label, status in seen)
    case.outcome = (", ".join(f"{label}: {n} x {status}" for (label, status), n in seen.items())
                    + f" ({len(last)} last-span peers{', all alive' if alive else ', ONE DIED'})")  # fmt: skip


CASES = [
    (1, "poison sampling", "200 greedy, 200 greedy, 400", case_poison_sampling),
    (2, "1 MiB stop string", "400 (param stop)", case_megabyte_stop),
    (3, "50 MiB chunked body", "413 after a few MiB", case_chunked_body),
    (4, "concurrent 4 MB prompts", "400 context_length_exceeded each", case_big_prompts),
    (5, "stalled peers (SIGSTOP)", "200 only; the stalled peer banned, then readmitted", case_stalled_peers),
    (6, "abandoned opens", "closed after --first-step-timeout, cache released", case_abandoned_opens),
    (7, "X-Session-Id reused by another key", "200; the owner's next turn unchanged", case_session_hijack),
    (8, "NaN hidden states over gRPC", "INVALID_ARGUMENT, the peer serves on", case_nan_hidden),
]


# --------------------------------------------------------------------------------------------
# the run


async def settle(client: httpx.AsyncClient, expected_peers: int, timeout: float) -> float:
    """Wait until every peer is listed, reachable and not banned; returns the seconds waited."""
    began = time.perf_counter()
    while time.perf_counter() - began < timeout:
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
            peers = await swarm_peers(client)
            if len(peers) >= expected_peers and all(p["reachable"] and not p["banned"] for p in peers):
                return time.perf_counter() - began
        await asyncio.sleep(0.25)
    return time.perf_counter() - began


async def run(args: argparse.Namespace) -> dict:
    from peer.demo_model import ensure_demo_model

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="abuse-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_demo_model(DEFAULT_CACHE, preset="demo")
    if num_blocks_of(model_dir) != SPANS[-1][1]:
        raise RuntimeError(f"expected a {SPANS[-1][1]}-block demo model at {model_dir}")
    hidden_size = int(json.loads((model_dir / "config.json").read_text())["hidden_size"])
    peer_flags = ["--threads", "1", "--first-step-timeout", str(args.first_step_timeout)]
    redis = None if args.no_redis else start_redis(workdir)
    gateway_flags = [
        "--step-timeout",
        str(args.step_timeout),
        "--dht-port",
        str(free_port(socket.SOCK_DGRAM)),
    ]
    if redis:
        gateway_flags += ["--redis-url", redis[1]]
    swarm = LocalSwarm(model_dir, workdir=workdir, heartbeat=args.heartbeat, ttl=args.ttl, model_name=MODEL)
    state = State()
    cases: list[Case] = []
    began_all = time.perf_counter()
    try:
        with swarm:
            swarm.start_dht()
            swarm.start_peers(SPANS * args.replicas, *peer_flags)
            gateway = swarm.start_gateway(None, *gateway_flags)
            started_s = time.perf_counter() - began_all
            print(f"swarm up in {started_s:.1f} s (logs in {workdir}; pins: "
                  f"{'redis' if redis else 'in memory'})", flush=True)  # fmt: skip
            peers = peers_of(swarm)
            ctx = {"swarm": swarm, "gateway": gateway, "state": state, "hidden_size": hidden_size}
            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(base_url=gateway.address, timeout=120, limits=limits) as client:
                await wait_models(client)
                await settle(client, len(peers), 30)
                background = [asyncio.create_task(normal_client(client, state, args.max_tokens)),
                              asyncio.create_task(ban_monitor(client, state))]  # fmt: skip
                baseline = Case(0, "baseline (normal client alone)", "200")
                state.case = baseline
                baseline.began = time.perf_counter()
                await asyncio.sleep(args.baseline)
                await close_case(baseline, state, swarm, gateway, args)
                baseline.ok = not any(c.server_error for c in baseline.calls)
                baseline.outcome = "normal client only"
                cases.append(baseline)
                selected = set(args.cases or [n for n, *_ in CASES])
                for number, name, expected, fn in CASES:
                    if number not in selected:
                        continue
                    settled = await settle(client, len(peers), args.settle_timeout)
                    case = Case(number, name, expected)
                    case.details["settle_s"] = round(settled, 1)
                    print(f"case {number}: {name}", flush=True)
                    state.case = case
                    case.began = time.perf_counter()
                    try:
                        await fn(case, client, args, ctx)
                    except Exception as exc:  # noqa: BLE001 - a broken case is reported, the others still run
                        case.ok = False
                        case.outcome = f"the case itself failed: {type(exc).__name__}: {exc}"[:500]
                    await close_case(case, state, swarm, gateway, args)
                    cases.append(case)
                    print(
                        f"  -> {case.outcome} [{'as expected' if case.ok else 'NOT AS EXPECTED'}]", flush=True
                    )
                state.stop = True
                for task in background:
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.gather(*background)
                health = (await client.get("/health")).json()
            alive = {c.name: c.alive() for c in swarm.children}
            logs = {c.name: c.log()[-3000:] for c in swarm.children if c.name == "gateway" or not c.alive()}
            names = {p.peer_id: p.child.name for p in peers}
    finally:
        if redis:
            redis[0].terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                redis[0].wait(10)
    elapsed = time.perf_counter() - began_all
    return summarize(args, cases, health, alive, logs, names, workdir, bool(redis), started_s, elapsed)


async def close_case(case: Case, state: State, swarm: LocalSwarm, gateway: Child, args) -> None:
    """Let the normal client finish the request in flight (and make at least --min-normal in the
    case), then read bans from the gateway's log and the peak RSS of every process."""
    deadline = time.perf_counter() + 60
    while time.perf_counter() < deadline:
        if sum(1 for c in state.normal if c.ended > case.began) >= args.min_normal:
            break
        await asyncio.sleep(0.05)
    if state.in_flight:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.idle.wait(), 60)
    case.ended = time.perf_counter()
    # concurrent with the case: the normal requests that ended during it (one that began just before
    # it and was caught by it, as by a stall, counts; the one in flight at its end was waited for)
    case.calls.extend(c for c in state.normal if case.began < c.ended <= case.ended)
    log = gateway.log()
    case.ban_events = BAN_LINE.findall(log[state.ban_offset :])
    state.ban_offset = len(log)
    for child in swarm.children:
        if child.name == "gateway" or child.name.startswith("peer"):
            hwm = vm_hwm_kib(child.process.pid)
            if hwm is not None:
                case.peak_rss_kib[child.name] = hwm
    case.details["gateway_rss_mib_at_end"] = _mib(vm_hwm_kib(gateway.process.pid, "VmRSS"))


def summarize(args, cases, health, alive, logs, names, workdir, redis, started_s, elapsed) -> dict:
    rows = []
    for case in cases:
        normal = [c for c in case.calls if c.kind == "normal"]
        abuse = [c for c in case.calls if c.kind == "abuse"]
        latencies = [c.latency_s * 1000 for c in normal]
        if case.number == 5:
            stall_bans = [p for p in case.ban_events if p in case.stalled]
            input_bans = [p for p in case.ban_events if p not in case.stalled]
        else:
            stall_bans, input_bans = [], list(case.ban_events)
        peers_rss = {name: kib for name, kib in case.peak_rss_kib.items() if name.startswith("peer")}
        rows.append({
            "case": case.number,
            "name": case.name,
            "expected": case.expected,
            "outcome": case.outcome,
            "as_expected": bool(case.ok) and not any(c.server_error for c in case.calls),
            "duration_s": round(case.ended - case.began, 1),
            "requests_abuse": len(abuse),
            "requests_normal": len(normal),
            "status_counts_abuse": dict(Counter(str(c.status) for c in abuse)),
            "status_counts_normal": dict(Counter(str(c.status) for c in normal)),
            "server_errors": sum(c.server_error for c in case.calls),
            "server_errors_detail": [
                {"kind": c.kind, "what": c.what, "status": c.status, "detail": c.detail}
                for c in case.calls if c.server_error
            ],
            "bans_from_client_input": len(input_bans),
            "bans_from_client_input_peers": input_bans,
            "bans_of_stalled_peers": len(stall_bans),
            "peers_seen_banned_on_swarm_api": sorted(case.seen_banned),
            "normal_latency_ms_p50": round1(statistics.median(latencies) if latencies else None),
            "normal_latency_ms_max": round1(max(latencies, default=None)),
            "normal_failed": sum(1 for c in normal if c.status != 200 or c.detail),
            "normal_latencies_ms": [round(v) for v in latencies],
            "gateway_peak_rss_mib": _mib(case.peak_rss_kib.get("gateway")),
            "peers_peak_rss_mib": {name: _mib(kib) for name, kib in sorted(peers_rss.items())},
            "details": case.details,
        })  # fmt: skip
    return {
        "benchmark": "abuse",
        "command": " ".join(["python -m loadtests.abuse", *sys.argv[1:]]),
        "setup": {
            "model": f"demo preset 'demo' (random weights), {SPANS[-1][1]} blocks",
            "spans": [list(s) for s in SPANS],
            "replicas_per_span": args.replicas,
            "peer_flags": ["--threads", "1", "--first-step-timeout", str(args.first_step_timeout)],
            "heartbeat_s": args.heartbeat,
            "ttl_s": args.ttl,
            "gateway_flags": ["--step-timeout", str(args.step_timeout)],
            "session_store": "redis-server" if redis else "in memory",
            "normal_client": f"chat streams back to back, max_tokens {args.max_tokens}, at least "
            f"{args.min_normal} per case",
            "stall_s": args.stall,
            "opens_per_peer": args.opens_per_peer,
            "big_prompts": [args.big_prompts, args.big_prompt_bytes],
            "host": f"{platform.machine()}, {platform.python_version()}, {os.cpu_count()} CPU cores",
        },  # fmt: skip
        "swarm_start_s": round(started_s, 1),
        "elapsed_s": round(elapsed, 1),
        "peer_names": names,
        "cases": rows,
        "totals": {
            "requests": sum(r["requests_abuse"] + r["requests_normal"] for r in rows),
            "server_errors": sum(r["server_errors"] for r in rows),
            "bans_from_client_input": sum(r["bans_from_client_input"] for r in rows),
            "cases_as_expected": sum(r["as_expected"] for r in rows if r["case"]),
            "cases": sum(1 for r in rows if r["case"]),
            "processes_alive_at_end": alive,
        },
        "gateway_failover": {k: v for k, v in health.get("failover", {}).items() if k != "pauses_ms"},
        "workdir": str(workdir),
        "logs_tail": logs,
    }


def _mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def table(result: dict) -> str:
    head = ("| # | case | outcome (status codes seen) | requests abuse + normal | 5xx | bans from client input "
            "| normal p50 / worst ms | gateway / peers peak RSS MiB |\n"
            "| --: | --- | --- | --: | --: | --: | --: | --: |")  # fmt: skip
    lines = [head]
    for r in result["cases"]:
        bans = str(r["bans_from_client_input"])
        if r["case"] == 5:
            bans += f" ({r['bans_of_stalled_peers']} of the stalled peers, expected)"
        peers = [v for v in r["peers_peak_rss_mib"].values() if v is not None]
        rss = f"{r['gateway_peak_rss_mib']} / {min(peers, default=0):.0f}-{max(peers, default=0):.0f}"
        mark = "" if r["as_expected"] else " **(not as expected)**"
        lines.append(
            f"| {r['case'] or '-'} | {r['name']} | {r['outcome']}{mark} | {r['requests_abuse']} + "
            f"{r['requests_normal']} | {r['server_errors']} | {bans} | {r['normal_latency_ms_p50']} / "
            f"{r['normal_latency_ms_max']} | {rss} |"
        )
    return "\n".join(lines)


def markdown(result: dict) -> str:
    s, t = result["setup"], result["totals"]
    return f"""# Abuse benchmark: hostile input and stalled peers while a normal client chats

Command (from the repository root):

```
{result["command"]}
```

Setup: {s["model"]}, spans {s["spans"]} with {s["replicas_per_span"]} replicas each, peers
`{" ".join(s["peer_flags"])}` (heartbeat {s["heartbeat_s"]:g} s and ttl {s["ttl_s"]:g} s, the CLI's
defaults), gateway `{" ".join(s["gateway_flags"])}`, session pins in {s["session_store"]}. While each
case runs, a normal client streams small chat completions ({s["normal_client"]}). Host:
{s["host"]} (shared with other work: timings are noisy). Swarm start {result["swarm_start_s"]} s,
whole run {result["elapsed_s"]} s.

{table(result)}

Totals: {t["requests"]} requests, {t["server_errors"]} 5xx, {t["bans_from_client_input"]} peer bans
caused by client input, {t["cases_as_expected"]} of {t["cases"]} cases as expected.

How to read it: "5xx" counts HTTP 5xx answers and server-error events inside a 200 stream, of the
abuse requests and of the normal client's. Bans are read from the gateway's log (`banning peer`,
which also catches bans a probe lifts within a second) and from `/swarm/api` (`banned`); in case 5
the stalled peers' bans are the point and are counted apart. "normal p50 / worst" is the normal
client's end-to-end latency (request sent to `[DONE]`) during the case; the baseline row is the
same client alone. Peak RSS is `VmHWM` of each process at the end of the case (a peak since the
process started, so it only grows). Raw results: `loadtests/results/abuse.json`.
{CASE_NOTES}{FINDINGS}"""


CASE_NOTES = """
## What each case checks

1. **Poison sampling**: `temperature` 1e-45 and 1e-40 (float32 denormals) must sample greedily
   (the same text as `temperature: 0`) instead of dividing the logits into inf / NaN;
   `repetition_penalty: 1e-38` (the logits divided by ~0) is a 400 with `param`, refused before
   any peer.
2. **1 MiB stop string**: refused at validation (400, `param: stop`; at most 32 sequences of
   1024 characters); the gateway's peak RSS must not move (the issue's tester saw the gateway
   grow to 22 GB and die).
3. **50 MiB chunked body**: with no `Content-Length` the body limit (4 MiB) is counted on the
   bytes received; the answer is a 413 while the client is still sending (the MiB figure counts
   what the client handed to its socket, kernel buffers included).
4. **Concurrent 4 MB prompts**: each body fits the limit, so each prompt is tokenized (seconds
   each, off the event loop and one large prompt at a time) and refused with
   `context_length_exceeded`; the normal client's worst latency shows whether the others waited.
5. **Stalled peers**: SIGSTOP of the peer serving the normal client's route (from
   `x-swarm-route` and the peers' "peer <id> serving" log lines), then SIGCONT, then the same on
   its replica, while completions keep coming: the gateway must ban the stalled peer after the
   step timeout, fail over to the replica, and readmit the peer when it answers again, so the
   second stall still finds a replica: no 503.
6. **Abandoned opens**: `Inference` streams opened over gRPC (`OpenSession`, `max_length`
   2048) that never step hold KV budget; each peer must end them with DEADLINE_EXCEEDED after
   `--first-step-timeout` and give the budget back (`Info`: live sessions and free cache tokens
   before, during and after).
7. **X-Session-Id reused by another client**: a conversation (bearer key A) is run twice, once
   alone and once with intruders (bearer key B, and no key) sending their own turns under its
   `X-Session-Id` between A's turns; pins are scoped by the bearer token, so A's second turn
   (greedy) must give the same text as without the intruders.
8. **NaN hidden states over gRPC**: a sampling step on each last-span peer with all-NaN, one
   NaN and +inf hidden states must be INVALID_ARGUMENT for that session alone (a finite control
   step is OK) while the normal client's streams, batched on the same peers, complete.
"""

FINDINGS = """
## What the abuse run found

With the defaults above every case behaves as the hardening issue expects: no 5xx, no peer banned
for anything a client sent, every process alive at the end. Three things it showed besides:

* **Case 5 with the gateway's default `--step-timeout 10`** (`python -m loadtests.abuse --cases 5
  --step-timeout 10`, run twice): requests fail. In the second run one chat stream ended with an
  error event and one completion got a 503 after 15.0 s, both with "peer bb7a0d72... failed and no
  replacement for blocks [0, 2) came within 5.0 s (no live peer covers blocks [0, 2))"; in the
  first run one chat stream, the same way. The request's open on the stalled peer times out at
  the end of its 10 s stall, just when the benchmark SIGSTOPs the replica, so the replacement open
  hangs too. The first peer is readmitted 0.9 s after its SIGCONT (gateway log 17:08:46.670
  "answers again; readmitted"), 4.2 s before the request gives up (17:08:50.901 "no replacement
  for [0, 2) among [... both online]; excluded [both]"): `RouteRunner` never retries a peer that
  failed it (`_failed_peers`), even once the gateway has readmitted it, so a span with two
  replicas that stall one after the other fails the requests caught in between. The default run
  uses `--step-timeout 4` (the failover then happens mid-stall, while the replica is healthy),
  which also keeps the peers' `--first-step-timeout 10` above an open timeout plus the earlier
  hop's prefill, as docs/ARCHITECTURE.md asks. Not changed here (it is gateway code).
* **Case 4 costs the gateway about a gigabyte.** One 4 MB prompt is 1.24 M tokens and is refused
  only after it is tokenized in full (4-6 s of a core each; the eighth answer came after
  43 s): measured alone, one such prompt raises the gateway's peak RSS from 337 to 1045 MiB, and
  eight concurrent ones took it to 1496 MiB here, RSS still 684 MiB at the end of the case and
  back to 360 MiB later (a gateway alone, four bursts of eight: peak 1.9 GB, RSS 1.3-1.5 GB
  between bursts). The normal client barely noticed (worst 727 ms). A text longer than the
  context times the longest token's characters could be refused before tokenizing, or only a
  bounded prefix tokenized.
* Benchmark side: the first run counted one normal stream as failed with a JSON error. httpx's
  `aiter_lines` splits on every `str.splitlines` boundary, and a random model's text can hold
  U+0085 or U+2028, which JSON and SSE leave raw; the normal client now splits the event stream on
  line feeds itself. The gateway's stream was correct.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.abuse", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, nargs="*", default=None, help="only these case numbers (1-8)")
    parser.add_argument("--replicas", type=int, default=2, help="peers per span")
    parser.add_argument(
        "--heartbeat", type=float, default=5.0, help="peers' DHT heartbeat (the CLI's default)"
    )
    parser.add_argument("--ttl", type=float, default=15.0, help="peers' DHT record ttl (the CLI's default)")
    parser.add_argument(
        "--first-step-timeout", type=float, default=30.0,
        help="peers' --first-step-timeout (the CLI's default); case 6 lasts this long",
    )  # fmt: skip
    parser.add_argument(
        "--step-timeout", type=float, default=10.0,
        help="gateway --step-timeout (the CLI's default); the peers' --first-step-timeout must stay above "
             "two of it (an open that times out, then the earlier hop's prefill)",
    )  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per normal chat stream")
    parser.add_argument("--min-normal", type=int, default=3, help="normal requests per case at least")
    parser.add_argument("--baseline", type=float, default=5.0, help="seconds of the normal client alone")
    parser.add_argument("--repeat", type=int, default=3, help="case 2: requests with a 1 MiB stop string")
    parser.add_argument("--chunked-limit-mib", type=int, default=16,
                        help="case 3: most MiB sent before the 413 that still counts as expected")  # fmt: skip
    parser.add_argument("--big-prompts", type=int, default=8, help="case 4: concurrent big prompts")
    parser.add_argument("--big-prompt-bytes", type=int, default=4_000_000, help="case 4: characters each")
    parser.add_argument("--stall", type=float, default=10.0, help="case 5: seconds each peer is SIGSTOPped")
    parser.add_argument("--stall-hop", type=int, default=0, help="case 5: which hop of the route to stall")
    parser.add_argument("--opens-per-peer", type=int, default=32, help="case 6: abandoned streams per peer")
    parser.add_argument("--settle-timeout", type=float, default=40.0,
                        help="seconds to wait before a case for every peer to be reachable and unbanned")  # fmt: skip
    parser.add_argument("--no-redis", action="store_true", help="in-memory pins even if redis-server exists")
    parser.add_argument("--workdir", default=None, help="where the logs go (default: a temp dir)")
    parser.add_argument("--output", default="loadtests/results/abuse.json", help="JSON results")
    parser.add_argument(
        "--markdown", default="docs/benchmarks-abuse.md", help="markdown write-up ('' to skip)"
    )
    parser.add_argument("--render", default=None, help="only rewrite --markdown from this JSON result")
    args = parser.parse_args(argv)
    if args.render:
        Path(args.markdown).write_text(markdown(json.loads(Path(args.render).read_text())))
        return 0
    if args.replicas < 2 or args.stall <= 0 or args.first_step_timeout <= 0:
        parser.error("need --replicas >= 2, --stall > 0 and --first-step-timeout > 0")
    result = asyncio.run(run(args))
    write_results(Path(args.output), result, indent=2)
    if args.markdown:
        Path(args.markdown).write_text(markdown(result))
    print()
    print(table(result))
    print(json.dumps({k: v for k, v in result["totals"].items()}, indent=2))
    t = result["totals"]
    clean = (not t["server_errors"] and not t["bans_from_client_input"] and t["cases_as_expected"] == t["cases"]
             and all(t["processes_alive_at_end"].values()))  # fmt: skip
    return 0 if clean else 1


if __name__ == "__main__":
    raise SystemExit(main())

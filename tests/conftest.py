"""Shared fixtures: model folders made locally, and real swarms of processes that are always stopped."""

from __future__ import annotations

import asyncio
import inspect
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from swarm.launcher import Child, LocalSwarm, free_port

# Short heartbeats so that joins and expiries show within a test's patience.
HEARTBEAT = 1.0
TTL = 5.0  # > heartbeat + one DHT RPC timeout, so a slow announce never lets a record lapse


def wait_until(predicate, timeout: float, interval: float = 0.1):
    """Poll `predicate` until it returns something truthy or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


async def wait_until_async(predicate, timeout: float, interval: float = 0.05):
    """`wait_until` inside an event loop: `predicate` may be a plain or an async function."""

    async def check():
        value = predicate()
        return await value if inspect.isawaitable(value) else value

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(interval)
    return await check()


class FakeClock:
    """A unix-time clock that moves only when told: pass it as `clock=` to `MergingStorage` or
    `SwarmDHT` and age records with `advance` instead of sleeping until they expire."""

    def __init__(self, start: float | None = None):
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


def _source_of(item) -> str:
    """The test function's own source (a test may start a LocalSwarm itself)."""
    import inspect

    try:
        return inspect.getsource(item.function)
    except (AttributeError, OSError, TypeError):
        return ""


# Fixtures that start processes (swarms, gateways, redis-server, containers): a test that uses one,
# directly or through another fixture, is marked `slow` here, so that `-m 'not slow'` is the quick
# in-process loop without every file having to remember its marker.
PROCESS_FIXTURES = frozenset({
    "make_swarm", "demo_swarm", "demo_gateway", "redis_server", "redis_url", "dht_process",
    "docker_host", "last_peer", "mixed", "with_int8_head", "scoring_swarm", "private_tls_swarm",
    "replicas", "replicated", "base_url", "gateway", "swarm",
})  # fmt: skip


def pytest_collection_modifyitems(config, items):
    for item in items:
        if PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ())) or "LocalSwarm" in _source_of(
            item
        ):
            item.add_marker(pytest.mark.slow)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# A failing test's processes have written why to their logs, which a CI run does not keep: the
# report of a failure carries the warnings and errors that every process of the session logged
# while the test ran (its setup included), so a failure seen once can be read from the CI output.
LOG_PROBLEM_MARKERS = ("level=warning", "level=error", "level=critical", "Traceback", "Error")
LOG_LINES_PER_FILE = 40
LOG_STAMP = re.compile(r"ts=(\S+Z) ")
_TEST_START = pytest.StashKey[float]()  # when the test's setup began


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "setup":
        item.stash[_TEST_START] = call.start
    if not report.failed:
        return
    since = item.stash.get(_TEST_START, call.start)
    factory = getattr(item.config, "_tmp_path_factory", None)
    section = _process_problems(Path(factory.getbasetemp()), since) if factory is not None else ""
    if section:
        report.sections.append(("swarm processes: warnings and errors while the test ran", section))


def _process_problems(basetemp: Path, since: float) -> str:
    parts = []
    for log in sorted(basetemp.rglob("*.log")):
        try:
            if log.stat().st_mtime < since:
                continue
            lines = log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        problems, recent = [], False
        for line in lines:
            stamp = LOG_STAMP.match(line)
            if stamp:  # lines without a stamp (a traceback's) belong to the last stamped one
                recent = datetime.fromisoformat(stamp[1]).timestamp() >= since
            if recent and any(marker in line for marker in LOG_PROBLEM_MARKERS):
                problems.append(line)
        if problems:
            parts.append(f"--- {log.relative_to(basetemp)}")
            parts.extend(problems[-LOG_LINES_PER_FILE:])
    return "\n".join(parts)


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> Path:
    from peer.demo_model import create_demo_model

    return create_demo_model(tmp_path_factory.mktemp("models") / "swarm-demo-llama", preset="demo")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A second shape: grouped-query attention, tied embeddings, an odd number of blocks."""
    from peer.demo_model import create_demo_model

    return create_demo_model(tmp_path_factory.mktemp("models") / "swarm-tiny-gqa", preset="tiny", seed=7)


@pytest.fixture
def make_swarm(tmp_path):
    """Factory for LocalSwarm objects; every one is stopped when the test ends."""
    swarms: list[LocalSwarm] = []

    def factory(model_dir: Path, **kwargs) -> LocalSwarm:
        workdir = tmp_path / f"swarm{len(swarms)}"
        workdir.mkdir()
        swarm = LocalSwarm(Path(model_dir), workdir=workdir, heartbeat=HEARTBEAT, ttl=TTL, **kwargs)
        swarms.append(swarm)
        return swarm

    yield factory
    for swarm in swarms:
        swarm.stop()


DEMO_MODEL_NAME = "swarm-demo"


@pytest.fixture(scope="session")
def demo_swarm(demo_model, tmp_path_factory) -> Iterator[LocalSwarm]:
    """A DHT node and two peers (blocks [0, 2) and [2, 4), one thread each) serving the demo model
    as `swarm-demo`, started once and shared by the test files that only need a working swarm.

    It has no gateway of its own: each file gets its own from `demo_gateway`, with its flags, so
    nothing a file does to its gateway reaches another file. Tests must leave the peers as they
    found them (no session left open, no peer stopped).
    """
    local = LocalSwarm(demo_model, workdir=tmp_path_factory.mktemp("demo-swarm"), heartbeat=HEARTBEAT, ttl=TTL,
                       model_name=DEMO_MODEL_NAME)  # fmt: skip
    try:
        local.start_dht()
        local.start_peers([(0, 2), (2, 4)], "--threads", "1")
        yield local
    finally:
        local.stop()  # the gateways too


@pytest.fixture(scope="session")
def demo_gateway(demo_swarm):
    """`demo_gateway(name, *flags)`: the gateway called `name` in front of `demo_swarm`, started
    with `flags` on first use and kept until the session ends.

    Kept, not stopped with its test file: a stopped gateway's DHT node stays in the routing tables
    of the other nodes, and every gateway that joins after it would wait a DHT RPC timeout (2 s)
    for it. So a test that needs a gateway with other flags asks for one more name here.
    """
    started: dict[str, tuple[tuple[str, ...], Child]] = {}

    def factory(name: str, *flags: str) -> Child:
        if name not in started:
            started[name] = (flags, demo_swarm.start_gateway(None, *flags, name=f"gateway-{name}"))
        known_flags, child = started[name]
        assert known_flags == flags, f"gateway {name!r} was started with other flags: {known_flags}"
        return child

    return factory


class RedisServer:
    def __init__(self, workdir: Path):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (deploy/setup.sh test installs it)")
        command = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--dir", str(self.workdir)]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_until(self.accepts_connections, 10, interval=0.05):
            raise TimeoutError("redis-server did not start")

    def accepts_connections(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()

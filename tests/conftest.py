"""Shared fixtures: model folders made locally, and real swarms of processes that are always stopped."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from swarm.launcher import LocalSwarm, free_port

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


def pytest_collection_modifyitems(config, items):
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
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

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

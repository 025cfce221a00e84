"""Start a local swarm as real processes: one DHT node, block peers, a gateway.

`swarm up` uses it, and so do the integration tests, so what the tests exercise is what users run.
Each child writes to its own log file; a child is ready when it prints its READY line (the DHT node
and peers) or when `/health` answers (the gateway).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEMO_MODEL_ID = "swarm-demo"
# where demo and benchmark model folders are made
DEFAULT_CACHE = Path(os.environ.get("SWARM_HOME", Path.home() / ".cache" / "swarm-serve"))


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def split_blocks(num_blocks: int, parts: int, head_blocks: float = 0.0) -> list[tuple[int, int]]:
    """Contiguous, as even as possible: 8 blocks in 3 parts -> [0,3) [3,6) [6,8). `head_blocks`:
    extra work of the last span (its LM head) in blocks; the split then minimises the largest
    span's work (ties: the earliest bounds)."""
    if not 1 <= parts <= num_blocks:
        raise ValueError(f"cannot split {num_blocks} blocks between {parts} peers")
    if head_blocks <= 0:
        bounds = [round(i * num_blocks / parts) for i in range(parts + 1)]
        return list(zip(bounds[:-1], bounds[1:], strict=True))
    # best[k][n]: (largest span's work, bounds) splitting the first n blocks into k spans
    best: dict[tuple[int, int], tuple[float, list[int]]] = {(0, 0): (0.0, [0])}
    for k in range(1, parts + 1):
        for n in range(k, num_blocks - (parts - k) + 1):
            candidates = []
            for m in range(k - 1, n):
                if (k - 1, m) not in best:
                    continue
                work = n - m + (head_blocks if n == num_blocks else 0.0)
                worst, bounds = best[(k - 1, m)]
                candidates.append((max(worst, work), [*bounds, n]))
            if candidates:
                best[(k, n)] = min(candidates, key=lambda c: c[0])
    bounds = best[(parts, num_blocks)][1]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def balanced_split(model_dir: Path, parts: int) -> list[tuple[int, int]]:
    """Contiguous spans with about equal weights to read per token, the last span's LM head counted:
    in a pipeline of peers the slowest span sets the pace, and the head is the largest weight
    (32000 x 1024 in the bench model: ~2.9 of its blocks, so [0, 4) [4, 8) would give the second
    peer 1.7x the first's work; [0, 5) [5, 8) gives it 1.2x)."""
    from common.model_dir import read_model_config

    config = read_model_config(model_dir)  # standard field names, also for BLOOM / Falcon
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads") or heads
    block = (
        2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim + 3 * hidden * config["intermediate_size"]
    )
    return split_blocks(layers, parts, head_blocks=config["vocab_size"] * hidden / block)


def num_blocks_of(model_dir: Path) -> int:
    from common.model_dir import read_model_config

    return int(read_model_config(model_dir)["num_hidden_layers"])


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log_path: Path
    address: str = ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.process.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def wait_for_line(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log().splitlines():
                if line.startswith(prefix):
                    return line[len(prefix) :].strip()
            if not self.alive():
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.log()[-3000:]}"
                )
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f} s:\n{self.log()[-3000:]}")


@dataclass
class LocalSwarm:
    """A swarm on this machine. Use as a context manager so every child is stopped."""

    model_dir: Path
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="swarm-")))
    heartbeat: float = 5.0
    ttl: float = 15.0
    log_level: str = "INFO"
    model_name: str | None = None  # model id to announce and serve (default: the folder's name)
    children: list[Child] = field(default_factory=list)
    dht_address: str = ""
    # a private swarm: every child started from here holds this swarm key (docs/security.md)
    swarm_key_file: Path | None = None

    def _key_flags(self) -> list[str]:
        return ["--swarm-key-file", str(self.swarm_key_file)] if self.swarm_key_file else []

    def _identity_flags(self, name: str, extra: Sequence[str]) -> list[str]:
        """Each peer and gateway its own key file in the work folder, unless `extra` names one."""
        return [] if "--identity-file" in extra else ["--identity-file", str(self.workdir / f"{name}.key")]

    def _spawn(self, name: str, args: list[str], env: dict | None = None, wrap: Sequence[str] = ()) -> Child:
        log_path = self.workdir / f"{name}.log"
        log_file = open(log_path, "wb")  # noqa: SIM115 - the child owns it for its whole life
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        process = subprocess.Popen(
            [*wrap, sys.executable, "-m", "swarm.cli", "--log-level", self.log_level, *args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env,
        )
        log_file.close()
        child = Child(name, process, log_path)
        self.children.append(child)
        return child

    def start_dht(self, timeout: float = 30.0, *, host: str = "127.0.0.1", port: int = 0) -> str:
        """Start the DHT bootstrap node (again, on the same `port`, to restart it)."""
        child = self._spawn("dht", ["dht", "--host", host, "--port", str(port), *self._key_flags()])
        child.address = child.wait_for_line("DHT_READY", timeout)
        self.dht_address = child.address
        return child.address

    def _model_flags(self) -> list[str]:
        return ["--model", str(self.model_dir)] + (
            ["--model-name", self.model_name] if self.model_name else []
        )

    def spawn_peer(
        self,
        start: int | None,
        end: int | None,
        *extra: str,
        name: str | None = None,
        wrap: Sequence[str] = (),
    ) -> Child:
        """Start a peer without waiting for it (see `start_peers` to start several at once).

        `start` None: no ``--blocks``, the peer chooses its own (`peer.block_selection`).
        `wrap` prefixes the command, e.g. ``("ip", "netns", "exec", "ns1")`` to run it on another
        (virtual) host; a later ``--host`` in `extra` overrides the default 127.0.0.1."""
        name = name or f"peer-{'auto' if start is None else start}-{end}-{len(self.children)}"
        blocks = [] if start is None else ["--blocks", f"{start}:{end}"]
        args = [
            "peer", *self._model_flags(), *blocks, "--dht", self.dht_address,
            "--host", "127.0.0.1", "--heartbeat", str(self.heartbeat), "--ttl", str(self.ttl),
            *self._key_flags(), *self._identity_flags(name, extra), *extra,
        ]  # fmt: skip
        return self._spawn(name, args, wrap=wrap)

    def start_peer(
        self, start: int | None, end: int | None, *extra: str, name: str | None = None, timeout: float = 120.0
    ) -> Child:
        child = self.spawn_peer(start, end, *extra, name=name)
        child.address = child.wait_for_line("PEER_READY", timeout)
        return child

    def start_peers(self, spans: list[tuple[int, int]], *extra: str, timeout: float = 120.0) -> list[Child]:
        """Start one peer per span in parallel: their start-up (mostly importing torch) overlaps."""
        children = [self.spawn_peer(start, end, *extra) for start, end in spans]
        for child in children:
            child.address = child.wait_for_line("PEER_READY", timeout)
        return children

    def start_gateway(
        self,
        port: int | None = None,
        *extra: str,
        host: str = "127.0.0.1",
        name: str = "gateway",
        timeout: float = 60.0,
    ) -> Child:
        port = port or free_port()
        args = [
            "gateway",
            *self._model_flags(),
            "--dht",
            self.dht_address,
            "--host",
            host,
            "--port",
            str(port),
            *self._key_flags(),
            *self._identity_flags(name, extra),
            *extra,
        ]
        child = self._spawn(name, args)
        scheme = "https" if "--https-cert" in extra else "http"
        child.address = f"{scheme}://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
        wait_http(child, f"{child.address}/health", timeout)
        return child

    def stop(self, timeout: float = 10.0) -> None:
        """Stop peers first (their goodbye reaches a live DHT), then gateways, then the DHT node;
        each group is signalled at once and waited for together."""
        order = {"peer": 0, "gateway": 1}
        groups: dict[int, list[Child]] = {}
        for child in self.children:
            groups.setdefault(order.get(child.name.split("-")[0], 2), []).append(child)
        for _, group in sorted(groups.items()):
            for child in group:
                child.signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for child in group:
                try:
                    child.process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        child.process.wait(5)
        self.children.clear()

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_http(child: Child, url: str, timeout: float) -> None:
    # only "is it up yet": an HTTPS gateway's certificate is for its clients to check, and the
    # launcher does not know which CA signed it
    context = ssl._create_unverified_context() if url.startswith("https:") else None  # noqa: S323
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited with {child.process.returncode}:\n{child.log()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{child.name} did not answer {url} within {timeout:.0f} s:\n{child.log()[-3000:]}")


def swarm_key_for(args, workdir: Path) -> Path | None:
    """`swarm up`'s swarm key file: --swarm-key-file (made first when --private asks and it is
    absent), a new one in `workdir` for --private alone, else None (an open swarm)."""
    from common.swarm_key import create_swarm_key, load_swarm_key

    path = Path(args.swarm_key_file).expanduser() if args.swarm_key_file else None
    if args.private and path is None:
        return create_swarm_key(workdir / "swarm.key")
    if args.private and not path.exists():
        create_swarm_key(path)
    if path is not None:
        load_swarm_key(path)  # a clear error now rather than from every child
    return path


def swarm_mode_line(swarm_key_file: Path | None, host: str) -> str:
    """What `swarm up` says about its security mode, and what listens where."""
    if swarm_key_file:
        mode = f"private swarm: only processes holding the swarm key {swarm_key_file} can join or call peers"
    else:
        mode = "open swarm: anyone who reaches the DHT may join (start with --private for a private one)"
    where = "peers and the DHT on 127.0.0.1"
    if host in ("127.0.0.1", "localhost", "::1"):
        return f"{mode}; {where}, gateway on {host}"
    return f"{mode}; {where}; the GATEWAY LISTENS BEYOND LOOPBACK on {host}"


def run_local_swarm(args) -> int:
    """`swarm up`: everything on this machine, in the foreground, until Ctrl-C."""
    model_name = None
    if args.model:
        model_dir = Path(args.model)
    else:
        from peer.demo_model import CODE_MODEL_DIR

        model_name, model_dir = DEMO_MODEL_ID, CODE_MODEL_DIR
        if not (model_dir / "model.safetensors").is_file():
            print(f"swarm up: the demo model is missing from this installation ({model_dir}); reinstall the "
                  "package, or pass --model", file=sys.stderr)  # fmt: skip
            return 2
    if args.dry_run:
        print(f"would start: dht, {args.peers} peers over {model_dir}, gateway on {args.host}:{args.port}")
        return 0
    spans = balanced_split(model_dir, args.peers)
    swarm = LocalSwarm(model_dir, log_level="WARNING", model_name=model_name)
    try:
        swarm.swarm_key_file = swarm_key_for(args, swarm.workdir)
    except ValueError as exc:
        print(f"swarm up: error: {exc}", file=sys.stderr)
        return 2
    peer_flags = ["--dtype", args.dtype]
    # The peers share this machine's cores: torch's default (every core in each peer) makes their
    # threads spin against each other (docs/benchmarks-batching.md), so each gets its share.
    threads = args.threads or max(1, (os.cpu_count() or 1) // len(spans))
    peer_flags += ["--threads", str(threads)]
    if args.prepack is not None:
        peer_flags.append("--prepack" if args.prepack else "--no-prepack")
    if args.pipeline_groups is not None:
        peer_flags += ["--pipeline-groups", str(args.pipeline_groups)]
    gateway_flags = ["--redis-url", args.redis_url] if args.redis_url else []
    gateway_flags += ["--keys-file", args.keys_file] if args.keys_file else []
    gateway_flags += ["--redis-keys"] if args.redis_keys else []
    keys_note = (
        "\nEvery request needs an API key (`swarm keys create` prints one): add -H 'Authorization: Bearer KEY'.\n"
        if args.keys_file or args.redis_keys
        else ""
    )
    stop = False

    def request_stop(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, request_stop)
    try:
        print(f"starting the DHT and {len(spans)} peers (logs in {swarm.workdir}) ...", flush=True)
        print(f"  {swarm_mode_line(swarm.swarm_key_file, args.host)}", flush=True)
        swarm.start_dht()
        for (start, end), peer in zip(spans, swarm.start_peers(spans, *peer_flags), strict=True):
            print(f"  peer blocks [{start}, {end}) at {peer.address}", flush=True)
        gateway = swarm.start_gateway(args.port, *gateway_flags, host=args.host)
        model_id = model_name or Path(model_dir).resolve().name
        base = f"{gateway.address}/v1"
        if model_name == DEMO_MODEL_ID:  # a small Python code model: ask it for code
            about = f"a small Python code model; its card: {Path(model_dir) / 'README.md'}"
            example = (
                f"  curl {base}/completions -H 'Content-Type: application/json' \\\n"
                f'    -d \'{{"model": "{model_id}", "prompt": "def fibonacci(n):", "max_tokens": 64, '
                '"temperature": 0}\''
            )
        else:
            about = str(model_dir)
            example = (
                f"  curl -N {base}/chat/completions -H 'Content-Type: application/json' \\\n"
                f'    -d \'{{"model": "{model_id}", "stream": true, '
                f'"messages": [{{"role": "user", "content": "Hello!"}}]}}\''
            )
        print(
            f"\nswarm is up. OpenAI base URL: {base}  (model: {model_id}, {about})\n\n"
            f"{example}\n{keys_note}\nPress Ctrl-C to stop.",
            flush=True,
        )
        while not stop:
            for child in swarm.children:
                if not child.alive():
                    print(f"{child.name} exited:\n{child.log()[-2000:]}", file=sys.stderr)
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping the swarm ...", flush=True)
        swarm.stop()
    return 0

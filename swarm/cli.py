"""The one command line: `swarm up | dht | peer | gateway | demo-model | status`.

Every flag can also come from an environment variable, named in its help text
(`SWARM_<COMMAND>_<FLAG>`), so a docker-compose file can configure services without long command
lines. Heavy imports (torch, transformers, fastapi) happen inside the subcommand that needs them,
so `swarm --help` is instant.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from common.logs import configure_logging
from swarm.keys_cli import add_keys_parser, cmd_keys


class EnvDefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    pass


class _AppendOverEnv(argparse._AppendAction):
    """Append, but flags given on the command line replace a list that came from the environment."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest) is self.default:
            setattr(namespace, self.dest, [])
        super().__call__(parser, namespace, values, option_string)


def _flag(parser: argparse.ArgumentParser, command: str, *names: str, **kwargs) -> None:
    """Add a flag whose default is read from SWARM_<COMMAND>_<FLAG> when that is set."""
    dest = kwargs.get("dest") or names[0].lstrip("-").replace("-", "_")
    env = f"SWARM_{command.upper().replace('-', '_')}_{dest.upper()}"
    if env in os.environ:
        raw = os.environ[env]
        if kwargs.get("action") == "store_true":
            kwargs["default"] = raw.lower() in ("1", "true", "yes", "on")
        elif kwargs.get("action") is argparse.BooleanOptionalAction:  # and "auto" (or ""): None
            kwargs["default"] = (
                None if raw.lower() in ("", "auto") else raw.lower() in ("1", "true", "yes", "on")
            )
        elif kwargs.get("action") == "append":
            kwargs["default"] = [item for item in raw.split(",") if item]
            kwargs["action"] = _AppendOverEnv
        else:
            convert = kwargs.get("type", str)
            kwargs["default"] = convert(raw)
        kwargs.pop("required", None)
    kwargs["help"] = f"{kwargs.get('help', '')} [env: {env}]"
    parser.add_argument(*names, **kwargs)


def _blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"blocks must look like START:END, got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"need 0 <= START < END, got {text!r}")
    return start, end


def _groups(text: str) -> int | None:
    """`--pipeline-groups`: a number in [1, 8], or `auto` (None: the peer chooses)."""
    from peer.batching_config import parse_groups

    if text is None:
        return None
    try:
        return parse_groups(str(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _security_flags(
    parser: argparse.ArgumentParser, command: str, *, identity: bool = True, tls: bool = True
) -> None:
    """The flags of swarm security (docs/security.md) that `command` takes."""
    _flag(parser, command, "--swarm-key-file", default=os.environ.get("SWARM_KEY_FILE"),
          help="swarm key of a private swarm: only members holding it are served and seen in the DHT "
               "(default: $SWARM_KEY_FILE; none: an open swarm)")  # fmt: skip
    if identity:
        _flag(parser, command, "--identity-file", default=None,
              help=f"this {command}'s Ed25519 key, created on first start; its id derives from it "
                   "(default: one per port under $SWARM_HOME/identity)")  # fmt: skip
    if tls:
        _flag(parser, command, "--tls-cert", default=None,
              help="PEM certificate for gRPC between gateways and peers over mutual TLS")  # fmt: skip
        _flag(parser, command, "--tls-key", default=None, help="PEM private key of --tls-cert")
        _flag(parser, command, "--tls-ca", default=None,
              help="PEM CA that members' certificates are signed by: peers require a client certificate it "
                   "signed, clients check peers against it (default: system roots, no client certificates)")  # fmt: skip


def _swarm_security(args, command: str):
    """(swarm key, TLS files) from the flags; SystemExit with a one-line reason when they are unusable."""
    from common.grpc_security import TlsFiles
    from common.swarm_key import load_swarm_key

    try:
        key = load_swarm_key(args.swarm_key_file)
        tls = TlsFiles.load(
            getattr(args, "tls_cert", None), getattr(args, "tls_key", None), getattr(args, "tls_ca", None)
        )
    except ValueError as exc:
        raise SystemExit(f"swarm {command}: error: {exc}") from None
    return key, tls


def identity_file(explicit: str | None, name: str) -> Path:
    """Where a peer or gateway keeps its key: `explicit`, else under $SWARM_HOME/identity by `name`
    (kind, span, port), the first such file no running process holds, so a restarted process keeps
    its id and two processes started alike still get one each."""
    import re

    from common.identity import identity_in_use
    from swarm.launcher import DEFAULT_CACHE

    if explicit:
        return Path(explicit)
    base = DEFAULT_CACHE / "identity" / re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    for index in range(256):
        path = base.with_name(f"{base.name}{f'.{index}' if index else ''}.key")
        if not identity_in_use(path):
            return path
    raise SystemExit(f"every identity file like {base}.key is in use; give --identity-file")


def _addresses(values: list[str] | None) -> list[tuple[str, int]]:
    from discovery.records import parse_address

    result = []
    for value in values or []:
        result.extend(parse_address(item) for item in value.split(",") if item)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm",
        description="Serve a language model from a swarm of machines behind an OpenAI-compatible API.",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("SWARM_LOG_LEVEL", "INFO"),
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="least severe log lines to print (default: %(default)s) [env: SWARM_LOG_LEVEL]",
    )
    parser.add_argument(
        "--log-format",
        default=os.environ.get("SWARM_LOG_FORMAT", "kv"),
        choices=["kv", "json"],
        help="one line per event, as key=value pairs or as JSON; each line of a request carries its "
        "request_id (default: %(default)s) [env: SWARM_LOG_FORMAT]",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser(
        "up", help="start a whole local swarm: DHT, peers and gateway", formatter_class=EnvDefaultsFormatter
    )
    _flag(up, "up", "--model",
          help="model folder (or hub id); default: the demo code model that ships with the package (a 4M-parameter "
               "Llama trained on the Python standard library, served as swarm-demo)")  # fmt: skip
    _flag(up, "up", "--peers", type=int, default=2, help="block peers to split the model between")
    _flag(up, "up", "--host", default="127.0.0.1", help="address the gateway listens on")
    _flag(
        up,
        "up",
        "--port",
        type=int,
        default=8000,
        help="HTTP port of the gateway (the OpenAI base URL is http://HOST:PORT/v1)",
    )
    _flag(up, "up", "--redis-url", default=None, help="pin sessions in this Redis (default: in memory)")
    _flag(up, "up", "--keys-file", default=None,
          help="the gateway serves the API keys of this file (`swarm keys create`; docs/users.md)")  # fmt: skip
    _flag(up, "up", "--redis-keys", action="store_true",
          help="the gateway serves the API keys kept in --redis-url (`swarm keys create --redis-url`)")  # fmt: skip
    _flag(
        up,
        "up",
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="compute dtype of every peer (auto: see `swarm peer --help`)",
    )
    _flag(up, "up", "--threads", type=int, default=0,
          help="torch threads per peer (0: the machine's cores divided among the peers)")  # fmt: skip
    _flag(
        up,
        "up",
        "--prepack",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="peers keep oneDNN-packed weights too, or not (default: each peer decides by its memory; see "
        "`swarm peer --help`)",
    )
    _flag(
        up,
        "up",
        "--pipeline-groups",
        type=_groups,
        default="auto",
        help="groups the first peer keeps, N or auto (see `swarm peer --help`)",
    )
    _flag(up, "up", "--private", action="store_true",
          help="a private swarm: create a swarm key (in the logs folder unless --swarm-key-file names a file "
               "that does not exist yet) that every process of this swarm holds")  # fmt: skip
    _security_flags(up, "up", identity=False, tls=False)
    _flag(up, "up", "--dry-run", action="store_true", help="print the commands that would run, start nothing")

    dht = commands.add_parser("dht", help="run a DHT bootstrap node", formatter_class=EnvDefaultsFormatter)
    _flag(
        dht, "dht", "--host", default="127.0.0.1", help="UDP address to listen on (0.0.0.0: every interface)"
    )
    _flag(dht, "dht", "--port", type=int, default=31337, help="UDP port (0: any free port)")
    _flag(dht, "dht", "--bootstrap", action="append", help="other DHT nodes to join, host:port (repeatable)")
    _security_flags(dht, "dht", identity=False, tls=False)
    _flag(dht, "dht", "--dry-run", action="store_true", help="validate the flags and exit")

    peer = commands.add_parser("peer", help="serve a range of blocks", formatter_class=EnvDefaultsFormatter)
    _flag(peer, "peer", "--model", required=True, help="model folder (or hub id where online)")
    _flag(
        peer,
        "peer",
        "--model-name",
        default=None,
        help="model id announced in the DHT (default: folder name)",
    )
    _flag(
        peer,
        "peer",
        "--blocks",
        type=_blocks,
        default=None,
        help="blocks to serve, START:END (END excluded). Without it the peer chooses: --num-blocks blocks (or "
             "as many as --memory-budget holds) where the swarm's per-block throughput is lowest, and moves "
             "every --balance-interval when that raises the swarm's bottleneck (peer/block_selection.py)",
    )  # fmt: skip
    _flag(peer, "peer", "--num-blocks", type=int, default=0,
          help="without --blocks: how many blocks to serve (0: as many as --memory-budget holds)")  # fmt: skip
    _flag(peer, "peer", "--memory-budget", type=int, default=0,
          help="without --blocks and --num-blocks: bytes for weights and KV cache (0: memory available at start; "
               "the KV cache keeps --cache-bytes, else a quarter)")  # fmt: skip
    _flag(peer, "peer", "--balance-interval", type=float, default=60.0,
          help="without --blocks: seconds between checks whether moving would help the swarm (jittered x0.5-1.5; "
               "moves when the bottleneck would rise past a 0.75 balance quality; 0: never move)")  # fmt: skip
    _flag(peer, "peer", "--dht", action="append", help="DHT node(s) to join, host:port (repeatable)")
    _flag(
        peer,
        "peer",
        "--host",
        default="127.0.0.1",
        help="address the gRPC server (and --metrics-port) listens on (0.0.0.0: every interface)",
    )
    _flag(peer, "peer", "--port", type=int, default=0, help="gRPC port (0: any free port)")
    _flag(
        peer, "peer", "--announce-host", default=None, help="host others reach this peer at (default: --host)"
    )
    _flag(peer, "peer", "--announce-port", type=int, default=0,
          help="port others reach this peer at, when it is not --port (a NAT or proxy in front); 0: --port")  # fmt: skip
    _flag(peer, "peer", "--dht-port", type=int, default=0, help="UDP port of this peer's own DHT node")
    _flag(peer, "peer", "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
          help="compute dtype; auto: bf16 on a GPU that has it, fp16 on older GPUs, fp32 on CPU")  # fmt: skip
    _flag(peer, "peer", "--quant", default="none", choices=["none", "int8", "nf4"],
          help="weight quantization: int8 (CPU: dynamic int8, needs float32; CUDA: bitsandbytes), nf4 (CUDA only)")  # fmt: skip
    _flag(peer, "peer", "--wire-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
          help="dtype of the hidden states this peer sends unless the gateway asks otherwise; auto: compute dtype")  # fmt: skip
    _flag(peer, "peer", "--device", default="auto", help="cpu, cuda, cuda:N or auto")
    _flag(
        peer,
        "peer",
        "--cache-tokens",
        type=int,
        default=0,
        help="KV cache budget in tokens (0: half of free memory)",
    )
    _flag(peer, "peer", "--cache-bytes", type=int, default=0,
          help="KV cache budget in bytes, used when --cache-tokens is 0 (0: half of free memory)")  # fmt: skip
    _flag(peer, "peer", "--open-wait", type=float, default=5.0,
          help="seconds a new session waits for cache room before RESOURCE_EXHAUSTED")  # fmt: skip
    _flag(peer, "peer", "--idle-ttl", type=float, default=300.0,
          help="seconds a closed session's cache is kept so the next turn can resume it (0: never)")  # fmt: skip
    _flag(peer, "peer", "--first-step-timeout", type=float, default=30.0,
          help="seconds an opened session may wait for its first step; then it is closed (DEADLINE_EXCEEDED) and "
               "its cache room released. Keep it above the gateway's open wait plus the earlier hops' prefills "
               "(--step-timeout each) (0: wait forever)")  # fmt: skip
    _flag(peer, "peer", "--max-sessions-per-client", type=int, default=1024,
          help="sessions one client host (the gateway's address) may hold open at once; past it an open gets "
               "RESOURCE_EXHAUSTED. A gateway opens one per choice of each request it serves")  # fmt: skip
    _flag(peer, "peer", "--max-batch-tokens", type=int, default=256,
          help="tokens per forward pass at most; longer prompts are prefilled in chunks of this size")  # fmt: skip
    _flag(peer, "peer", "--batch-wait-ms", type=float, default=3.0,
          help="ms a forward pass waits for steps of active sessions still in flight; the first span waits up to "
               "1.5 round trips (max 250 ms) to merge out-of-phase groups (0: no waiting at all)")  # fmt: skip
    _flag(peer, "peer", "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    _flag(peer, "peer", "--pipeline-groups", type=_groups, default="auto",
          help="first span of a route: keep sessions in this many groups that take turns, so later peers "
               "compute one group while this one computes the next. auto: 2 groups from 6 live sessions on "
               "a first span that is not also the last and has packed weights, else 1 (peer/batching_config.py)")  # fmt: skip
    _flag(peer, "peer", "--prepack", action=argparse.BooleanOptionalAction, default=None,
          help="fp32 on CPU: also keep a oneDNN-packed copy of each weight for batched passes where it is faster "
               "(2x weight memory; more tokens/s with many users, see peer/gemm.py). Default: packed when the "
               "copy takes at most a quarter of the memory left after the weights and an explicit KV budget")  # fmt: skip
    _flag(peer, "peer", "--heartbeat", type=float, default=5.0, help="seconds between DHT announcements")
    _flag(peer, "peer", "--ttl", type=float, default=15.0, help="seconds an announcement stays valid")
    _flag(
        peer,
        "peer",
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds to let live sessions finish on SIGTERM",
    )
    _flag(peer, "peer", "--metrics-port", type=int, default=None,
          help="serve Prometheus /metrics over HTTP on this port, on --host (0: any free port, announced "
               "in the DHT; default: no metrics server)")  # fmt: skip
    _security_flags(peer, "peer")
    _flag(peer, "peer", "--dry-run", action="store_true", help="validate the flags and exit")

    gateway = commands.add_parser(
        "gateway", help="serve the OpenAI-compatible API", formatter_class=EnvDefaultsFormatter
    )
    _flag(gateway, "gateway", "--model", action="append", required=True,
          help="model folder or hub id whose tokenizer and config to serve (repeatable)")  # fmt: skip
    _flag(
        gateway,
        "gateway",
        "--model-name",
        action="append",
        help="model id for each --model (default: folder name)",
    )
    _flag(gateway, "gateway", "--dht", action="append", help="DHT node(s) to join, host:port (repeatable)")
    _flag(
        gateway,
        "gateway",
        "--host",
        default="127.0.0.1",
        help="address the HTTP API (and /metrics, /swarm) listens on (0.0.0.0: every interface)",
    )
    _flag(
        gateway,
        "gateway",
        "--port",
        type=int,
        default=8000,
        help="HTTP port of the API, /metrics and the /swarm map",
    )
    _flag(
        gateway, "gateway", "--dht-port", type=int, default=0, help="UDP port of the gateway's own DHT node"
    )
    _flag(gateway, "gateway", "--redis-url", default=None, help="pin sessions in Redis (default: in memory)")
    _flag(gateway, "gateway", "--api-key", default=None,
          help="the admin key: a bearer token for every route, without limits; the only key /metrics, /swarm, "
               "/swarm/api, /docs and /openapi.json accept (without a key store it is the API's one key)")  # fmt: skip
    _flag(gateway, "gateway", "--keys-file", default=None,
          help="serve the API keys of this file (made with `swarm keys create`): each request needs one, within "
               "its limits, models and credit (docs/users.md)")  # fmt: skip
    _flag(gateway, "gateway", "--redis-keys", action="store_true",
          help="serve the API keys kept in --redis-url (`swarm keys create --redis-url`): replicas share keys, "
               "limits, credit and usage")  # fmt: skip
    _flag(gateway, "gateway", "--key-check-interval", type=float, default=1.0,
          help="seconds between a stream's re-reads of its key: a key revoked or expired mid-stream ends it "
               "with an error event within this time")  # fmt: skip
    _flag(gateway, "gateway", "--open-ops", action="store_true",
          help="leave /metrics, /swarm, /swarm/api, /docs and /openapi.json open to anyone even with --api-key or a "
               "key store (/health always is)")  # fmt: skip
    _flag(gateway, "gateway", "--session-secret", default=None,
          help="key that derives the peers' session ids from the pins (give every replica sharing a Redis the "
          "same one, so any replica resumes the peers' caches; default: random per process)")  # fmt: skip
    _flag(
        gateway,
        "gateway",
        "--step-timeout",
        type=float,
        default=10.0,
        help="seconds a peer may take per step",
    )
    _flag(gateway, "gateway", "--failover-timeout", type=float, default=5.0,
          help="seconds to look for a replacement after a peer fails mid-stream; then the stream ends with an error")  # fmt: skip
    _flag(gateway, "gateway", "--session-ttl", type=float, default=3600.0, help="seconds a session pin lives")
    _flag(gateway, "gateway", "--wire-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
          help="dtype hidden states travel in between peers; auto: each sender's compute dtype")  # fmt: skip
    _flag(gateway, "gateway", "--relay", action="store_true",
          help="carry every hop's hidden states through the gateway instead of peer to peer (push, the default; "
               "an edge whose peer cannot reach the next is relayed either way)")  # fmt: skip
    _flag(gateway, "gateway", "--decode-loop", action=argparse.BooleanOptionalAction, default=True,
          help="in push mode the last peer sends each next decode step straight to the first, and the gateway "
               "only reads the tokens; --no-decode-loop: the gateway sends every step")  # fmt: skip
    _flag(gateway, "gateway", "--max-body-bytes", type=int, default=4 << 20,
          help="largest request body (counted as it arrives, chunked or not); larger ones get 413")  # fmt: skip
    _flag(gateway, "gateway", "--max-concurrent", type=int, default=256,
          help="generations in flight before new requests get 429 with Retry-After (0: no limit)")  # fmt: skip
    _flag(gateway, "gateway", "--verify-fraction", type=float, default=0.01,
          help="re-execute this fraction of steps on a replica of the same blocks and ban peers whose answers "
          "disagree (0: off; checks need a second peer per span, a third to tell which one lies)")  # fmt: skip
    _flag(gateway, "gateway", "--verify-ban", type=float, default=3600.0,
          help="seconds a peer convicted of a lying or malformed answer stays banned")  # fmt: skip
    _flag(gateway, "gateway", "--log-prompts", action="store_true",
          help="also log each request's prompt and completion text (off: logs never hold user text)")  # fmt: skip
    _security_flags(gateway, "gateway")
    _flag(
        gateway,
        "gateway",
        "--https-cert",
        default=None,
        help="serve the API over HTTPS with this PEM certificate",
    )
    _flag(gateway, "gateway", "--https-key", default=None, help="PEM private key of --https-cert")
    _flag(gateway, "gateway", "--dry-run", action="store_true", help="validate the flags and exit")

    demo = commands.add_parser(
        "demo-model",
        help="write a demo model folder (random weights, or the trained code model)",
        description="Write a random-weight model folder from a preset and a seed, or copy (--preset code) or "
        "retrain (--train) the demo code model that `swarm up` serves. Prints the folder.",
        formatter_class=EnvDefaultsFormatter,
    )
    _flag(
        demo, "demo-model", "--path", type=Path, default=None, help="folder to write (default: in SWARM_HOME)"
    )
    _flag(demo, "demo-model", "--preset", default="demo", choices=["code", "demo", "tiny", "bench"],
          help="code: the trained demo code model shipped with the package (copied to --path; printed without "
               "it); random weights: demo: 4 blocks, hidden 256; tiny: 3 blocks with GQA; bench: ~156M params, "
               "hidden 1024, 8 blocks")  # fmt: skip
    _flag(demo, "demo-model", "--seed", type=int, default=0,
          help="random seed of the weights (and, with --train, of the data order)")  # fmt: skip
    from peer.demo_families import ARCHS  # a table of names: no torch imported here

    _flag(demo, "demo-model", "--arch", default=None, choices=sorted(ARCHS),
          help="write a small random model of this family instead (transformers' own classes, the family's "
               "features on: sliding windows, biases, soft-capping, ALiBi, experts...) with the demo "
               "tokenizer; needs --path")  # fmt: skip
    _flag(demo, "demo-model", "--train", action="store_true",
          help="train the demo code model anew on this Python's standard library (~25 min on 2 cores; the same "
               "run as `python -m peer.train_demo`, whose --help has more knobs)")  # fmt: skip

    status = commands.add_parser(
        "status",
        help="print the swarm as a table",
        description="Print every announced peer: span, state, load, free cache, dtype and throughput. Reads "
        "the DHT (--dht), or a gateway's /swarm/api (--gateway: the same data as its /swarm map, plus the "
        "routes in use and whether each peer answers).",
        formatter_class=EnvDefaultsFormatter,
    )
    _flag(status, "status", "--dht", action="append", help="DHT node to ask, host:port (repeatable)")
    _flag(
        status,
        "status",
        "--gateway",
        default=None,
        help="gateway base URL to ask instead, e.g. http://127.0.0.1:8000",
    )
    _flag(status, "status", "--model", default=None, help="show only this model id (default: every model)")
    _security_flags(status, "status", identity=False, tls=False)
    _flag(status, "status", "--api-key", default=None,
          help="with --gateway: the gateway's admin key, which its /swarm/api needs when keys are configured")  # fmt: skip
    add_keys_parser(commands, _flag, EnvDefaultsFormatter)
    return parser


def model_id_for(model: str, name: str | None = None) -> str:
    """The id a model is announced and requested under: explicit, or the folder's name."""
    if name:
        return name
    path = Path(model)
    return path.resolve().name if path.exists() else model


def default_announce_host(listen_host: str, bootstrap: list[tuple[str, int]]) -> str | None:
    """The address to announce when none is given: the listen address if it is a specific one,
    else the local address of the interface that reaches the DHT (how other machines see us)."""
    import socket

    if listen_host not in ("0.0.0.0", "", "::"):
        return None
    for host, port in bootstrap:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.connect((host, port))  # UDP connect sends nothing; it only picks a route
                return probe.getsockname()[0]
        except OSError:
            continue
    return "127.0.0.1"


def resolve_dtype(name: str, device: str):
    import torch

    if name != "auto":
        return getattr(torch, name)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_dht(args) -> int:
    from discovery.node import run_dht_node

    bootstrap = _addresses(args.bootstrap)
    if args.dry_run:
        print(f"dht node on {args.host}:{args.port}, bootstrap {bootstrap}")
        return 0

    swarm_key, _ = _swarm_security(args, "dht")

    def announce_ready(dht) -> None:
        from common.grpc_security import listen_warning
        from common.swarm_key import key_fingerprint

        mode = f"private swarm (key {key_fingerprint(swarm_key)})" if swarm_key else "open swarm"
        print(f"DHT node on {dht.address}: {mode}{listen_warning(dht.host)}", flush=True)
        print(f"DHT_READY {dht.address}", flush=True)  # launchers and tests wait for this line

    asyncio.run(run_dht_node(args.host, args.port, bootstrap, on_ready=announce_ready, swarm_key=swarm_key))
    return 0


def cmd_peer(args) -> int:
    bootstrap = _addresses(args.dht)
    if args.dry_run:
        blocks = f"{args.blocks[0]}:{args.blocks[1]}" if args.blocks else "auto"
        print(f"peer {args.model} blocks {blocks} dht {bootstrap}")
        return 0
    from common.model_dir import resolve_model_dir
    from peer.quant import validate
    from peer.server import PeerConfig, run_peer

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    try:  # before any weight is read: a bad combination is a one-line error, not a traceback
        validate(args.quant, device, dtype)
        if args.first_step_timeout < 0:
            raise ValueError(f"--first-step-timeout must be >= 0 (0: off), got {args.first_step_timeout}")
        if args.max_sessions_per_client < 1:
            raise ValueError(f"--max-sessions-per-client must be >= 1, got {args.max_sessions_per_client}")
        if args.num_blocks < 0 or args.memory_budget < 0 or args.balance_interval < 0:
            raise ValueError("--num-blocks, --memory-budget and --balance-interval must be >= 0")
        if args.blocks is None and not bootstrap:
            raise ValueError("without --blocks the peer chooses its blocks from the swarm: give --dht")
        if (Path(args.model) / "config.json").is_file():  # an unsupported config field: one line, now
            from peer.model import SpanConfig

            SpanConfig.from_model_dir(args.model)
    except ValueError as exc:
        print(f"swarm peer: error: {exc}", file=sys.stderr)
        return 2
    swarm_key, tls = _swarm_security(args, "peer")
    model_id = model_id_for(args.model, args.model_name)
    blocks_label = f"{args.blocks[0]}-{args.blocks[1]}" if args.blocks else "auto"
    config = PeerConfig(
        model_dir=resolve_model_dir(args.model),
        model_id=model_id_for(args.model, args.model_name),
        start=args.blocks[0] if args.blocks else None,
        end=args.blocks[1] if args.blocks else None,
        num_blocks=args.num_blocks,
        memory_budget=args.memory_budget,
        balance_interval=args.balance_interval,
        host=args.host,
        port=args.port,
        announce_host=args.announce_host or default_announce_host(args.host, bootstrap),
        announce_port=args.announce_port,
        dht_bootstrap=bootstrap,
        dht_port=args.dht_port,
        dtype=dtype,
        quant=args.quant,
        device=device,
        wire_dtype=None if args.wire_dtype == "auto" else resolve_dtype(args.wire_dtype, device),
        cache_tokens=args.cache_tokens,
        cache_bytes=args.cache_bytes,
        open_wait=args.open_wait,
        idle_ttl=args.idle_ttl,
        first_step_timeout=args.first_step_timeout,
        max_sessions_per_client=args.max_sessions_per_client,
        max_batch_tokens=args.max_batch_tokens,
        batch_wait_ms=args.batch_wait_ms,
        threads=args.threads,
        prepack=args.prepack,
        pipeline_groups=args.pipeline_groups,
        heartbeat=args.heartbeat,
        ttl=args.ttl,
        drain_timeout=args.drain_timeout,
        metrics_port=args.metrics_port,
        identity_file=identity_file(args.identity_file, f"peer-{model_id}-{blocks_label}-{args.port}"),
        swarm_key=swarm_key,
        tls=tls,
    )
    asyncio.run(run_peer(config))
    # Everything is closed by now; interpreter teardown with torch and grpc loaded takes seconds
    # that a restarting peer (or a test) would wait for, so leave at once.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)


def cmd_gateway(args) -> int:
    names = args.model_name or []
    if names and len(names) != len(args.model):
        raise SystemExit("give one --model-name per --model, or none")
    models = {model_id_for(model, names[i] if names else None): model for i, model in enumerate(args.model)}
    if args.redis_keys and not args.redis_url:
        raise SystemExit("swarm gateway: --redis-keys needs --redis-url (the Redis the keys are in)")
    if args.redis_keys and args.keys_file:
        raise SystemExit("swarm gateway: give --keys-file or --redis-keys, not both")
    bootstrap = _addresses(args.dht)
    if not 0.0 <= args.verify_fraction <= 1.0:
        raise SystemExit(f"--verify-fraction must be in [0, 1], got {args.verify_fraction}")
    if args.verify_ban <= 0:
        raise SystemExit(f"--verify-ban must be > 0, got {args.verify_ban}")
    if bool(args.https_cert) != bool(args.https_key):
        raise SystemExit("swarm gateway: HTTPS needs both --https-cert and --https-key")
    swarm_key, tls = _swarm_security(args, "gateway")
    if args.dry_run:
        print(f"gateway on {args.host}:{args.port} serving {models}, dht {bootstrap}")
        return 0
    # The gateway needs no torch, but transformers imports it whenever it is installed (as it is
    # on any machine that also runs a peer): ~240 MB of memory and ~2 s of start-up for nothing.
    # Run as if it were absent (tests/test_layers.py checks that everything works that way).
    sys.modules.setdefault("torch", None)
    from gateway.app import run_gateway
    from gateway.settings import GatewaySettings

    settings = GatewaySettings(
        models=models,
        dht_bootstrap=bootstrap,
        host=args.host,
        port=args.port,
        dht_port=args.dht_port,
        redis_url=args.redis_url,
        api_key=args.api_key,
        open_ops=args.open_ops,
        keys_file=args.keys_file,
        redis_keys=args.redis_keys,
        key_check_interval=args.key_check_interval,
        session_secret=args.session_secret,
        step_timeout=args.step_timeout,
        failover_timeout=args.failover_timeout,
        session_ttl=args.session_ttl,
        wire_dtype="" if args.wire_dtype == "auto" else args.wire_dtype,
        relay=args.relay,
        decode_loop=args.decode_loop is not False,
        log_prompts=args.log_prompts,
        verify_fraction=args.verify_fraction,
        verify_ban=args.verify_ban,
        max_concurrent=args.max_concurrent,
        max_body_bytes=args.max_body_bytes,
        identity_file=str(identity_file(args.identity_file, f"gateway-{args.port}")),
        swarm_key=swarm_key,
        tls=tls,
        https_cert=args.https_cert,
        https_key=args.https_key,
    )
    run_gateway(settings)
    return 0


def cmd_demo_model(args) -> int:
    from swarm.launcher import DEFAULT_CACHE

    if args.train:
        from peer.train_demo import TrainConfig, train

        path = args.path or DEFAULT_CACHE / f"swarm-demo-code-seed{args.seed}"
        train(TrainConfig(seed=args.seed), path)
        print(path)
    elif args.arch:
        from peer.demo_families import create_family_model

        if not args.path:
            print("swarm demo-model: --arch needs --path", file=sys.stderr)
            return 2
        print(create_family_model(args.path, args.arch, seed=args.seed))
    elif args.preset == "code":
        import shutil

        from peer.demo_model import CODE_MODEL_DIR

        if args.path:
            shutil.copytree(CODE_MODEL_DIR, args.path, dirs_exist_ok=True)
        print(args.path or CODE_MODEL_DIR)
    elif args.path:
        from peer.demo_model import create_demo_model

        print(create_demo_model(args.path, preset=args.preset, seed=args.seed))
    else:
        from peer.demo_model import ensure_demo_model

        print(ensure_demo_model(DEFAULT_CACHE, preset=args.preset, seed=args.seed))
    return 0


def cmd_up(args) -> int:
    from swarm.launcher import run_local_swarm

    return run_local_swarm(args)


def cmd_status(args) -> int:
    import logging

    from swarm.status import print_gateway_status, print_status

    if args.log_level != "DEBUG":  # the table is the output; the DHT node's start-up lines are noise
        logging.getLogger("discovery").setLevel(logging.WARNING)

    if args.gateway:
        return print_gateway_status(args.gateway, args.model, api_key=args.api_key)
    if not args.dht:
        raise SystemExit("swarm status: give --dht host:port (or --gateway URL)")
    swarm_key, _ = _swarm_security(args, "status")
    return asyncio.run(print_status(_addresses(args.dht), args.model, swarm_key))


COMMANDS = {
    "up": cmd_up,
    "dht": cmd_dht,
    "peer": cmd_peer,
    "gateway": cmd_gateway,
    "demo-model": cmd_demo_model,
    "status": cmd_status,
    "keys": cmd_keys,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

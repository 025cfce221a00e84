"""A standalone DHT node (a bootstrap node for the swarm) that runs until SIGTERM or SIGINT.

    python -m discovery.node --host 0.0.0.0 --port 8468 [--bootstrap host:port ...]

Every flag can also come from the environment: SWARM_DHT_HOST, SWARM_DHT_PORT,
SWARM_DHT_BOOTSTRAP (comma- or space-separated host:port list), SWARM_LOG_LEVEL.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Callable, Sequence

from discovery.dht import DEFAULT_DHT_PORT, SwarmDHT
from discovery.records import parse_address

log = logging.getLogger(__name__)


async def run_dht_node(
    host: str,
    port: int,
    bootstrap: Sequence[tuple[str, int]] = (),
    stop_event: asyncio.Event | None = None,
    *,
    on_ready: Callable[[SwarmDHT], None] | None = None,
    swarm_key: bytes | None = None,
) -> None:
    """Serve a DHT node on UDP host:port until `stop_event` is set.

    Without `stop_event`, SIGTERM and SIGINT stop it (main thread only). `on_ready` gets the
    started node, e.g. to learn the port picked for port 0. With `swarm_key` it serves a private
    swarm (`discovery.dht`: datagrams without the key's tag are dropped).
    """
    if stop_event is None:
        stop_event = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop_event.set)
    dht = SwarmDHT(swarm_key=swarm_key)
    await dht.start(host, port, list(bootstrap))
    try:
        log.info("DHT node ready on %s (node id %s)", dht.address, dht.node_id[:12])
        if on_ready is not None:
            on_ready(dht)
        await stop_event.wait()
    finally:
        log.info("DHT node on %s stopping", dht.address)
        dht.stop()


def _split_list(text: str) -> list[str]:
    return [item for item in text.replace(",", " ").split() if item]


def build_parser() -> argparse.ArgumentParser:
    env = os.environ
    parser = argparse.ArgumentParser(prog="python -m discovery.node", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--host", default=env.get("SWARM_DHT_HOST", "0.0.0.0"), help="UDP interface (env SWARM_DHT_HOST)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(env.get("SWARM_DHT_PORT", DEFAULT_DHT_PORT)),
        help=f"UDP port, 0 for any free one (env SWARM_DHT_PORT, default {DEFAULT_DHT_PORT})",
    )
    parser.add_argument(
        "--bootstrap",
        nargs="*",
        default=_split_list(env.get("SWARM_DHT_BOOTSTRAP", "")),
        metavar="HOST:PORT",
        help="other DHT nodes to join (env SWARM_DHT_BOOTSTRAP)",
    )
    parser.add_argument("--log-level", default=env.get("SWARM_LOG_LEVEL", "INFO"), help="env SWARM_LOG_LEVEL")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        bootstrap = [parse_address(item) for item in args.bootstrap]
    except ValueError as exc:
        parser.error(str(exc))
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    asyncio.run(run_dht_node(args.host, args.port, bootstrap))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

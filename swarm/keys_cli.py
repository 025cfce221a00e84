"""`swarm keys create | list | revoke | usage`: the API keys a gateway serves (gateway/keys.py).

Keys live in a JSON file (`--keys-file`, default `$SWARM_HOME/keys.json`; serve it with
`swarm gateway --keys-file`) or, with `--redis-url`, in Redis (serve with `swarm gateway
--redis-url URL --redis-keys`, shared by every replica). `create` prints the secret once: only its
hash is stored. The commands work while gateways run: they read and change the same store.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time


def default_keys_file() -> str:
    from swarm.launcher import DEFAULT_CACHE

    return str(DEFAULT_CACHE / "keys.json")


def add_keys_parser(commands, flag, formatter) -> None:
    """The `keys` subcommand; `flag` is the CLI's `_flag` (every flag has an env var)."""
    keys = commands.add_parser(
        "keys",
        help="create, list, revoke API keys and read their usage",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=formatter,
    )
    actions = keys.add_subparsers(dest="keys_action", required=True, metavar="ACTION")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help_text, description=help_text, formatter_class=formatter)
        flag(parser, "keys", "--keys-file", default=None,
             help="JSON file of keys (default: $SWARM_HOME/keys.json, unless --redis-url)")  # fmt: skip
        flag(parser, "keys", "--redis-url", default=None,
             help="keep the keys in this Redis instead of a file (what `swarm gateway --redis-keys` serves)")  # fmt: skip
        return parser

    create = action("create", "create a key and print its secret (shown only this once)")
    flag(create, "keys", "--name", default="", help="a label for the key (who or what uses it)")
    flag(create, "keys", "--rpm", type=int, default=0, help="requests per minute (0: no limit)")
    flag(create, "keys", "--tpm", type=int, default=0,
         help="tokens per minute, prompt + max_tokens reserved per request (0: no limit)")  # fmt: skip
    flag(create, "keys", "--credits", type=int, default=None,
         help="tokens the key may spend in all, prompt + completion (default: no limit)")  # fmt: skip
    flag(create, "keys", "--model", action="append", dest="models",
         help="a model id the key may call (repeatable; default: every model)")  # fmt: skip
    flag(create, "keys", "--expires-in", type=float, default=None,
         help="seconds until the key expires (default: never)")  # fmt: skip
    listing = action("list", "list the keys (never their secrets)")
    flag(listing, "keys", "--json", action="store_true", help="print JSON instead of a table")
    revoke = action("revoke", "revoke a key: its requests fail at once, its streams end with an error")
    revoke.add_argument("key_id", help="the key's id (key_..., from `swarm keys list`)")
    usage = action("usage", "a key's usage (requests, prompt and completion tokens, per model) and credit")
    usage.add_argument("key_id", help="the key's id (key_..., from `swarm keys list`)")
    flag(usage, "keys", "--json", action="store_true", help="print the JSON /v1/usage answers")


def _store(args):
    from gateway.keys import open_store

    return open_store(keys_file=args.keys_file or default_keys_file(), redis_url=args.redis_url)


def _when(stamp: float | None) -> str:
    return "never" if stamp is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


async def _run(args) -> int:
    from gateway.keys import new_key, usage_page

    store = _store(args)
    try:
        if args.keys_action == "create":
            expires = None if args.expires_in is None else time.time() + args.expires_in
            try:
                key, secret = new_key(args.name, args.rpm, args.tpm, args.credits, args.models, expires)
            except ValueError as exc:
                print(f"swarm keys: error: {exc}", file=sys.stderr)
                return 2
            await store.add(key)
            where = f"redis {args.redis_url}" if args.redis_url else args.keys_file or default_keys_file()
            print(secret)
            print(f"created {key.id} in {where}; the secret above is shown only once", file=sys.stderr)
            return 0
        if args.keys_action == "list":
            keys = await store.list()
            if args.json:
                print(
                    json.dumps(
                        [{k: v for k, v in key.to_dict().items() if k != "hash"} for key in keys], indent=1
                    )
                )
                return 0
            print(f"{'id':21} {'name':16} {'status':8} {'rpm':>6} {'tpm':>8} {'credits':>10} {'requests':>8} "
                  f"{'tokens':>10}  models / expires")  # fmt: skip
            for key in keys:
                used = key.usage["prompt_tokens"] + key.usage["completion_tokens"]
                credits = "-" if key.credits is None else str(key.credits)
                print(f"{key.id:21} {key.name[:16]:16} {key.state():8} {key.rpm or '-':>6} {key.tpm or '-':>8} "
                      f"{credits:>10} {key.usage['requests']:>8} {used:>10}  "
                      f"{','.join(key.models) or 'all'} / {_when(key.expires_at)}")  # fmt: skip
            return 0
        key = await store.get(args.key_id)
        if key is None:
            print(f"swarm keys: error: no key {args.key_id}", file=sys.stderr)
            return 1
        if args.keys_action == "revoke":
            await store.revoke(key.id)
            print(f"revoked {key.id}")
            return 0
        if args.json:
            print(json.dumps(usage_page(key, time.time()), indent=1))
            return 0
        total = key.usage
        print(f"{key.id} ({key.name or 'no name'}): {key.state()}, credit left: "
              f"{'unlimited' if key.credits is None else key.credits}")  # fmt: skip
        print(f"  {'model':24} {'requests':>8} {'prompt':>10} {'completion':>10}")
        for model, counts in sorted(total["models"].items()):
            print(f"  {model:24} {counts['requests']:>8} {counts['prompt_tokens']:>10} "
                  f"{counts['completion_tokens']:>10}")  # fmt: skip
        print(
            f"  {'total':24} {total['requests']:>8} {total['prompt_tokens']:>10} {total['completion_tokens']:>10}"
        )
        return 0
    finally:
        await store.close()


def cmd_keys(args) -> int:
    return asyncio.run(_run(args))

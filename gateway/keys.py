"""The API-key store: who may call the gateway, within which limits, and what they used.

A key has an id (`key_…`, safe to show and log), a secret (`sk-swarm-…`, shown once when created),
per-minute limits on requests and tokens (`gateway.ratelimit`), an optional credit balance in tokens
(prompt + completion tokens are debited from it), the models it may call (empty: all), an optional
expiry, a revoked flag, and usage counters (requests, prompt and completion tokens, in total and per
model).

Secrets are stored only as their SHA-256. A slow password hash (bcrypt, argon2) protects guessable
passwords; these secrets are 256 random bits, so a fast hash cannot be brute-forced, and it lets a
request find its key by the hash in one lookup.

Two backends with one interface (`KeyStore`):

* `FileKeyStore`: one JSON file (mode 0600), rewritten atomically (a temporary file renamed over it)
  under an advisory lock that `swarm keys` takes too, so the CLI can create and revoke keys while a
  gateway runs; the gateway re-reads the file when it changes. Credits and usage are written to the
  file as they change; the per-minute buckets live in the gateway's memory. One gateway per file.
* `RedisKeyStore`: everything in Redis, shared by every gateway replica. A reservation (limits,
  credit) and its settlement are each one Lua script, so they are atomic across replicas, and the
  scripts read Redis' own clock (`TIME`), so replicas' clocks do not matter.

Redis layout: `swarm:apikey:<id>` (a hash: the key's fields, counters and buckets),
`swarm:apikey:<id>:models` (usage per model: `<model>|requests`, `|prompt_tokens`,
`|completion_tokens`), `swarm:apikey-hash:<sha256>` -> id, and the set `swarm:apikeys` of ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import math
import os
import secrets
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from gateway.ratelimit import Bucket, LimitState, Verdict, give_back, take

SECRET_PREFIX = "sk-swarm-"
COUNTERS = ("requests", "prompt_tokens", "completion_tokens")


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def empty_usage() -> dict:
    return {**dict.fromkeys(COUNTERS, 0), "models": {}}


@dataclass
class ApiKey:
    id: str
    name: str
    hash: str
    created: float
    rpm: int = 0  # requests per minute (0: no limit)
    tpm: int = 0  # tokens per minute (0: no limit)
    credits: int | None = None  # tokens left to spend (None: no credit limit)
    models: list[str] = field(default_factory=list)  # models it may call (empty: all)
    expires_at: float | None = None  # unix time
    revoked: bool = False
    usage: dict = field(default_factory=empty_usage)

    def state(self, now: float | None = None) -> str:
        """Its state: "revoked", "expired" or "active"."""
        if self.revoked:
            return "revoked"
        if self.expires_at is not None and (now or time.time()) >= self.expires_at:
            return "expired"
        return "active"

    def may_use(self, model: str) -> bool:
        return not self.models or model in self.models

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ApiKey:
        usage = {**empty_usage(), **(data.get("usage") or {})}
        credits = data.get("credits")
        expires = data.get("expires_at")
        return cls(
            id=str(data["id"]),
            name=str(data.get("name", "")),
            hash=str(data["hash"]),
            created=float(data.get("created", 0)),
            rpm=int(data.get("rpm") or 0),
            tpm=int(data.get("tpm") or 0),
            credits=None if credits is None else int(credits),
            models=[str(model) for model in data.get("models") or []],
            expires_at=None if expires is None else float(expires),
            revoked=bool(data.get("revoked", False)),
            usage=usage,
        )


def new_key(
    name: str = "",
    rpm: int = 0,
    tpm: int = 0,
    credits: int | None = None,
    models: list[str] | None = None,
    expires_at: float | None = None,
) -> tuple[ApiKey, str]:
    """A new key and its secret (the store keeps only the secret's hash)."""
    for label, value in (("rpm", rpm), ("tpm", tpm), ("credits", credits or 0)):
        if value < 0:
            raise ValueError(f"{label} must be >= 0, got {value}")
    secret = new_secret()
    key = ApiKey(
        id="key_" + secrets.token_hex(8),
        name=name,
        hash=secret_hash(secret),
        created=time.time(),
        rpm=rpm,
        tpm=tpm,
        credits=credits,
        models=list(models or []),
        expires_at=expires_at,
    )
    return key, secret


def usage_page(key: ApiKey, now: float) -> dict:
    """What `GET /v1/usage` answers about `key` (gateway/routes/usage.py says why this shape)."""
    results = [
        {
            "object": "organization.usage.completions.result",
            "input_tokens": counts["prompt_tokens"],
            "output_tokens": counts["completion_tokens"],
            "input_cached_tokens": 0,
            "num_model_requests": counts["requests"],
            "project_id": None,
            "user_id": None,
            "api_key_id": key.id,
            "model": model,
            "batch": False,
        }
        for model, counts in sorted(key.usage["models"].items())
    ]
    return {
        "object": "page",
        "data": [
            {"object": "bucket", "start_time": int(key.created), "end_time": int(now), "results": results}
        ],
        "has_more": False,
        "next_page": None,
        "key": {
            "id": key.id,
            "name": key.name,
            "status": key.state(now),
            "created_at": int(key.created),
            "expires_at": None if key.expires_at is None else int(key.expires_at),
            "models": key.models or None,
            "rate_limits": {"requests_per_minute": key.rpm or None, "tokens_per_minute": key.tpm or None},
            "credits_remaining": key.credits,
            "usage": {
                "num_model_requests": key.usage["requests"],
                "input_tokens": key.usage["prompt_tokens"],
                "output_tokens": key.usage["completion_tokens"],
            },
        },
    }


class KeyStore(Protocol):
    backend: str

    async def add(self, key: ApiKey) -> None: ...

    async def list(self) -> list[ApiKey]: ...

    async def get(self, key_id: str) -> ApiKey | None: ...

    async def find(self, secret: str) -> ApiKey | None: ...

    async def revoke(self, key_id: str) -> bool: ...

    async def reserve(self, key: ApiKey, tokens: int) -> Verdict:
        """Atomically check the key is live and take one request, `tokens` tokens and `tokens`
        credits, or take nothing and say why."""
        ...

    async def settle(self, key_id: str, model: str, reserved: int, prompt: int, completion: int) -> None:
        """Give back what a reservation did not use and count the usage (a request that used
        nothing is not counted)."""
        ...

    async def close(self) -> None: ...


def _add_usage(usage: dict, model: str, prompt: int, completion: int) -> None:
    per_model = usage["models"].setdefault(model, dict.fromkeys(COUNTERS, 0))
    for target in (usage, per_model):
        target["requests"] += 1
        target["prompt_tokens"] += prompt
        target["completion_tokens"] += completion


class FileKeyStore:
    """Keys in one JSON file (see the module doc)."""

    backend = "file"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._loaded: tuple[tuple, dict[str, ApiKey], dict[str, str]] | None = None
        self._buckets: dict[str, dict[str, Bucket]] = {}
        self._mutex = threading.Lock()  # the buckets, between the threads the work runs in

    # -- the file ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> tuple[dict[str, ApiKey], dict[str, str]]:
        """(keys by id, ids by secret hash), parsed again only when the file changed."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return {}, {}
        version = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if self._loaded is None or self._loaded[0] != version:
            data = json.loads(self.path.read_text() or "{}")
            keys = {key_id: ApiKey.from_dict(raw) for key_id, raw in data.get("keys", {}).items()}
            self._loaded = (version, keys, {key.hash: key.id for key in keys.values()})
        return self._loaded[1], self._loaded[2]

    def _write(self, keys: dict[str, ApiKey]) -> None:
        payload = json.dumps({"version": 1, "keys": {k: v.to_dict() for k, v in keys.items()}}, indent=1)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as out:
                out.write(payload)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def _update(self, change) -> object:
        """Run `change(keys)` on fresh keys under the lock and write them back."""
        with self._locked():
            keys = {k: ApiKey.from_dict(v.to_dict()) for k, v in self._read()[0].items()}
            result = change(keys)
            self._write(keys)
            return result

    # -- the interface -------------------------------------------------------------------------
    async def add(self, key: ApiKey) -> None:
        def change(keys):
            keys[key.id] = key

        await asyncio.to_thread(self._update, change)

    async def list(self) -> list[ApiKey]:
        keys, _ = await asyncio.to_thread(self._read)
        return sorted(keys.values(), key=lambda key: key.created)

    async def get(self, key_id: str) -> ApiKey | None:
        keys, _ = await asyncio.to_thread(self._read)
        return keys.get(key_id)

    async def find(self, secret: str) -> ApiKey | None:
        keys, ids = self._read()  # a stat when nothing changed: no thread needed
        key_id = ids.get(secret_hash(secret))
        return keys.get(key_id) if key_id else None

    async def revoke(self, key_id: str) -> bool:
        def change(keys):
            if key_id not in keys:
                return False
            keys[key_id].revoked = True
            return True

        return bool(await asyncio.to_thread(self._update, change))

    def _reserve(self, key: ApiKey, tokens: int) -> Verdict:
        now = time.monotonic()
        with self._mutex:
            fresh = self._read()[0].get(key.id)
            if fresh is None:
                return Verdict("unknown")
            if fresh.state() != "active":
                return Verdict(fresh.state())
            if fresh.credits is not None and fresh.credits < tokens:
                return Verdict("quota", credits=fresh.credits)
            buckets = self._buckets.setdefault(key.id, {})
            refused, requests, token_state, wait = take(buckets, fresh.rpm, fresh.tpm, tokens, now)
            if refused or fresh.credits is None:
                return Verdict(refused, requests, token_state, wait, fresh.credits)

            def debit(keys):
                keys[key.id].credits -= tokens
                return keys[key.id].credits

            left = self._update(debit)
            return Verdict("", requests, token_state, 0.0, left)

    async def reserve(self, key: ApiKey, tokens: int) -> Verdict:
        return await asyncio.to_thread(self._reserve, key, tokens)

    def _settle(self, key_id: str, model: str, reserved: int, prompt: int, completion: int) -> None:
        unused = reserved - prompt - completion
        with self._mutex:
            current = self._read()[0].get(key_id)
            if current is None:
                return
            give_back(self._buckets.setdefault(key_id, {}), current.tpm, unused, time.monotonic())

            def change(keys):
                key = keys.get(key_id)
                if key is None:
                    return
                if key.credits is not None:
                    key.credits += unused
                if prompt or completion:
                    _add_usage(key.usage, model, prompt, completion)

            if unused and current.credits is not None or prompt or completion:
                self._update(change)

    async def settle(self, key_id: str, model: str, reserved: int, prompt: int, completion: int) -> None:
        await asyncio.to_thread(self._settle, key_id, model, reserved, prompt, completion)

    async def close(self) -> None:
        pass


_RESERVE = """
local k = KEYS[1]
local tokens = tonumber(ARGV[1])
local f = redis.call('HMGET', k, 'id', 'revoked', 'expires_at', 'rpm', 'tpm', 'credits',
                     'req_level', 'req_at', 'tok_level', 'tok_at')
if not f[1] then return {'unknown', '0', '0', '0', ''} end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
if f[2] == '1' then return {'revoked', '0', '0', '0', ''} end
local expires = tonumber(f[3]) or 0
if expires > 0 and now >= expires then return {'expired', '0', '0', '0', ''} end
local rpm = tonumber(f[4]) or 0
local tpm = tonumber(f[5]) or 0
local function level(limit, lvl, at)
  if limit <= 0 then return 0 end
  if not lvl then return limit end
  return math.min(limit, tonumber(lvl) + math.max(0, now - tonumber(at)) * limit / 60)
end
local req = level(rpm, f[7], f[8])
local tok = level(tpm, f[9], f[10])
local credits = f[6]
-- the credit left goes back as an integer reply: tostring() of a Lua number rounds past 14 digits
local left = ''
if credits then left = tonumber(credits) end
local refused = ''
local wait = 0
if credits and tonumber(credits) < tokens then refused = 'quota'
elseif tpm > 0 and tokens > tpm then refused = 'too_large'; wait = -1
elseif rpm > 0 and req < 1 then refused = 'requests'; wait = (1 - req) * 60 / rpm
elseif tpm > 0 and tok < tokens then refused = 'tokens'; wait = (tokens - tok) * 60 / tpm
end
if refused == '' then
  if rpm > 0 then
    req = req - 1
    redis.call('HSET', k, 'req_level', tostring(req), 'req_at', tostring(now))
  end
  if tpm > 0 then
    tok = tok - tokens
    redis.call('HSET', k, 'tok_level', tostring(tok), 'tok_at', tostring(now))
  end
  if credits then left = redis.call('HINCRBY', k, 'credits', -tokens) end
end
return {refused, tostring(req), tostring(tok), tostring(wait), left}
"""

_SETTLE = """
local k = KEYS[1]
if redis.call('EXISTS', k) == 0 then return 0 end
local unused = tonumber(ARGV[1]) - tonumber(ARGV[2]) - tonumber(ARGV[3])
local f = redis.call('HMGET', k, 'tpm', 'credits', 'tok_level', 'tok_at')
local tpm = tonumber(f[1]) or 0
if tpm > 0 and unused ~= 0 and f[3] then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  local lvl = math.min(tpm, tonumber(f[3]) + math.max(0, now - tonumber(f[4])) * tpm / 60)
  redis.call('HSET', k, 'tok_level', tostring(math.min(tpm, lvl + unused)), 'tok_at', tostring(now))
end
if f[2] and unused ~= 0 then redis.call('HINCRBY', k, 'credits', unused) end
if tonumber(ARGV[2]) + tonumber(ARGV[3]) > 0 then
  local m = ARGV[4]
  redis.call('HINCRBY', k, 'requests', 1)
  redis.call('HINCRBY', k, 'prompt_tokens', ARGV[2])
  redis.call('HINCRBY', k, 'completion_tokens', ARGV[3])
  redis.call('HINCRBY', KEYS[2], m .. '|requests', 1)
  redis.call('HINCRBY', KEYS[2], m .. '|prompt_tokens', ARGV[2])
  redis.call('HINCRBY', KEYS[2], m .. '|completion_tokens', ARGV[3])
end
return 1
"""


class RedisKeyStore:
    """Keys in Redis, shared by gateway replicas (see the module doc)."""

    backend = "redis"
    PREFIX = "swarm:apikey:"
    BY_HASH = "swarm:apikey-hash:"
    ALL = "swarm:apikeys"

    def __init__(self, url: str):
        import redis.asyncio as redis

        self._redis = redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._reserve = self._redis.register_script(_RESERVE)
        self._settle = self._redis.register_script(_SETTLE)

    async def add(self, key: ApiKey) -> None:
        mapping = {
            "id": key.id,
            "name": key.name,
            "hash": key.hash,
            "created": repr(key.created),
            "rpm": key.rpm,
            "tpm": key.tpm,
            "models": json.dumps(key.models),
            "expires_at": repr(key.expires_at or 0),
            "revoked": "1" if key.revoked else "0",
            **{counter: key.usage[counter] for counter in COUNTERS},
        }
        if key.credits is not None:
            mapping["credits"] = key.credits
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.PREFIX + key.id, mapping=mapping)
            pipe.set(self.BY_HASH + key.hash, key.id)
            pipe.sadd(self.ALL, key.id)
            await pipe.execute()

    async def get(self, key_id: str) -> ApiKey | None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.PREFIX + key_id)
            pipe.hgetall(self.PREFIX + key_id + ":models")
            raw, per_model = await pipe.execute()
        if not raw or b"id" not in raw:
            return None
        text = {k.decode(): v.decode() for k, v in raw.items()}
        usage = empty_usage()
        for counter in COUNTERS:
            usage[counter] = int(text.get(counter, 0))
        for name, value in per_model.items():
            model, _, counter = name.decode().rpartition("|")
            usage["models"].setdefault(model, dict.fromkeys(COUNTERS, 0))[counter] = int(value)
        expires = float(text.get("expires_at") or 0)
        return ApiKey(
            id=text["id"],
            name=text.get("name", ""),
            hash=text["hash"],
            created=float(text.get("created") or 0),
            rpm=int(text.get("rpm") or 0),
            tpm=int(text.get("tpm") or 0),
            credits=int(text["credits"]) if "credits" in text else None,
            models=json.loads(text.get("models") or "[]"),
            expires_at=expires or None,
            revoked=text.get("revoked") == "1",
            usage=usage,
        )

    async def list(self) -> list[ApiKey]:
        ids = sorted(member.decode() for member in await self._redis.smembers(self.ALL))
        keys = [await self.get(key_id) for key_id in ids]
        return sorted((key for key in keys if key), key=lambda key: key.created)

    async def find(self, secret: str) -> ApiKey | None:
        key_id = await self._redis.get(self.BY_HASH + secret_hash(secret))
        return await self.get(key_id.decode()) if key_id else None

    async def revoke(self, key_id: str) -> bool:
        if not await self._redis.exists(self.PREFIX + key_id):
            return False
        await self._redis.hset(self.PREFIX + key_id, "revoked", "1")
        return True

    async def reserve(self, key: ApiKey, tokens: int) -> Verdict:
        refused, req, tok, wait, credits = (
            part.decode() if isinstance(part, bytes) else str(part)
            for part in await self._reserve(keys=[self.PREFIX + key.id], args=[tokens])
        )
        if refused in ("unknown", "revoked", "expired"):
            return Verdict(refused)
        requests = LimitState.of(key.rpm, float(req)) if key.rpm else LimitState()
        token_state = LimitState.of(key.tpm, float(tok)) if key.tpm else LimitState()
        wait_s = math.inf if float(wait) < 0 else float(wait)
        return Verdict(refused, requests, token_state, wait_s, int(credits) if credits else None)

    async def settle(self, key_id: str, model: str, reserved: int, prompt: int, completion: int) -> None:
        keys = [self.PREFIX + key_id, self.PREFIX + key_id + ":models"]
        await self._settle(keys=keys, args=[reserved, prompt, completion, model])

    async def close(self) -> None:
        await self._redis.aclose()


def open_store(keys_file: str | None = None, redis_url: str | None = None) -> KeyStore:
    if redis_url:
        return RedisKeyStore(redis_url)
    if keys_file:
        return FileKeyStore(keys_file)
    raise ValueError("a key store needs a file or a Redis URL")

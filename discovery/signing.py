"""Signed DHT entries: who may write an entry, and the checks storage and readers run on every one.

Every entry (`discovery.entries`) carries ``public_key``, ``signed_at`` (unix time) and ``sig``, an
Ed25519 signature by that key over `signed_bytes`: a domain tag, the entry id and the entry without
``sig``, as compact sorted ASCII JSON (the same bytes whoever re-encodes the entry, since JSON
floats round-trip exactly in Python). The entry id binds the signature to its slot, so a record
cannot be moved under another id.

Who may sign what:
* under ``model:<id>``, the entry id is a peer id and must be `common.identity.peer_id_of` the
  signing key: only the owner of a peer id can announce it, change its address or tombstone it;
* under ``models``, any key may sign (any peer may announce that a model exists; the entry only
  names it and its block count, and routes are built from the signed per-peer records alone).

An entry is dropped, and counted by reason, when it is unsigned, its signature or signer is wrong,
it is over `MAX_ENTRY_BYTES`, it was signed more than `MAX_CLOCK_SKEW_S` in the future, or it
claims to live longer than `MAX_LIFETIME_S` after signing (a captured record can be replayed only
within its own short life). Storage also drops an entry signed earlier than the one it holds for
that id (a replay; `MergingStorage`), and merges prefer the later ``signed_at``, so a tombstone
beats every record its peer signed before it, and a peer that restarts with the same key replaces
its own tombstone at once.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from typing import Any

from common.identity import Identity, peer_id_of, verify_signature
from discovery.records import is_finite_number

DOMAIN = b"swarm-dht-entry-v1\n"
MAX_CLOCK_SKEW_S = 30.0  # clocks of the swarm's machines must agree to within this (NTP does)
MAX_LIFETIME_S = 3600.0  # expires_at - signed_at; peers use a few heartbeats (15 s by default)
MAX_ENTRY_BYTES = 2048  # one record is ~600 bytes signed; string fields are capped (`records`)
SIGNATURE_FIELDS = ("public_key", "signed_at", "sig")


def signed_bytes(entry_id: str, entry: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers; ValueError / TypeError for entries JSON cannot encode."""
    body = {key: value for key, value in entry.items() if key != "sig"}
    text = json.dumps([entry_id, body], separators=(",", ":"), sort_keys=True, allow_nan=False)
    return DOMAIN + text.encode("ascii")


def sign_entry(identity: Identity, entry_id: str, entry: Mapping[str, Any], now: float) -> dict[str, Any]:
    """`entry` with this identity's public key, `now` as ``signed_at``, and the signature."""
    signed = {key: value for key, value in entry.items() if key not in SIGNATURE_FIELDS}
    signed["public_key"] = identity.public_key
    signed["signed_at"] = float(now)
    signed["sig"] = identity.sign(signed_bytes(entry_id, signed))
    return signed


def entry_problem(
    entry_id: str, entry: Mapping[str, Any], now: float, *, any_signer: bool = False
) -> str | None:
    """Why this entry must be dropped (a metric label), or None when it is acceptable.

    Cheap checks first: a flood of junk costs no signature verification (~50 µs each).
    """
    public_key, signature, signed_at = entry.get("public_key"), entry.get("sig"), entry.get("signed_at")
    if not isinstance(public_key, str) or not isinstance(signature, str) or not is_finite_number(signed_at):
        return "unsigned"
    try:
        payload = signed_bytes(entry_id, entry)
    except (ValueError, TypeError, RecursionError):
        return "malformed"
    if len(payload) > MAX_ENTRY_BYTES:
        return "oversize"
    if signed_at > now + MAX_CLOCK_SKEW_S:
        return "future_timestamp"
    if entry["expires_at"] > signed_at + MAX_LIFETIME_S:
        return "lifetime"
    if not any_signer:
        try:
            if peer_id_of(public_key) != entry_id:
                return "wrong_signer"
        except ValueError:
            return "bad_signature"
    if not verify_signature(public_key, signature, payload):
        return "bad_signature"
    return None


def accepted_entries(
    entries: Mapping[str, dict[str, Any]], now: float, rejected: Counter, *, any_signer: bool = False
) -> dict[str, dict[str, Any]]:
    """The entries that pass `entry_problem`; each dropped one is counted in `rejected[reason]`."""
    kept = {}
    for entry_id, entry in entries.items():
        problem = entry_problem(entry_id, entry, now, any_signer=any_signer)
        if problem is None:
            kept[entry_id] = entry
        else:
            rejected[problem] += 1
    return kept


def signed_at(entry: Mapping[str, Any]) -> float:
    value = entry.get("signed_at")
    return float(value) if is_finite_number(value) else float("-inf")

"""The peer's batching configuration, chosen by the peer itself unless a flag says otherwise.

Two settings make many streams fast on a CPU peer (docs/benchmarks-batching.md); a user of
`swarm up` should not have to know them:

* **prepack** (`peer.gemm`): a packed second copy of the fp32 Linear weights, for the kernels that
  make a pass of 8 rows cost 1.3x one row (oneDNN's) or less (the project's few-rows kernel,
  `peer.skinny_gemm`; each layer keeps the one its measured plan uses, and `copies` names them once
  the span is calibrated). It doubles the weight memory, so the peer
  takes it only when the copy fits its memory budget: at most `PREPACK_SHARE` of the memory that is
  available once the weights are loaded, less the KV budget when one was given (`--cache-tokens` /
  `--cache-bytes`; the default KV budget is half of what is free *after* packing, so it adapts).
  Only plain fp32 weights on the CPU have a packed kernel; others never pack.
* **pipeline groups** (`peer.scheduler.BatchScheduler._gather`): the first span of a multi-hop
  route keeps its sessions in two groups that take turns, so a later peer computes one group while
  this one computes the other instead of the peers computing one after the other. It pays when a
  pass of half the sessions costs clearly less than a pass of all of them, which is what the packed
  kernels give, and only with enough sessions: below `PIPELINE_MIN_SESSIONS` a pass of 2 costs what
  a pass of 4 does, so halving the batch only adds passes (4 streams: 59.7 tok/s pipelined against
  64.8 not). So `auto` means: a first span that is not also the last, with packed weights, uses two
  groups while at least `PIPELINE_MIN_SESSIONS` sessions are live and one group otherwise
  (`groups_for`), decided again before each pass. A lone stream is never affected.

`--prepack` / `--no-prepack` and `--pipeline-groups N` override the choice; `describe()` is the one
line the peer logs at start and shows in `Info` (and so in the swarm map and `swarm status`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PREPACK_SHARE = 0.25  # the packed copy may take at most this share of the memory left for it
PIPELINE_GROUPS = 2  # groups of a pipelined first span (a route of two peers overlaps two groups)
PIPELINE_MIN_SESSIONS = 6  # live sessions from which a pipelined first span splits them
PIPELINE_MAX_GROUPS = 8
COPY_NAMES = {"packed": "oneDNN's kernel", "skinny": "the few-rows kernel"}


@dataclass(frozen=True)
class BatchingConfig:
    """What the peer runs with, and why (`prepack_reason`, `groups_reason`)."""

    prepack: bool
    prepack_reason: str
    # groups the first span keeps: a fixed number (>= 1), or 0 for `auto` (see `groups_for`)
    pipeline_groups: int
    groups_reason: str
    copies: tuple[str, ...] = ()  # the packed copies the calibrated plans use (`peer.gemm.COPY_WAYS`)

    def groups_for(self, live_sessions: int) -> int:
        """The groups to use for the next pass with `live_sessions` sessions open."""
        if self.pipeline_groups:
            return self.pipeline_groups
        return PIPELINE_GROUPS if live_sessions >= PIPELINE_MIN_SESSIONS else 1

    def describe(self) -> str:
        packed = f"prepack ({self.prepack_reason})" if self.prepack else f"no prepack ({self.prepack_reason})"
        if self.prepack and self.copies:
            packed += " using " + " and ".join(COPY_NAMES.get(copy, copy) for copy in self.copies)
        if self.pipeline_groups == 0:
            groups = f"pipeline groups auto ({PIPELINE_GROUPS} from {PIPELINE_MIN_SESSIONS} sessions)"
        else:
            groups = f"pipeline groups {self.pipeline_groups}"
        return f"{packed}; {groups} ({self.groups_reason})"


def choose_prepack(
    requested: bool | None,
    *,
    packable: bool,
    packed_bytes: int,
    available_bytes: int,
    kv_budget_bytes: int = 0,
) -> tuple[bool, str]:
    """Whether to keep the packed copy, and why.

    `requested`: the flag (True/False) or None for the peer's own choice. `packable`: the weights
    are plain fp32 CPU Linear layers and torch has the packed kernel. `packed_bytes`: the copy's
    size. `available_bytes`: memory available now, weights loaded. `kv_budget_bytes`: the KV
    budget when it was given explicitly (0 when it is derived from what is free after packing).
    """
    if not packable:
        return (
            False,
            "no packed kernel for these weights"
            if requested is None
            else "asked, but no packed kernel for these weights",
        )
    if requested is not None:
        return requested, "--prepack" if requested else "--no-prepack"
    room = available_bytes - kv_budget_bytes
    need = f"{packed_bytes / 2**20:.0f} MiB of {max(0, room) / 2**20:.0f} MiB available"
    if packed_bytes <= PREPACK_SHARE * room:
        return True, f"auto: {need}"
    return False, f"auto: memory budget too small, {need}"


def choose_pipeline_groups(
    requested: int | None, *, is_first: bool, is_last: bool, prepack: bool
) -> tuple[int, str]:
    """Groups for the first span (0: `auto`, see `BatchingConfig.groups_for`), and why.

    `requested`: `--pipeline-groups N`, or None for `auto`. Only the first span of a route that
    goes on to other peers keeps groups; later spans follow its grouping (`Step.pass_id`)."""
    if requested is not None:
        if not 1 <= requested <= PIPELINE_MAX_GROUPS:
            raise ValueError(
                f"--pipeline-groups must be in [1, {PIPELINE_MAX_GROUPS}] or auto, got {requested}"
            )
        if requested > 1 and not is_first:
            return 1, f"--pipeline-groups {requested}, but only a first span keeps groups"
        return requested, f"--pipeline-groups {requested}"
    if not is_first:
        return 1, "auto: later spans follow the first span's groups"
    if is_last:
        return 1, "auto: this peer serves the whole model, no later peer to overlap with"
    if not prepack:
        return 1, "auto: without packed weights half a batch costs about as much as a whole one"
    return 0, "auto: first span of multi-hop routes"


def parse_groups(value: str) -> int | None:
    """`--pipeline-groups`: 'auto' -> None, else the number (ValueError if not in range)."""
    if value.strip().lower() == "auto":
        return None
    try:
        groups = int(value)
    except ValueError:
        raise ValueError(f"--pipeline-groups must be a number or auto, got {value!r}") from None
    if not 1 <= groups <= PIPELINE_MAX_GROUPS:
        raise ValueError(f"--pipeline-groups must be in [1, {PIPELINE_MAX_GROUPS}] or auto, got {groups}")
    return groups


def available_memory_bytes() -> int:
    """Memory available to this process now (MemAvailable: free plus reclaimable page cache)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0

"""Per-session key/value cache for the layers of one span.

Layout: ONE tensor per cache, shaped ``[2, num_layers, num_kv_heads, capacity, head_dim]``
(index 0 = keys, 1 = values). Why this layout:

* Heads before tokens: every decode step READS the whole cache of every layer but WRITES only
  the new tokens. With ``[heads, tokens, head_dim]`` each head's keys are one contiguous block,
  which is what the attention matmul streams through; the few rows written per step are strided,
  and that is cheap. ``layer_kv(i)[:, :, :length]`` is already the ``[1, heads, length, dim]``
  view SDPA takes, with no copy.
* One allocation per session: ``nbytes`` is exact (the memory budget of the peer counts these),
  growth is one copy, and freeing a session frees one block.
* Growth doubles the capacity (amortised O(1) per token) instead of a ``torch.cat`` of the whole
  cache every step, which would be O(length) per step and O(length^2) per generation.

Concurrency contract: a cache belongs to one session and is used by one forward at a time; it has
no lock. ``append`` writes the new tokens of one layer at ``[length, length + n)`` but does not
move ``length``; ``commit(n)`` does, once every layer has appended. So a forward that fails half
way leaves ``length`` where it was, and the next step simply overwrites the partial rows.

Sliding-window layers (Mistral, Phi-3, Gemma 2/3 local layers, Qwen2 with windows): a query at
position ``p`` of a layer with window ``W`` sees keys ``p - W + 1 .. p`` only, so the layers of one
window size share a *trimmed* store, a tensor like the one above whose slot 0 holds position
``base``. Before a step, ``prepare(n)`` drops the positions no future query can see, keeping
``W - 1`` plus ``REWIND_SLACK`` (so a small rewind, or a resumed turn whose template re-renders
the last reply, still finds its keys), by moving the kept rows to the front of the same tensor.
The tensor stops doubling at what it keeps plus a quarter of that, at least ``REWIND_SLACK``
more (``_Store.bound``), so a window layer holds about ``1.25 * (W + REWIND_SLACK)`` tokens (plus
one prefill chunk while it runs) however long the session is, and each move of the kept rows is
amortised over that quarter (~4 rows copied per token). Trimmed rather than a ring: keys stay in position order, so a prefill chunk longer than the window attends in the same
SDPA call with a band mask and nothing wraps around. A rewind below what a window layer still
holds is impossible (``can_truncate``); the caller replays the session from its start instead,
which is exact, only slower.

Latent caches (DeepSeek-V3's multi-head latent attention, ``peer.mla``): ``parts=1`` keeps one
tensor per token instead of keys and values, ``[1, num_layers, 1, capacity, kv_lora_rank +
qk_rope_head_dim]``, the compressed latent MLA attends from. Everything above (growth, commit,
rewind, the budget's ``bytes_per_token``) is the same code with the leading dimension 1, so the
memory budget counts the latent size, not expanded heads.
"""

from __future__ import annotations

import torch

REWIND_SLACK = 128  # positions a window layer keeps beyond its window, for rewinds


class CacheFullError(ValueError):
    """Raised when a cache would grow past its ``max_capacity`` (the session's token limit)."""


class CacheRewindError(ValueError):
    """Raised when a rewind needs keys a sliding-window layer has already dropped."""


class _Store:
    """The layers of one window size (0 = full attention): ``[2, layers, heads, slots, dim]``,
    slot ``i`` holding position ``base + i``."""

    def __init__(self, layers: list[int], window: int, shape: tuple[int, int], capacity: int,
                 dtype: torch.dtype, device: torch.device, parts: int = 2) -> None:  # fmt: skip
        self.layers, self.window, self.base = layers, window, 0
        self.kv = _allocate((parts, len(layers), shape[0], capacity, shape[1]), dtype, device)

    @property
    def keep(self) -> int:
        """Positions kept behind the next query: the window, plus room for a rewind."""
        return self.window - 1 + REWIND_SLACK

    @property
    def bound(self) -> int:
        """Slots a window store stops doubling at: what it keeps, plus room for a quarter of that
        (at least ``REWIND_SLACK``) before the next move, so moves cost ~4 rows per token."""
        return self.keep + 1 + max(REWIND_SLACK, self.keep // 4)

    @property
    def capacity(self) -> int:
        return self.kv.shape[3]

    def reserve(self, length: int, needed: int, max_capacity: int | None) -> None:
        """Room for positions ``[.., needed)``; a window store first drops what nobody will see."""
        if needed - self.base <= self.capacity:
            return
        if self.window:
            drop = max(0, length - self.keep - self.base)
            if drop:
                with torch.inference_mode(False):
                    moved = self.kv[:, :, :, drop:].clone()
                    self.kv[:, :, :, : moved.shape[3]] = moved
                self.base += drop
            if needed - self.base <= self.capacity:
                return
            target = max(needed - self.base, min(2 * self.capacity, self.bound))
            if max_capacity is not None:  # a short session never needs the whole bound
                target = min(target, max(max_capacity, needed - self.base))
        else:
            if max_capacity is not None and needed > max_capacity:
                raise CacheFullError(f"session needs {needed} cached tokens, its limit is {max_capacity}")
            target = max(needed, 2 * self.capacity)
            if max_capacity is not None:
                target = min(target, max_capacity)
        grown = _allocate((*self.kv.shape[:3], target, self.kv.shape[4]), self.kv.dtype, self.kv.device)
        # Copy every old slot, not only up to length: layers that already appended in the current
        # (uncommitted) step must keep their rows.
        with torch.inference_mode(False):
            grown[:, :, :, : self.capacity] = self.kv
        self.kv = grown

    def can_truncate(self, n: int) -> bool:
        return n == 0 or not self.window or self.base <= max(0, n - self.window + 1)


class KVCache:
    """Keys and values of one session for ``num_layers`` consecutive layers.

    ``windows[i]`` is layer ``i``'s sliding window (0 or absent: full attention). ``parts`` is 2
    (keys and values) or 1 (one latent per token, ``peer.mla``; ``append`` then takes no values).
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        capacity: int = 16,
        max_capacity: int | None = None,
        windows: tuple[int, ...] | None = None,
        parts: int = 2,
        unit_layers: int | None = None,
    ) -> None:
        """`unit_layers`: the layers one budget unit (`bytes_per_token`) counts, by default this
        cache's. A peer passes its whole span's, so a session that runs a sub-span of it (fewer
        layers) is charged that fraction of a token's cost (`peer.servicer`, docs/self-organizing.md)."""
        if parts not in (1, 2):
            raise ValueError(f"parts must be 1 (latent) or 2 (keys and values), got {parts}")
        sizes = {"num_layers": num_layers, "num_kv_heads": num_kv_heads, "head_dim": head_dim}
        for name, value in sizes.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if max_capacity is not None and max_capacity < 1:
            raise ValueError(f"max_capacity must be >= 1, got {max_capacity}")
        windows = tuple(int(w or 0) for w in (windows or (0,) * num_layers))
        if len(windows) != num_layers or any(w < 0 for w in windows):
            raise ValueError(f"need one window >= 0 per layer, got {windows}")
        if max_capacity is not None:
            capacity = min(capacity, max_capacity)
        if unit_layers is not None and unit_layers < num_layers:
            raise ValueError(f"unit_layers must be >= num_layers ({num_layers}), got {unit_layers}")
        self.num_layers = num_layers
        self.unit_layers = unit_layers or num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.parts = parts
        self.windows = windows
        self.max_capacity = max_capacity
        self.length = 0
        # A window no shorter than the session is full attention: no store of its own.
        if max_capacity is not None:
            windows = tuple(0 if w >= max_capacity else w for w in windows)
        self._stores = [
            _Store(
                [i for i, w in enumerate(windows) if w == window],
                window,
                (num_kv_heads, head_dim),
                capacity,
                dtype,
                torch.device(device),
                parts,
            )  # fmt: skip
            for window in sorted(set(windows))
        ]
        self._where = {layer: (store, j) for store in self._stores for j, layer in enumerate(store.layers)}

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def _kv(self) -> torch.Tensor:
        return self._stores[0].kv

    @property
    def capacity(self) -> int:
        """Tokens the cache can hold before it must grow (or trim a window layer)."""
        return min(store.base + store.capacity for store in self._stores)

    @property
    def dtype(self) -> torch.dtype:
        return self._kv.dtype

    @property
    def device(self) -> torch.device:
        return self._kv.device

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token costs across all layers, keys and values: the unit of the memory budget
        (`peer.memory`), which counts a window layer's trimmed store by `budget_tokens`."""
        return self.parts * self.unit_layers * self.num_kv_heads * self.head_dim * self._kv.element_size()

    def budget_tokens(self, length: int, step: int) -> int:
        """The most this session ever allocates, in budget units (`bytes_per_token`), when it grows
        to `length` tokens in steps of at most `step` (the scheduler's pass size bounds a prefill
        chunk). A full-attention layer holds up to `length` slots; a window layer's store stops at
        its bound, or at what it keeps plus one step when a step is longer (``_Store.reserve``
        trims before it grows, so it never holds more)."""
        slots = 0
        for store in self._stores:
            most = min(length, max(store.bound, store.keep + step)) if store.window else length
            slots += len(store.layers) * most
        return -(-slots // self.unit_layers)

    @property
    def held_tokens(self) -> int:
        """What the cache allocates now, in budget units (what an idle session holds)."""
        return -(-self.nbytes // self.bytes_per_token)

    @property
    def nbytes(self) -> int:
        """Bytes allocated now (capacity, not length: that is what the process really holds)."""
        return sum(store.kv.numel() for store in self._stores) * self._kv.element_size()

    def store_of(self, layer_idx: int) -> tuple[int, int]:
        """``(window, base)`` of a layer: which positions its keys start at (for masks)."""
        store = self._where[layer_idx][0]
        return store.window, store.base

    # ---- writes ------------------------------------------------------------------------------
    def reserve(self, needed: int) -> None:
        """Make room for ``needed`` tokens in total, doubling capacity so growth stays amortised."""
        if needed > self.length and self.max_capacity is not None and needed > self.max_capacity:
            raise CacheFullError(f"session needs {needed} cached tokens, its limit is {self.max_capacity}")
        for store in self._stores:
            store.reserve(self.length, needed, self.max_capacity)

    def prepare(self, n: int) -> None:
        """Before a step of ``n`` tokens: grow, and trim window layers, so no layer moves mid-step."""
        self.reserve(self.length + n)

    def append(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Store the new ``k``/``v`` of one layer and return all keys/values of that layer.

        A latent cache (``parts=1``) takes ``k`` alone and returns ``(latents, None)``.
        ``k`` and ``v`` are ``[num_kv_heads, n, head_dim]`` (or with a leading batch dim of 1);
        they land at positions ``[length, length + n)``. Returns views ``[1, heads, kept + n,
        head_dim]`` ready for SDPA, starting at position ``store_of(layer_idx)[1]`` (0 but on
        window layers). ``length`` itself only moves in ``commit``.
        """
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer_idx {layer_idx} out of range for a cache of {self.num_layers} layers")
        if (v is None) != (self.parts == 1):
            raise ValueError("a latent cache takes no values; a key/value cache needs them")
        if k.dim() == 4:
            k = k.squeeze(0)
            v = v.squeeze(0) if v is not None else None
        expected = (self.num_kv_heads, k.shape[1], self.head_dim)
        if tuple(k.shape) != expected or (v is not None and tuple(v.shape) != expected):
            got = tuple(k.shape) if v is None else (tuple(k.shape), tuple(v.shape))
            raise ValueError(f"k/v must be {expected}, got {got}")
        end = self.length + k.shape[1]
        self.reserve(end)
        store, j = self._where[layer_idx]
        start, stop = self.length - store.base, end - store.base
        store.kv[0, j, :, start:stop] = k
        if v is not None:
            store.kv[1, j, :, start:stop] = v
        return self._views(store, j, stop)

    def commit(self, n: int) -> None:
        """Advance ``length`` by ``n`` once every layer has appended its ``n`` new tokens."""
        if n < 0 or self.length + n > self.capacity:
            raise ValueError(f"cannot commit {n} tokens: length {self.length}, capacity {self.capacity}")
        self.length += n

    def can_truncate(self, n: int) -> bool:
        """Whether ``truncate(n)`` keeps every key a later query at ``n`` may see."""
        return 0 <= n <= self.length and all(store.can_truncate(n) for store in self._stores)

    def truncate(self, n: int) -> None:
        """Forget everything from position ``n`` on (rewind a session; memory is kept for reuse)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {n}")
        if not self.can_truncate(n):
            raise CacheRewindError(
                f"cannot rewind to {n}: sliding-window layers keep positions from "
                f"{max(s.base for s in self._stores)} on; replay the session instead"
            )
        self.length = n
        if n == 0:
            for store in self._stores:
                store.base = 0

    def layer_kv(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The committed keys and values of one layer, ``[1, heads, kept, head_dim]`` views."""
        store, j = self._where[layer_idx]
        return self._views(store, j, self.length - store.base)

    def _views(self, store: _Store, j: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        values = store.kv[1, j, :, :stop].unsqueeze(0) if self.parts == 2 else None
        return store.kv[0, j, :, :stop].unsqueeze(0), values

    def __repr__(self) -> str:
        return (
            f"KVCache(layers={self.num_layers}, parts={self.parts}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"length={self.length}, capacity={self.capacity}, dtype={self.dtype})"
        )


def _allocate(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Storage that is never an "inference tensor", even when allocated under ``inference_mode``.

    Otherwise a cache created (or grown) inside ``torch.inference_mode()`` could not be written by
    a later step that runs outside it (RuntimeError "Inplace update to inference tensor").
    """
    with torch.inference_mode(False):
        return torch.empty(shape, dtype=dtype, device=device)

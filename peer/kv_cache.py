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
"""

from __future__ import annotations

import torch


class CacheFullError(ValueError):
    """Raised when a cache would grow past its ``max_capacity`` (the session's token limit)."""


class KVCache:
    """Keys and values of one session for ``num_layers`` consecutive layers."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        capacity: int = 16,
        max_capacity: int | None = None,
    ) -> None:
        sizes = {"num_layers": num_layers, "num_kv_heads": num_kv_heads, "head_dim": head_dim}
        for name, value in sizes.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if max_capacity is not None and max_capacity < 1:
            raise ValueError(f"max_capacity must be >= 1, got {max_capacity}")
        if max_capacity is not None:
            capacity = min(capacity, max_capacity)
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.max_capacity = max_capacity
        self.length = 0
        self._kv = _allocate((2, num_layers, num_kv_heads, capacity, head_dim), dtype, torch.device(device))

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self._kv.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self._kv.dtype

    @property
    def device(self) -> torch.device:
        return self._kv.device

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token costs across all layers, keys and values (for a memory budget)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self._kv.element_size()

    @property
    def nbytes(self) -> int:
        """Bytes allocated now (capacity, not length: that is what the process really holds)."""
        return self._kv.numel() * self._kv.element_size()

    # ---- writes ------------------------------------------------------------------------------
    def reserve(self, needed: int) -> None:
        """Make room for ``needed`` tokens in total, doubling capacity so growth stays amortised."""
        if needed <= self.capacity:
            return
        if self.max_capacity is not None and needed > self.max_capacity:
            raise CacheFullError(f"session needs {needed} cached tokens, its limit is {self.max_capacity}")
        new_capacity = max(needed, 2 * self.capacity)
        if self.max_capacity is not None:
            new_capacity = min(new_capacity, self.max_capacity)
        grown = _allocate((*self._kv.shape[:3], new_capacity, self.head_dim), self.dtype, self.device)
        # Copy every old slot, not only [:length]: layers that already appended in the current
        # (uncommitted) step must keep their rows.
        with torch.inference_mode(False):
            grown[:, :, :, : self.capacity] = self._kv
        self._kv = grown

    def append(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new ``k``/``v`` of one layer and return all keys/values of that layer.

        ``k`` and ``v`` are ``[num_kv_heads, n, head_dim]`` (or with a leading batch dim of 1);
        they land at positions ``[length, length + n)``. Returns views ``[1, heads, length + n,
        head_dim]`` ready for SDPA. ``length`` itself only moves in ``commit``.
        """
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer_idx {layer_idx} out of range for a cache of {self.num_layers} layers")
        if k.dim() == 4:
            k, v = k.squeeze(0), v.squeeze(0)
        expected = (self.num_kv_heads, k.shape[1], self.head_dim)
        if tuple(k.shape) != expected or tuple(v.shape) != expected:
            raise ValueError(f"k/v must be {expected}, got {tuple(k.shape)} and {tuple(v.shape)}")
        end = self.length + k.shape[1]
        self.reserve(end)
        self._kv[0, layer_idx, :, self.length : end] = k
        self._kv[1, layer_idx, :, self.length : end] = v
        return self._kv[0, layer_idx, :, :end].unsqueeze(0), self._kv[1, layer_idx, :, :end].unsqueeze(0)

    def commit(self, n: int) -> None:
        """Advance ``length`` by ``n`` once every layer has appended its ``n`` new tokens."""
        if n < 0 or self.length + n > self.capacity:
            raise ValueError(f"cannot commit {n} tokens: length {self.length}, capacity {self.capacity}")
        self.length += n

    def truncate(self, n: int) -> None:
        """Forget everything from position ``n`` on (rewind a session; memory is kept for reuse)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {n}")
        self.length = n

    def layer_kv(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The committed keys and values of one layer, ``[1, heads, length, head_dim]`` views."""
        return (
            self._kv[0, layer_idx, :, : self.length].unsqueeze(0),
            self._kv[1, layer_idx, :, : self.length].unsqueeze(0),
        )

    def __repr__(self) -> str:
        return (
            f"KVCache(layers={self.num_layers}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"length={self.length}, capacity={self.capacity}, dtype={self.dtype})"
        )


def _allocate(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Storage that is never an "inference tensor", even when allocated under ``inference_mode``.

    Otherwise a cache created (or grown) inside ``torch.inference_mode()`` could not be written by
    a later step that runs outside it (RuntimeError "Inplace update to inference tensor").
    """
    with torch.inference_mode(False):
        return torch.empty(shape, dtype=dtype, device=device)

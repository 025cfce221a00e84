"""KVCache: growth by doubling, commit / truncate, sizes."""

from __future__ import annotations

import pytest
import torch

from peer.kv_cache import CacheFullError, KVCache

LAYERS, HEADS, DIM = 3, 2, 4


def kv(n: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys whose values encode their position, so misplaced rows are visible."""
    k = torch.arange(start, start + n, dtype=torch.float32).view(1, n, 1).expand(HEADS, n, DIM).clone()
    return k, -k


def append_all(cache: KVCache, n: int) -> None:
    for layer in range(LAYERS):
        cache.append(layer, *kv(n, cache.length))
    cache.commit(n)


def test_append_returns_everything_so_far_and_length_moves_on_commit():
    cache = KVCache(LAYERS, HEADS, DIM, capacity=4)
    k_all, v_all = cache.append(0, *kv(3))
    assert k_all.shape == (1, HEADS, 3, DIM) and cache.length == 0
    cache.append(1, *kv(3))
    cache.append(2, *kv(3))
    cache.commit(3)
    k_all, v_all = cache.append(0, *kv(2, 3))
    assert k_all[0, 0, :, 0].tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(v_all, -k_all)


def test_growth_doubles_and_keeps_contents():
    cache = KVCache(LAYERS, HEADS, DIM, capacity=2)
    capacities = []
    for _ in range(9):
        append_all(cache, 1)
        capacities.append(cache.capacity)
    assert capacities == [2, 2, 4, 4, 8, 8, 8, 8, 16]
    append_all(cache, 40)  # a big chunk grows straight to what it needs
    assert cache.capacity == 49 and cache.length == 49
    for layer in range(LAYERS):
        keys, values = cache.layer_kv(layer)
        assert keys[0, 1, :, 2].tolist() == list(range(49))
        assert torch.equal(values, -keys)


def test_growth_in_the_middle_of_a_step_keeps_earlier_layers_rows():
    cache = KVCache(LAYERS, HEADS, DIM, capacity=4)
    append_all(cache, 3)
    cache.append(0, *kv(1, 3))  # fits
    cache.append(1, *kv(1, 3))
    cache.reserve(10)  # something grows the cache before layer 2 appends
    cache.append(2, *kv(1, 3))
    cache.commit(1)
    for layer in range(LAYERS):
        assert cache.layer_kv(layer)[0][0, 0, :, 0].tolist() == [0, 1, 2, 3]


def test_truncate_then_overwrite():
    cache = KVCache(LAYERS, HEADS, DIM)
    append_all(cache, 6)
    cache.truncate(2)
    assert cache.length == 2 and cache.layer_kv(0)[0].shape[2] == 2
    append_all(cache, 3)
    assert cache.layer_kv(1)[0][0, 0, :, 0].tolist() == [0, 1, 2, 3, 4]
    cache.truncate(0)
    assert cache.length == 0
    with pytest.raises(ValueError):
        cache.truncate(1)
    with pytest.raises(ValueError):
        cache.truncate(-1)


def test_sizes():
    cache = KVCache(LAYERS, HEADS, DIM, dtype=torch.bfloat16, capacity=8)
    assert cache.bytes_per_token == 2 * LAYERS * HEADS * DIM * 2
    assert cache.nbytes == 8 * cache.bytes_per_token
    append_all(cache, 9)
    assert cache.nbytes == 16 * cache.bytes_per_token


def test_max_capacity_caps_growth_and_raises_past_it():
    cache = KVCache(LAYERS, HEADS, DIM, capacity=4, max_capacity=6)
    append_all(cache, 5)
    assert cache.capacity == 6
    with pytest.raises(CacheFullError):
        append_all(cache, 2)
    assert cache.length == 5
    assert isinstance(CacheFullError("x"), ValueError)


def test_rejects_bad_shapes_and_layers():
    cache = KVCache(LAYERS, HEADS, DIM)
    with pytest.raises(ValueError, match="layer_idx"):
        cache.append(LAYERS, *kv(1))
    with pytest.raises(ValueError, match="k/v"):
        cache.append(0, torch.zeros(HEADS + 1, 1, DIM), torch.zeros(HEADS + 1, 1, DIM))
    with pytest.raises(ValueError):
        KVCache(0, HEADS, DIM)
    with pytest.raises(ValueError):
        cache.commit(cache.capacity + 1)


def test_usable_inside_and_outside_inference_mode():
    """The server steps under inference_mode; other callers may not. Either order must work."""
    with torch.inference_mode():
        cache = KVCache(LAYERS, HEADS, DIM, capacity=2)
        append_all(cache, 1)
    append_all(cache, 1)
    with torch.inference_mode():
        append_all(cache, 3)  # grows inside inference mode
    append_all(cache, 1)
    assert cache.layer_kv(2)[0][0, 0, :, 0].tolist() == [0, 1, 2, 3, 4, 5]


def test_latent_cache_keeps_one_part_per_token():
    """MLA's cache (``parts=1``): one tensor per token, no values; the budget unit and the
    allocation are half of a key/value cache of the same width; rewinds work as for any cache."""
    latent = KVCache(num_layers=2, num_kv_heads=1, head_dim=6, capacity=4, parts=1)
    pair = KVCache(num_layers=2, num_kv_heads=1, head_dim=6, capacity=4)
    assert latent.bytes_per_token * 2 == pair.bytes_per_token
    assert latent.nbytes * 2 == pair.nbytes
    rows = torch.arange(30, dtype=torch.float32).view(1, 5, 6)
    for layer in range(2):
        got, values = latent.append(layer, rows)
        assert values is None and torch.equal(got[0], rows)
    latent.commit(5)
    latent.truncate(3)
    assert torch.equal(latent.layer_kv(1)[0][0], rows[:, :3]) and latent.layer_kv(1)[1] is None
    with pytest.raises(ValueError, match="latent cache takes no values"):
        latent.append(0, rows, rows)
    with pytest.raises(ValueError, match="needs them"):
        pair.append(0, rows)
    with pytest.raises(ValueError, match="parts"):
        KVCache(num_layers=1, num_kv_heads=1, head_dim=6, parts=3)

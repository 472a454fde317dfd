"""The NumPy backend's cache of large output buffers and its page placement.

A buffer may be handed out again only when nothing outside the cache refers
to it: these tests hold outputs and views of them across later calls and
check that their values survive, and check that dropped ones are reused.
"""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

import gpubn
from gpubn.backends import host_cache
from gpubn.backends.host_cache import MIN_BYTES, PAGE, HostCache, empty_at

BIG = (MIN_BYTES // 4 + 1000,)    # float32 elements: large enough to be cached


def _addr(a):
    return a.__array_interface__["data"][0]


@pytest.mark.parametrize("offset", [0, 2, 4, 16, 40, 2048, 4094])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_empty_at_places_data_at_the_page_offset(offset, dtype):
    a = empty_at((3, 5, 7), dtype, offset)
    assert a.shape == (3, 5, 7) and a.dtype == dtype and a.flags.c_contiguous
    assert a.flags.writeable and a.flags.aligned     # float32 at offset 2 goes to 0
    assert _addr(a) % PAGE == offset - offset % np.dtype(dtype).itemsize
    a[...] = 1
    assert a.sum() == 105


def test_cache_reuses_a_buffer_only_after_every_reference_is_gone():
    cache = HostCache(1 << 30)
    a = cache.empty(BIG, np.float32, 16)
    a[...] = 1.0
    first = _addr(a)
    view = a[10:20]
    del a
    b = cache.empty(BIG, np.float32, 16)        # the view still holds the first buffer
    assert _addr(b) != first
    b[...] = 2.0
    assert np.all(view == 1.0)
    del view
    c = cache.empty(BIG, np.float32, 16)
    assert _addr(c) == first                   # now idle: reused
    assert _addr(c) % PAGE == 16
    d = cache.empty(BIG, np.float32, 48)       # another page offset: same memory, shifted
    assert _addr(d) % PAGE == 48 and _addr(d) != _addr(b) and _addr(d) != _addr(c)


def test_cache_skips_small_buffers_and_keeps_at_most_its_limit():
    one = BIG[0] * 4 + PAGE                     # bytes of one kept buffer
    two = BIG[0] * 8 + PAGE                     # and of one twice as large
    cache = HostCache(int(3.5 * one))
    small = cache.empty((10,), np.float32, 0)
    del small
    assert cache.held_bytes() == 0
    bufs = [cache.empty(BIG, np.float32, 0) for _ in range(4)]
    assert cache.held_bytes() == 3 * one        # the fourth did not fit: a plain allocation
    assert cache.idle_bytes() == 0
    del bufs
    assert cache.idle_bytes() == 3 * one        # all that stays held once dropped
    keep = cache.empty(BIG, np.float32, 0)      # reuses one
    double = cache.empty((BIG[0] * 2,), np.float32, 0)   # fits once both idle ones go
    assert cache.held_bytes() == one + two <= cache.limit
    more = cache.empty((BIG[0] * 2,), np.float32, 0)     # no room: kept ones in use
    assert cache.held_bytes() == one + two
    del keep, double, more
    assert cache.idle_bytes() == one + two
    cache.free()
    assert cache.held_bytes() == 0


def test_cache_drops_nothing_for_a_buffer_that_cannot_fit():
    one = BIG[0] * 4 + PAGE
    cache = HostCache(int(2.5 * one))
    held = cache.empty(BIG, np.float32, 0)
    idle = cache.empty(BIG, np.float32, 0)
    del idle
    big = cache.empty((BIG[0] * 2,), np.float32, 0)    # one in use + 2 > 2.5: plain
    assert cache.held_bytes() == 2 * one and cache.idle_bytes() == one
    assert not np.shares_memory(big, held)


def test_cache_is_off_with_a_zero_limit():
    cache = HostCache(0)
    a = cache.empty(BIG, np.float32, 8)
    first = _addr(a)
    assert first % PAGE == 8
    del a
    assert cache.idle_bytes() == 0
    assert HostCache(0)._bufs == {}


def test_threads_never_share_a_buffer():
    cache = HostCache(1 << 30)
    seen, errors = [], []

    def worker(k):
        for i in range(20):
            a = cache.empty(BIG, np.float32, 0)
            a[...] = k
            seen.append(_addr(a))
            if not np.all(a == k):
                errors.append(k)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(seen)) <= 4 + 4   # buffers were reused, at most one per live thread (+ slack)


@pytest.mark.parametrize("shape,axis", [((16, 64, 32, 32), 1), ((16, 32, 32, 64), -1)])
def test_batch_norm_outputs_held_by_the_caller_are_never_overwritten(shape, axis):
    rng = np.random.default_rng(0)
    x1 = rng.standard_normal(shape, dtype=np.float32)
    x2 = rng.standard_normal(shape, dtype=np.float32) * 3 + 1
    y1, s1 = gpubn.batch_norm_forward(x1, training=True, axis=axis, backend="numpy")
    expect = y1.copy()
    part = y1[1:3]
    del y1
    y2, _ = gpubn.batch_norm_forward(x2, training=True, axis=axis, backend="numpy")
    np.testing.assert_array_equal(part, expect[1:3])
    dx, _, _ = gpubn.batch_norm_backward(x2, s1)
    np.testing.assert_array_equal(part, expect[1:3])
    assert not np.shares_memory(dx, part) and not np.shares_memory(y2, part)
    # once dropped, the same memory serves the next call of the same size
    addr = _addr(y2)
    del y2
    y3, _ = gpubn.batch_norm_forward(x2, training=True, axis=axis, backend="numpy")
    if host_cache.CACHE.limit >= y3.nbytes:
        assert _addr(y3) == addr
    assert _addr(y3) % PAGE == _addr(x2) % PAGE


def test_layer_norm_outputs_keep_their_values_across_calls():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((512, 768), dtype=np.float32)
    y1, saved = gpubn.layer_norm_forward(x, (768,), backend="numpy")
    expect = y1.copy()
    for _ in range(3):
        gpubn.layer_norm_forward(x * 2, (768,), backend="numpy")
        gpubn.layer_norm_backward(x, saved)
    np.testing.assert_array_equal(y1, expect)


def test_empty_host_cache_releases_idle_buffers_and_leaves_held_ones(monkeypatch):
    cache = HostCache(1 << 30)
    monkeypatch.setattr(host_cache, "CACHE", cache)
    held = host_cache.empty(BIG, np.float32, 0)
    held[...] = 3.0
    dropped = host_cache.empty(BIG, np.float32, 0)
    del dropped
    assert cache.idle_bytes() > 0
    gpubn.backends.host_cache.empty_host_cache()
    assert cache.idle_bytes() == 0 and not cache._bufs
    again = host_cache.empty(BIG, np.float32, 0)
    again[...] = 4.0
    assert np.all(held == 3.0)


@pytest.mark.parametrize("env,limit", [("64", 64 << 20), ("0", 0), ("0.5", 1 << 19),
                                       ("lots", 256 << 20), (None, 256 << 20)])
def test_cache_limit_comes_from_the_environment(monkeypatch, env, limit):
    if env is None:
        monkeypatch.delenv("GPUBN_HOST_CACHE_MB", raising=False)
    else:
        monkeypatch.setenv("GPUBN_HOST_CACHE_MB", env)
    assert host_cache._default_limit() == limit


@pytest.mark.parametrize("axis,shape", [(1, (8, 16, 9, 9)), (-1, (8, 9, 9, 16))])
def test_float16_input_at_an_odd_offset_gives_the_same_results(axis, shape):
    # float32 scratch placed at the page offset of a float16 input that
    # starts 2 bytes into a 4-byte word is rounded down to stay aligned
    rng = np.random.default_rng(2)
    n = int(np.prod(shape))
    flat = rng.standard_normal(n + 1).astype(np.float16)
    x_odd = flat[1:].reshape(shape)
    assert _addr(x_odd) % 4 == (_addr(flat) + 2) % 4
    x_even = x_odd.copy()
    dy = rng.standard_normal(shape).astype(np.float16)
    y1, s1 = gpubn.batch_norm_forward(x_odd, training=True, axis=axis, backend="numpy")
    y2, s2 = gpubn.batch_norm_forward(x_even, training=True, axis=axis, backend="numpy")
    np.testing.assert_array_equal(y1, y2)
    for a, b in zip(gpubn.batch_norm_backward(dy, s1), gpubn.batch_norm_backward(dy, s2)):
        np.testing.assert_array_equal(a, b)

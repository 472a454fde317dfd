"""Guarded running statistics (``guard_running_stats=True``): a channel whose
batch mean or unbiased variance is not finite keeps its running statistics
for that step, every other channel updates exactly as without the guard, and
the layer counts the skipped channel updates."""

from __future__ import annotations

import numpy as np
import pytest

from gpubn import BatchNorm, batch_norm_forward
from gpubn.backends import get_backend

from conftest import to_backend, to_numpy

LAYOUTS = {"nchw": ((6, 4, 5), 1), "nhwc": ((30, 4), -1), "nc": ((7, 4), 1)}


def _batch(shape, axis, dtype, bad):
    """Standard normal data; channel 1 gets ``bad`` in one element; channel 2
    is finite but so large that its variance overflows the accumulation
    dtype (a finite mean with an infinite variance)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(dtype)
    xm = np.moveaxis(x, axis, -1)
    xm[(0,) * (x.ndim - 1) + (1,)] = bad
    big = np.finfo(np.float64 if dtype == np.float64 else np.float32).max / 4
    if dtype != np.float16:   # float16 cannot hold values whose square overflows float32
        xm[..., 2] = np.where(np.arange(xm[..., 2].size).reshape(xm[..., 2].shape) % 2,
                              big, -big).astype(dtype)
    return x


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_guard_keeps_bad_channels_and_updates_the_rest(backend, layout, dtype, bad):
    shape, axis = LAYOUTS[layout]
    x = _batch(shape, axis, dtype, bad)
    acc = np.float64 if dtype == np.float64 else np.float32
    start_mean = np.array([0.5, -1.0, 2.0, 0.25], acc)
    start_var = np.array([1.5, 3.0, 0.5, 2.0], acc)

    def run(guard):
        rm, rv = to_backend(backend, start_mean.copy()), to_backend(backend, start_var.copy())
        y, saved = batch_norm_forward(to_backend(backend, x), running_mean=rm, running_var=rv,
                                      axis=axis, backend=backend.name,
                                      guard_running_stats=guard)
        return to_numpy(rm), to_numpy(rv), saved

    rm, rv, saved = run(True)
    overflow = dtype != np.float16
    skipped = np.array([0, 1, int(overflow), 0], np.int32)
    np.testing.assert_array_equal(to_numpy(saved.skipped), skipped)
    keep = skipped == 1
    # skipped channels: bit for bit what they were
    np.testing.assert_array_equal(rm[keep], start_mean[keep])
    np.testing.assert_array_equal(rv[keep], start_var[keep])
    # the others: bit for bit the unguarded update (the same finishing step)
    rm0, rv0, saved0 = run(False)
    assert saved0.skipped is None
    np.testing.assert_array_equal(rm[~keep], rm0[~keep])
    np.testing.assert_array_equal(rv[~keep], rv0[~keep])
    # and that update is PyTorch's rule on the float64 statistics
    xm = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, 4)
    with np.errstate(invalid="ignore", over="ignore"):
        want_m = 0.9 * start_mean + 0.1 * xm.mean(axis=0)
        want_v = 0.9 * start_var + 0.1 * xm.var(axis=0, ddof=1)
    tol = 64 * np.finfo(acc).eps
    for c in np.flatnonzero(~keep):
        assert abs(rm[c] - want_m[c]) <= tol * (1 + abs(want_m[c])), (c, rm[c], want_m[c])
        assert abs(rv[c] - want_v[c]) <= tol * (1 + abs(want_v[c])), (c, rv[c], want_v[c])
    # without the guard the bad channel's running statistics are poisoned (PyTorch's behaviour)
    assert not np.isfinite(rv0[1])


def test_guard_without_running_statistics_flags_nothing(backend):
    x = to_backend(backend, _batch((6, 4, 5), 1, np.float32, np.inf))
    _, saved = batch_norm_forward(x, backend=backend.name, guard_running_stats=True)
    assert saved.skipped is None


@pytest.mark.parametrize("read_once,launches", [(False, 2), (True, 1)],
                         ids=["two-pass", "read-once"])
def test_guard_adds_no_pass_and_no_launch(read_once, launches):
    """The guard lives in the statistics' finishing step (bn_stats_*, and the
    read-once kernel's): the same launches and the same bytes of x and y as
    without it, on either training path."""
    import dataclasses

    try:
        get_backend("emu")                 # skips where emu cannot run
    except RuntimeError as exc:
        pytest.skip(str(exc))
    from gpubn.backends.emu import EMU_TUNING, EmuBackend
    from gpubn.emu import recording

    emu = EmuBackend(tuning=dataclasses.replace(EMU_TUNING, read_once=read_once))
    x = _batch((8, 4, 64), 1, np.float32, np.inf)
    logs = []
    for guard in (False, True):
        rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
        with recording() as log:
            _, saved = batch_norm_forward(x, running_mean=rm, running_var=rv, backend=emu,
                                          guard_running_stats=guard)
        if guard:   # channel 1 holds the inf, channel 2's variance overflows: both kept
            np.testing.assert_array_equal(to_numpy(saved.skipped), [0, 1, 1, 0])
            np.testing.assert_array_equal(rm[1:3], [0, 0])
            np.testing.assert_array_equal(rv[1:3], [1, 1])
        logs.append([(r.kernel, r.grid, {i: (t.loaded, t.stored) for i, t in r.buffers.items()
                                          if max(t.loaded, t.stored) >= x.nbytes})
                     for r in log])
    assert logs[0] == logs[1]
    assert len(logs[1]) == launches


def test_layer_counts_skipped_updates(backend):
    bn = BatchNorm(4, backend=backend.name, guard_running_stats=True)
    assert bn.skipped_updates == 0
    bad = to_backend(backend, _batch((6, 4, 5), 1, np.float32, np.nan))
    good = to_backend(backend, np.random.default_rng(2).standard_normal((6, 4, 5))
                      .astype(np.float32))
    bn(bad)
    mean_after_bad = to_numpy(bn.running_mean).copy()
    assert bn.skipped_updates == 2 and bn.num_batches_tracked == 1
    bn(good)
    assert bn.skipped_updates == 2 and bn.num_batches_tracked == 2
    assert np.all(np.isfinite(to_numpy(bn.running_mean)))
    assert not np.array_equal(to_numpy(bn.running_mean), mean_after_bad)
    bn(bad)
    assert bn.skipped_updates == 4
    state = bn.state_dict()
    assert int(to_numpy(state["skipped_updates"])) == 4
    assert to_numpy(state["skipped_updates"]).dtype == np.int64
    fresh = BatchNorm(4, backend=backend.name, guard_running_stats=True)
    fresh.load_state_dict(state)
    assert fresh.skipped_updates == 4
    np.testing.assert_array_equal(to_numpy(fresh.running_var), to_numpy(bn.running_var))
    bn.reset_running_stats()
    assert bn.skipped_updates == 0
    # eval mode updates nothing and counts nothing
    bn.eval()
    bn(bad)
    assert bn.skipped_updates == 0


def test_state_dict_has_the_counter_only_with_the_guard():
    plain = BatchNorm(3)
    assert "skipped_updates" not in plain.state_dict()
    assert plain.skipped_updates is None
    guarded = BatchNorm(3, guard_running_stats=True)
    assert "skipped_updates" in guarded.state_dict()
    # without running statistics there is nothing to guard nor to count
    assert "skipped_updates" not in BatchNorm(3, track_running_stats=False,
                                              guard_running_stats=True).state_dict()
    with pytest.raises(ValueError, match=r"unexpected \['skipped_updates'\]"):
        plain.load_state_dict(guarded.state_dict())
    with pytest.raises(ValueError, match=r"missing \['skipped_updates'\]"):
        guarded.load_state_dict(plain.state_dict())
    state = guarded.state_dict()
    state["skipped_updates"] = np.asarray(-1)
    with pytest.raises(ValueError, match="skipped_updates.*non-negative integer"):
        guarded.load_state_dict(state)
    assert guarded.skipped_updates == 0


def test_bad_guard_argument_is_rejected_before_any_state_changes():
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(TypeError, match="guard_running_stats must be a bool, got str"):
        batch_norm_forward(x, running_mean=rm, running_var=rv, backend="numpy",
                           guard_running_stats="yes")
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)
    with pytest.raises(TypeError, match="guard_running_stats must be a bool, got int"):
        BatchNorm(3, guard_running_stats=1)

"""Ghost batch norm (``virtual_batch_size=k``): consecutive groups of k
samples along the batch axis, each normalized with its own statistics and
shared weight and bias; running statistics updated once per call with the
mean over the groups of their means and unbiased variances; the backward per
group.  Oracles: PyTorch's batch norm run on each group (float64), and a
NumPy loop over the groups for the running statistics."""

from __future__ import annotations

import numpy as np
import pytest

from gpubn import BatchNorm, batch_norm_backward, batch_norm_forward
from gpubn.backends import get_backend

from conftest import (assert_rounded_close, assert_sum_close, bn_dx_slack, bn_output_slack,
                      bn_sum_terms, to_backend, to_numpy, torch_batch_norm)

# name: (shape, channel axis, k)
CASES = {
    "nchw-vector": ((8, 4, 64), 1, 2),     # 16-byte loads inside each group
    "nchw-tail": ((6, 3, 5), 1, 3),
    "nchw-4d": ((8, 3, 4, 5), 1, 4),
    "nhwc": ((6, 3, 4, 8), -1, 2),          # channels last: a group is k*H*W rows
    "nc": ((12, 6), 1, 3),
    "ncl-axis2": ((4, 2, 5, 3), 2, 2),      # outer = N * 2: a group is k*2 outer rows
}


def _data(shape, axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    # per-sample offsets make the groups' statistics differ from the batch's
    x = rng.standard_normal(shape) + 3.0 * rng.standard_normal((shape[0],) + (1,) * (len(shape) - 1))
    dy = rng.standard_normal(shape)
    w = rng.uniform(0.5, 2.0, c)
    b = rng.standard_normal(c)
    return x.astype(dtype), dy.astype(dtype), w, b


def _groups(a, k):
    return [a[i:i + k] for i in range(0, a.shape[0], k)]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_ghost_matches_pytorch_per_group(backend, case, dtype):
    shape, axis, k = CASES[case]
    x, dy, w, b = _data(shape, axis, dtype)
    acc = np.float64 if dtype == np.float64 else np.float32
    rm = to_backend(backend, np.full(shape[axis], 0.5, acc))
    rv = to_backend(backend, np.full(shape[axis], 2.0, acc))
    y, saved = batch_norm_forward(to_backend(backend, x), weight=to_backend(backend, w.astype(acc)),
                                  bias=to_backend(backend, b.astype(acc)), running_mean=rm,
                                  running_var=rv, axis=axis, backend=backend.name,
                                  virtual_batch_size=k)
    dx, dw, db = batch_norm_backward(to_backend(backend, dy), saved)
    groups = shape[0] // k
    assert saved.groups == groups and to_numpy(saved.mean).shape == (groups, shape[axis])
    y, dx = to_numpy(y), to_numpy(dx)
    wq, bq = w.astype(acc), b.astype(acc)
    terms_dy, terms_dyx = [], []
    for g, (xg, dyg) in enumerate(zip(_groups(x, k), _groups(dy, k))):
        ref = torch_batch_norm(xg, wq, bq, axis=axis, dy=dyg)
        sl = slice(g * k, (g + 1) * k)
        assert_rounded_close(y[sl], ref["y"], dtype,
                             bn_output_slack(xg, wq, bq, axis, dtype), name=f"y, group {g}")
        assert_rounded_close(dx[sl], ref["dx"], dtype,
                             bn_dx_slack(xg, dyg, wq, axis, dtype, True), name=f"dx, group {g}")
        red, t_dy, t_dyx = bn_sum_terms(xg, dyg, axis)
        terms_dy.append(t_dy)
        terms_dyx.append(t_dyx)
        if g == 0:
            want_dw, want_db = ref["dweight"], ref["dbias"]
        else:
            want_dw, want_db = want_dw + ref["dweight"], want_db + ref["dbias"]
    # dweight / dbias: the sums of the groups' sums, bounded as one reduction
    assert_sum_close(db, want_db, np.concatenate(terms_dy), red, dtype, name="dbias")
    assert_sum_close(dw, want_dw, np.concatenate(terms_dyx), red, dtype, name="dweight")

    # running statistics: once, with the mean over the groups (NumPy loop, float64)
    xs = [np.moveaxis(xg.astype(np.float64), axis, -1).reshape(-1, shape[axis])
          for xg in _groups(x, k)]
    batch_mean = np.mean([xg.mean(axis=0) for xg in xs], axis=0)
    batch_var = np.mean([xg.var(axis=0, ddof=1) for xg in xs], axis=0)
    want_rm = 0.9 * 0.5 + 0.1 * batch_mean
    want_rv = 0.9 * 2.0 + 0.1 * batch_var
    u = np.finfo(acc).eps
    np.testing.assert_allclose(to_numpy(rm), want_rm, rtol=64 * u, atol=64 * u * np.abs(xs).max())
    np.testing.assert_allclose(to_numpy(rv), want_rv, rtol=64 * u)
    # the groups' statistics differ from the whole batch's: ghost is not plain batch norm
    whole = np.moveaxis(x.astype(np.float64), axis, -1).reshape(-1, shape[axis])
    assert np.abs(whole.var(axis=0, ddof=1) - batch_var).max() > 0.1


def test_one_group_is_plain_batch_norm(backend):
    x, dy, w, b = _data((6, 3, 5), 1, np.float32)
    xb = to_backend(backend, x)
    outs = []
    for k in (None, 6):
        rm, rv = to_backend(backend, np.zeros(3, np.float32)), to_backend(backend, np.ones(3, np.float32))
        y, s = batch_norm_forward(xb, running_mean=rm, running_var=rv, backend=backend.name,
                                  virtual_batch_size=k)
        outs.append((to_numpy(y), to_numpy(rm), to_numpy(rv), to_numpy(s.mean)))
    for a, e in zip(*outs):
        np.testing.assert_array_equal(a, e)


def test_kernels_run_every_group_in_the_launches_of_one_batch_norm():
    """Same launches and passes as one batch norm of that size (forward: 2
    launches, x read twice and y written once; backward: 2 launches, 5
    passes), with the groups as grid z: no copy and no launch per group."""
    try:
        get_backend("emu")
    except RuntimeError as exc:
        pytest.skip(str(exc))
    from gpubn import kernels as catalog
    from gpubn.emu import recording

    for shape, axis, k in (((8, 3, 64), 1, 2), ((8, 4, 4, 8), -1, 4)):
        x, dy, w, b = _data(shape, axis, np.float32)
        rm, rv = np.zeros(shape[axis], np.float32), np.ones(shape[axis], np.float32)
        with recording() as fwd:
            _, saved = batch_norm_forward(x, weight=w.astype(np.float32), running_mean=rm,
                                          running_var=rv, axis=axis, backend="emu",
                                          virtual_batch_size=k)
        with recording() as bwd:
            batch_norm_backward(dy, saved)
        for log, launches, passes in ((fwd, 2, 3), (bwd, 2, 5)):
            assert len(log) == launches, [r.kernel for r in log]
            moved = 0
            for rec in log:
                assert rec.grid[2] == shape[0] // k, (rec.kernel, rec.grid)
                spec = catalog.kernel_of(rec.kernel)
                moved += sum(t.loaded + t.stored for i, t in rec.buffers.items()
                             if i in spec.tensor_args)
            assert moved == passes * x.nbytes, (moved / x.nbytes, [r.kernel for r in log])


def test_layer_ghost_in_training_only(backend):
    x, dy, w, b = _data((8, 3, 5), 1, np.float32)
    xb = to_backend(backend, x)
    bn = BatchNorm(3, backend=backend.name, virtual_batch_size=4)
    assert "virtual_batch_size=4" in repr(bn)
    y = to_numpy(bn(xb))
    want = np.concatenate([to_numpy(batch_norm_forward(to_backend(backend, xg),
                                                       backend=backend.name)[0])
                           for xg in _groups(x, 4)])
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    dx = to_numpy(bn.backward(to_backend(backend, dy)))
    want_dx = np.concatenate([
        to_numpy(batch_norm_backward(to_backend(backend, dyg),
                                     batch_norm_forward(to_backend(backend, xg),
                                                        backend=backend.name)[1])[0])
        for xg, dyg in zip(_groups(x, 4), _groups(dy, 4))])
    np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-5)
    assert bn.num_batches_tracked == 1
    # eval: the running statistics, any batch size
    bn.eval()
    y_eval = to_numpy(bn(to_backend(backend, x[:3])))
    rm, rv = to_numpy(bn.running_mean), to_numpy(bn.running_var)
    np.testing.assert_allclose(y_eval, (x[:3] - rm[:, None]) / np.sqrt(rv[:, None] + 1e-5),
                               rtol=1e-5, atol=1e-5)


def test_ghost_with_guard_skips_on_the_group_average(backend):
    x, _, _, _ = _data((8, 3, 5), 1, np.float32)
    x[5, 1, 2] = np.inf        # one group's channel 1
    bn = BatchNorm(3, backend=backend.name, virtual_batch_size=4, guard_running_stats=True)
    bn(to_backend(backend, x))
    assert bn.skipped_updates == 1
    np.testing.assert_array_equal(to_numpy(bn.running_mean)[1], 0.0)
    np.testing.assert_array_equal(to_numpy(bn.running_var)[1], 1.0)
    assert np.all(to_numpy(bn.running_mean)[[0, 2]] != 0)


def test_bad_virtual_batch_size_is_rejected_before_any_state_changes():
    x = np.random.default_rng(0).standard_normal((6, 3, 4)).astype(np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)

    def call(**kw):
        return batch_norm_forward(x, running_mean=rm, running_var=rv, backend="numpy", **kw)

    with pytest.raises(ValueError, match=r"virtual_batch_size=4 does not divide the batch "
                                         r"size 6 \(x\.shape\[0\] = 6\)"):
        call(virtual_batch_size=4)
    with pytest.raises(TypeError, match="virtual_batch_size must be a positive int or None, "
                                        "got float"):
        call(virtual_batch_size=2.0)
    with pytest.raises(TypeError, match="virtual_batch_size must be a positive int or None, "
                                        "got bool"):
        call(virtual_batch_size=True)
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive int or None, "
                                         "got 0"):
        call(virtual_batch_size=0)
    with pytest.raises(ValueError, match="batch axis 0, which is the channel axis"):
        batch_norm_forward(x, axis=0, backend="numpy", virtual_batch_size=2)
    with pytest.raises(ValueError, match="more than 1 value per channel in each group"):
        batch_norm_forward(x[:, :, :1], running_mean=rm, running_var=rv, backend="numpy",
                           virtual_batch_size=1)
    np.testing.assert_array_equal(rm, 0)
    np.testing.assert_array_equal(rv, 1)
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive int"):
        BatchNorm(3, virtual_batch_size=-2)
    bn = BatchNorm(3, virtual_batch_size=4)
    with pytest.raises(ValueError, match="virtual_batch_size=4 does not divide"):
        bn(x)
    assert bn.num_batches_tracked == 0
    np.testing.assert_array_equal(bn.running_mean, 0)


@pytest.mark.parametrize("shape3", [(8, 3, 256), (4000, 12, 1)])
def test_grouped_launch_plans(shape3):
    """A ghost launch is the plan of one group with the groups as grid z and
    every group's partials and counters in the workspace; one wave holds the
    blocks of all groups."""
    from gpubn.launch import EMU_DEVICE, REDUCE_MIN_BLOCKS, map_launch, reduce_launch

    groups = 4
    one = (shape3[0] // groups,) + shape3[1:]
    for op in ("stats", "grad"):
        g = reduce_launch(op, shape3, "float", True, EMU_DEVICE, groups=groups)
        p = reduce_launch(op, one, "float", True, EMU_DEVICE)
        assert g.grid[2] == groups and g.block == p.block and g.vec == p.vec
        wave = EMU_DEVICE.sm_count * REDUCE_MIN_BLOCKS
        assert g.splits <= p.splits
        assert g.splits == 1 or g.grid[0] * g.grid[1] * groups <= wave
        if g.splits > 1:
            per_split = p.partial_bytes // p.splits
            assert g.partial_bytes == groups * g.splits * per_split
            assert g.counters == groups * p.counters
    for op in ("apply", "dx"):
        g = map_launch(op, shape3, "float", True, EMU_DEVICE, groups=groups)
        p = map_launch(op, one, "float", True, EMU_DEVICE)
        assert g.grid[2] == groups and g.block == p.block and g.grid[0] == p.grid[0]
    with pytest.raises(ValueError, match="groups must be in .* and divide the outer extent"):
        reduce_launch("stats", shape3, "float", True, EMU_DEVICE, groups=3)


def test_torch_drop_in_passes_both_options_through(torch):
    """gpubn.torch.BatchNorm2d(virtual_batch_size=k, guard_running_stats=True)
    normalizes like gpubn.BatchNorm with the same options, counts skipped
    updates in a ``skipped_updates`` buffer, and its gradients are the
    per-group ones."""
    import gpubn.torch as gt

    x, dy, _, _ = _data((8, 3, 4, 5), 1, np.float32)
    x[6, 2, 1, 1] = np.nan
    ours = BatchNorm(3, guard_running_stats=True, virtual_batch_size=4, backend="numpy")
    want = ours(x)
    want_dx = ours.backward(dy)
    m = gt.BatchNorm2d(3, guard_running_stats=True, virtual_batch_size=4, backend="numpy")
    assert "skipped_updates" in m.state_dict() and "virtual_batch_size=4" in repr(m)
    xt = torch.tensor(x, requires_grad=True)
    y = m(xt)
    y.backward(torch.tensor(dy))
    np.testing.assert_array_equal(y.detach().numpy(), want)
    np.testing.assert_array_equal(xt.grad.numpy(), want_dx)
    np.testing.assert_array_equal(m.running_var.numpy(), ours.running_var)
    assert int(m.skipped_updates) == ours.skipped_updates == 1
    assert "skipped_updates" not in gt.BatchNorm2d(3).state_dict()
    with pytest.raises(ValueError, match="virtual_batch_size=3 does not divide the batch size 8"):
        gt.BatchNorm2d(3, virtual_batch_size=3)(xt)


def test_channel_outermost_memory_order_gives_the_same_groups(backend):
    """A (N, C, L) array stored channel-first in memory (its canonical view
    would put C outside the batch) is normalized per group of samples all the
    same."""
    x, _, _, _ = _data((6, 3, 5), 1, np.float32)
    strided = np.ascontiguousarray(x.transpose(1, 0, 2)).transpose(1, 0, 2)
    assert not strided.flags.c_contiguous
    outs = []
    for a in (x, strided):
        rm, rv = (to_backend(backend, np.zeros(3, np.float32)),
                  to_backend(backend, np.ones(3, np.float32)))
        y, _ = batch_norm_forward(to_backend(backend, a), running_mean=rm, running_var=rv,
                                  backend=backend.name, virtual_batch_size=2)
        outs.append((to_numpy(y), to_numpy(rm), to_numpy(rv)))
    for a, e in zip(*outs):
        np.testing.assert_array_equal(a, e)

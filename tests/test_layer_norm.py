"""Layer normalization on every backend: against torch.nn.functional.layer_norm
(CPU, float64, the optional oracle), finite differences, awkward row lengths
(1, odd, longer than a block, 65537), NHWC-style calls and bad input.
"""

from __future__ import annotations

import numpy as np
import pytest

import gpubn
from conftest import (DTYPES, assert_close, assert_rounded_close, assert_sum_close, backend_or_skip,
                      ln_dx_slack, ln_output_slack, numeric_gradients, to_backend, to_numpy,
                      torch_or_skip)


def torch_layer_norm(x, normalized_shape, weight, bias, eps, dy):
    """Reference y, dx, dweight, dbias from PyTorch in float64."""
    torch = torch_or_skip()
    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    wt = None if weight is None else torch.tensor(np.asarray(weight, np.float64),
                                                  requires_grad=True)
    bt = None if bias is None else torch.tensor(np.asarray(bias, np.float64), requires_grad=True)
    y = torch.nn.functional.layer_norm(xt, tuple(normalized_shape), wt, bt, eps)
    y.backward(torch.tensor(np.asarray(dy, np.float64)))
    return (y.detach().numpy(), xt.grad.numpy(), None if wt is None else wt.grad.numpy(),
            None if bt is None else bt.grad.numpy())


def make(shape, nshape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    rows = int(np.prod(shape[:len(shape) - len(nshape)]))
    # every row its own mean and scale (catches row/column mix-ups)
    shift = (3.0 * rng.standard_normal(rows)).reshape(shape[:len(shape) - len(nshape)] +
                                                       (1,) * len(nshape))
    scale = rng.uniform(0.5, 2.0, rows).reshape(shift.shape)
    x = (rng.standard_normal(shape) * scale + shift).astype(dtype)
    pdt = np.float64 if dtype == np.float64 else np.float32
    w = rng.uniform(0.5, 1.5, nshape).astype(pdt)
    b = rng.standard_normal(nshape).astype(pdt)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, w, b, dy


CASES = [
    ((4, 1), (1,)),               # rows of length 1
    ((3, 7), (7,)),               # odd, short: one warp per row
    ((5, 8), (8,)),               # vectorizable short rows
    ((2, 3, 5), (3, 5)),          # two normalized dims
    ((2, 3, 4, 6), (6,)),         # NHWC, normalized over channels (ConvNeXt style)
    ((3, 1031), (1031,)),         # odd, longer than a warp's share: one block per row
    ((2, 2048), (2048,)),         # vectorized, one block per row
]
CASE_IDS = [f"{'x'.join(map(str, s))}-n{'x'.join(map(str, n))}" for s, n in CASES]


def _sum_terms(x, dy, n, eps):
    """Summands of dbias (dy) and dweight (dy * xhat, plus |dy| for the
    rounding of the row statistics) over the rows, for sum_tolerance."""
    x2 = np.asarray(x, np.float64).reshape(-1, n)
    dy2 = np.asarray(dy, np.float64).reshape(-1, n)
    xhat = (x2 - x2.mean(axis=1, keepdims=True)) / np.sqrt(x2.var(axis=1, keepdims=True) + eps)
    return dy2, np.abs(dy2) * (np.abs(xhat) + 1.0)


@pytest.mark.parametrize("shape,nshape", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("mode", ["affine", "weight-only", "none"])
def test_matches_torch(backend, shape, nshape, dtype, mode):
    x, w, b, dy = make(shape, nshape, dtype)
    if mode != "affine":
        b = None
    if mode == "none":
        w = None
    eps = 1e-5
    ref_y, ref_dx, ref_dw, ref_db = torch_layer_norm(x, nshape, w, b, eps, dy)
    y, saved = gpubn.layer_norm_forward(to_backend(backend, x), nshape, to_backend(backend, w),
                                        to_backend(backend, b), eps, backend=backend.name)
    assert y.shape == x.shape and y.dtype == x.dtype
    n = int(np.prod(nshape))
    assert_rounded_close(y, ref_y, dtype, ln_output_slack(x, n, w, b, dtype, eps), "y")
    dx, dw, db = gpubn.layer_norm_backward(to_backend(backend, dy), saved)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    db_terms, dw_terms = _sum_terms(x, dy, n, eps)
    if n == 1:   # xhat = 0: dx and dweight are zero, y is the bias
        np.testing.assert_array_equal(to_numpy(dx), 0.0)
        if w is not None:
            np.testing.assert_array_equal(to_numpy(dw), 0.0)
            ref_dw = np.zeros_like(ref_dw)   # PyTorch's own: rounding times 1/sqrt(eps)
    assert_rounded_close(dx, ref_dx, dtype, ln_dx_slack(x, dy, n, w, dtype, eps), "dx")
    if w is None:
        assert dw is None
    else:
        assert dw.shape == nshape and dw.dtype == w.dtype
        assert_sum_close(to_numpy(dw).reshape(n), ref_dw.reshape(n), dw_terms, (0,), dtype,
                         "dweight")
    if b is None:
        assert db is None
    else:
        assert db.shape == nshape and db.dtype == b.dtype
        assert_sum_close(to_numpy(db).reshape(n), ref_db.reshape(n), db_terms, (0,), dtype,
                         "dbias")


def test_statistics_saved_per_row(backend):
    x, w, b, _ = make((3, 4, 9), (9,), np.float64, seed=2)
    _, saved = gpubn.layer_norm_forward(to_backend(backend, x), 9, backend=backend.name)
    rows = x.reshape(12, 9)
    assert_close(saved.mean, rows.mean(axis=1), np.float64, "mean")
    assert_close(saved.rstd, 1 / np.sqrt(rows.var(axis=1) + 1e-5), np.float64, "rstd")


def test_long_row_65537(backend):
    """A row longer than 65536 elements (grid-stride over the row)."""
    shape = (2, 65537)
    x, w, b, dy = make(shape, (shape[1],), np.float32, seed=3)
    ref_y, ref_dx, ref_dw, ref_db = torch_layer_norm(x, (shape[1],), w, b, 1e-5, dy)
    y, saved = gpubn.layer_norm_forward(to_backend(backend, x), shape[1:], to_backend(backend, w),
                                        to_backend(backend, b), backend=backend.name)
    n = shape[1]
    assert_rounded_close(y, ref_y, np.float32, ln_output_slack(x, n, w, b, np.float32), "y")
    dx, dw, db = gpubn.layer_norm_backward(to_backend(backend, dy), saved)
    assert_rounded_close(dx, ref_dx, np.float32, ln_dx_slack(x, dy, n, w, np.float32), "dx")
    db_terms, dw_terms = _sum_terms(x, dy, n, 1e-5)
    assert_sum_close(dw, ref_dw, dw_terms, (0,), np.float32, "dweight")
    assert_sum_close(db, ref_db, db_terms, (0,), np.float32, "dbias")


def test_large_mean_is_stable(backend):
    """Rows at 1e4 with unit spread, float32: no E[x^2] - E[x]^2 cancellation."""
    rng = np.random.default_rng(4)
    x64 = 1e4 + rng.standard_normal((6, 300))
    x = x64.astype(np.float32)
    y, saved = gpubn.layer_norm_forward(to_backend(backend, x), 300, backend=backend.name)
    xd = x.astype(np.float64)
    var = xd.var(1)
    # E[x^2] - E[x]^2 in float32 would miss the variance (about 1) by O(1)
    np.testing.assert_allclose(to_numpy(saved.rstd), 1 / np.sqrt(var + 1e-5), rtol=1e-3)
    # a float32 mean of values near 1e4 is only good to about one ulp of 1e4
    # (~1e-3), which shifts every y of the row by that much over its std
    ref = (xd - xd.mean(1, keepdims=True)) / np.sqrt(var[:, None] + 1e-5)
    np.testing.assert_allclose(to_numpy(y), ref, rtol=0, atol=2e-3)


def test_gradient_finite_differences_float64(backend):
    shape, nshape = (3, 2, 5), (2, 5)
    x, w, b, g = make(shape, nshape, np.float64, seed=7)

    def loss(x_, w_, b_):
        y, _ = gpubn.layer_norm_forward(to_backend(backend, x_), nshape, to_backend(backend, w_),
                                        to_backend(backend, b_), backend=backend.name)
        return float(np.sum(to_numpy(y) * g))

    _, saved = gpubn.layer_norm_forward(to_backend(backend, x), nshape, to_backend(backend, w),
                                        to_backend(backend, b), backend=backend.name)
    dx, dw, db = (to_numpy(a) for a in gpubn.layer_norm_backward(to_backend(backend, g), saved))
    numeric = numeric_gradients(loss, (x, w, b))
    for grad, num, name in zip((dx, dw, db), numeric, ("dx", "dweight", "dbias")):
        np.testing.assert_allclose(grad, num, rtol=1e-5, atol=1e-7, err_msg=name)


def test_noncontiguous_input_and_nhwc_from_nchw(backend):
    """A channels-last view of an NCHW array (what NHWC layer norm over C
    receives from a transposing caller) gives the contiguous result."""
    base, w, b, dy = make((2, 6, 4, 5), (5,), np.float32, seed=8)
    x = base.transpose(0, 2, 3, 1)           # (2, 4, 5, 6): not contiguous
    w6, b6 = np.linspace(0.5, 1.5, 6).astype(np.float32), np.linspace(-1, 1, 6).astype(np.float32)
    dyt = dy.transpose(0, 2, 3, 1)
    assert not x.flags.c_contiguous
    y1, s1 = gpubn.layer_norm_forward(to_backend(backend, x), 6, to_backend(backend, w6),
                                      to_backend(backend, b6), backend=backend.name)
    xc = np.ascontiguousarray(x)
    y2, s2 = gpubn.layer_norm_forward(to_backend(backend, xc), 6, to_backend(backend, w6),
                                      to_backend(backend, b6), backend=backend.name)
    np.testing.assert_array_equal(to_numpy(y1), to_numpy(y2))
    g1 = gpubn.layer_norm_backward(to_backend(backend, dyt), s1)
    g2 = gpubn.layer_norm_backward(to_backend(backend, np.ascontiguousarray(dyt)), s2)
    for a, e in zip(g1, g2):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(e))


def test_layer_matches_torch_module(backend):
    torch = torch_or_skip()
    ln_t = torch.nn.LayerNorm((4, 6), eps=1e-6, dtype=torch.float64)
    with torch.no_grad():
        ln_t.weight.copy_(torch.linspace(0.5, 1.5, 24).reshape(4, 6))
        ln_t.bias.copy_(torch.linspace(-1, 1, 24).reshape(4, 6))
    ln = gpubn.LayerNorm((4, 6), eps=1e-6, dtype="float64", backend=backend.name)
    ln.load_state_dict(ln_t.state_dict())
    assert set(ln.state_dict()) == {"weight", "bias"}
    x, _, _, dy = make((3, 4, 6), (4, 6), np.float64, seed=9)
    xt = torch.tensor(x, requires_grad=True)
    yt = ln_t(xt)
    yt.backward(torch.tensor(dy))
    y = ln(to_backend(backend, x))
    w = ln_t.weight.detach().numpy()
    assert_rounded_close(y, yt.detach().numpy(), np.float64,
                         ln_output_slack(x, 24, w, ln_t.bias.detach().numpy(), np.float64, 1e-6),
                         "y")
    dx = ln.backward(to_backend(backend, dy))
    assert_rounded_close(dx, xt.grad.numpy(), np.float64,
                         ln_dx_slack(x, dy, 24, w, np.float64, 1e-6), "dx")
    assert_close(ln.grad_weight, ln_t.weight.grad.numpy(), np.float64, "grad_weight")
    assert_close(ln.grad_bias, ln_t.bias.grad.numpy(), np.float64, "grad_bias")
    ln.eval()
    np.testing.assert_array_equal(to_numpy(ln(to_backend(backend, x))), to_numpy(y))
    plain = gpubn.LayerNorm(6, elementwise_affine=False, backend=backend.name)
    assert plain.state_dict() == {} and plain.weight is None
    nobias = gpubn.LayerNorm(6, bias=False, backend=backend.name)
    assert set(nobias.state_dict()) == {"weight"}
    assert "LayerNorm((6,)" in repr(nobias)


# --------------------------------------------------------------- bad input ----
def test_bad_forward_raises(backend):
    xp = backend.xp
    x = to_backend(backend, np.ones((4, 3, 5), np.float32))
    cases = [
        (dict(normalized_shape=(3,)), ValueError,
         r"normalized_shape=\(3,\) must equal the trailing dimensions of the input, got input "
         r"shape \(4, 3, 5\)"),
        (dict(normalized_shape=(2, 3, 4, 5)), ValueError, r"must equal the trailing dimensions"),
        (dict(normalized_shape=()), ValueError, r"normalized_shape must name at least one"),
        (dict(normalized_shape=(0,)), ValueError, r"normalized_shape must hold positive sizes"),
        (dict(normalized_shape=5.0), TypeError, r"normalized_shape must be an int or a tuple"),
        (dict(normalized_shape=True), TypeError, r"normalized_shape must be an int or a tuple"),
        (dict(weight=xp.ones(4, xp.float32)), ValueError,
         r"weight must have shape \(5,\) \(normalized_shape\), got shape \(4,\)"),
        (dict(bias=xp.ones((1, 5), xp.float32)), ValueError, r"bias must have shape \(5,\)"),
        (dict(weight=xp.ones(5, xp.int32)), TypeError, r"weight must have a floating-point"),
        (dict(eps=-1.0), ValueError, r"eps must be a positive"),
        (dict(x=xp.ones((4, 5), xp.int64)), TypeError, r"x must have a floating-point dtype"),
        (dict(x=xp.ones((0, 5), xp.float32)), ValueError, r"x is empty"),
        (dict(x=[[1.0] * 5]), TypeError, r"x must be an array"),
    ]
    for kwargs, exc, pattern in cases:
        args = dict(x=x, normalized_shape=5, weight=None, bias=None, eps=1e-5,
                    backend=backend.name)
        args.update(kwargs)
        with pytest.raises(exc, match=pattern):
            gpubn.layer_norm_forward(**args)


def test_bad_backward_and_layer_input(backend):
    xp = backend.xp
    x = to_backend(backend, np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32))
    _, saved = gpubn.layer_norm_forward(x, 5, backend=backend.name)
    with pytest.raises(ValueError, match=r"dy must have the shape of the forward input \(4, 5\)"):
        gpubn.layer_norm_backward(xp.ones((5, 4), xp.float32), saved)
    with pytest.raises(TypeError, match=r"dy must have the dtype of the forward input"):
        gpubn.layer_norm_backward(xp.ones((4, 5), xp.float16), saved)
    with pytest.raises(TypeError, match=r"saved must be the LayerNormSaved"):
        gpubn.layer_norm_backward(x, None)
    ln = gpubn.LayerNorm(5, backend=backend.name)
    with pytest.raises(ValueError, match=r"backward called before any forward"):
        ln.backward(x)
    with pytest.raises(ValueError, match=r"must equal the trailing dimensions"):
        ln(xp.ones((4, 6), xp.float32))
    before = ln.state_dict()
    with pytest.raises(ValueError, match=r"state\['weight'\] must have shape \(5,\)"):
        ln.load_state_dict({"weight": np.ones(6, np.float32), "bias": np.zeros(5, np.float32)})
    with pytest.raises(ValueError, match=r"state keys do not match"):
        ln.load_state_dict({"weight": np.ones(5, np.float32)})
    for k, v in ln.state_dict().items():
        np.testing.assert_array_equal(to_numpy(v), to_numpy(before[k]))
    with pytest.raises(ValueError, match=r"normalized_shape must hold positive sizes"):
        gpubn.LayerNorm((3, 0))
    with pytest.raises(TypeError, match=r"dtype must be float16, float32 or float64"):
        gpubn.LayerNorm(3, dtype="int8")


# ------------------------------------------------------ kernels on emu ----
@pytest.mark.parametrize("n,kind,passes", [(24, "warp", 1), (2000, "block", 1),
                                           (1031, "block", 2)])
def test_emu_launches_and_traffic(n, kind, passes):
    """One launch forward, two backward (dx per row; the dweight/dbias column
    reduction), with memcheck and racecheck on.  Rows that fit the kernels'
    register cache (24: a warp per row; 2000 floats: 64 threads x 8 units of 4)
    are read once; 1031 (odd: scalar, more than 64 x 8 units) twice."""
    pytest.importorskip("gpubn.emu")
    from gpubn import emu
    backend_or_skip("emu")
    opts = emu.get_options()
    assert opts.memcheck and opts.racecheck
    rows = 37 if n < 1000 else 3
    x, w, b, dy = make((rows, n), (n,), np.float32, seed=11)
    nbytes = x.nbytes
    with emu.recording() as log:
        y, saved = gpubn.layer_norm_forward(x, n, w, b, backend="emu")
    (fwd,) = log
    assert fwd.kernel.startswith(f"gpubn::ln_forward_{kind}<float, float, {4 if n % 4 == 0 else 1}>")
    assert fwd.buffers[0].loaded == passes * nbytes and fwd.buffers[0].stored == 0
    assert fwd.buffers[1].stored == nbytes and fwd.buffers[1].loaded == 0
    # weight and bias: staged in shared memory once per block
    assert fwd.buffers[2].loaded == fwd.buffers[3].loaded == fwd.grid[0] * w.nbytes
    with emu.recording() as log:
        gpubn.layer_norm_backward(dy, saved)
    dx_rec, wgrad = log
    assert dx_rec.kernel.startswith(f"gpubn::ln_backward_dx_{kind}<")
    assert wgrad.kernel.startswith("gpubn::ln_backward_wgrad<")
    assert dx_rec.buffers[0].loaded == passes * nbytes      # dy
    assert dx_rec.buffers[1].loaded == passes * nbytes      # x
    assert dx_rec.buffers[2].stored == nbytes and dx_rec.buffers[2].loaded == 0
    assert dx_rec.buffers[5].loaded == dx_rec.grid[0] * w.nbytes   # weight, staged
    assert wgrad.buffers[0].loaded == nbytes and wgrad.buffers[1].loaded == nbytes
    with emu.recording() as log:   # no parameters: no column reduction
        _, s2 = gpubn.layer_norm_forward(x, n, backend="emu")
        gpubn.layer_norm_backward(dy, s2)
    assert len(log) == 2


def test_emu_column_reduction_is_deterministic():
    """dweight/dbias come out bit-identical whatever order the blocks run in
    (the emulator shuffles it by seed); the reduction is split over several
    blocks here."""
    pytest.importorskip("gpubn.emu")
    from gpubn import emu
    backend_or_skip("emu")
    x, w, b, dy = make((203, 40), (40,), np.float32, seed=12)
    results = []
    for seed in (1, 2, 3):
        with emu.options(seed=seed), emu.recording() as log:
            _, saved = gpubn.layer_norm_forward(x, 40, w, b, backend="emu")
            results.append(gpubn.layer_norm_backward(dy, saved))
        assert log[-1].grid[1] > 1          # several blocks per column tile
    for other in results[1:]:
        for a, e in zip(other, results[0]):
            np.testing.assert_array_equal(a, e)


def test_nonfinite_values_stay_in_their_row(backend):
    """A NaN or Inf makes its own row NaN (as in PyTorch); other rows are
    untouched, since layer norm never mixes rows in the forward."""
    x, w, b, _ = make((4, 300), (300,), np.float32, seed=13)
    x[1, 7] = np.nan
    x[2, 100] = np.inf
    y, saved = gpubn.layer_norm_forward(to_backend(backend, x), 300, to_backend(backend, w),
                                        to_backend(backend, b), backend=backend.name)
    y = to_numpy(y)
    assert np.isnan(y[1]).all() and np.isnan(y[2]).all()
    ref_y = torch_layer_norm(x[[0, 3]], (300,), w, b, 1e-5, np.zeros((2, 300)))[0]
    assert_rounded_close(y[[0, 3]], ref_y, np.float32,
                         ln_output_slack(x[[0, 3]], 300, w, b, np.float32), "finite rows")


@pytest.mark.parametrize("n", [24, 1031])
def test_emu_grid_stride_over_rows(n):
    """A grid much smaller than the row count (a 2-SM device, one block per SM):
    each block walks several rows, reusing its shared row statistics, under
    racecheck; results equal the NumPy backend's."""
    pytest.importorskip("gpubn.emu")
    backend_or_skip("emu")
    from gpubn.backends.emu import EMU_TUNING, EmuBackend
    from gpubn.emu import recording
    from gpubn.launch import DeviceAttributes
    import dataclasses

    small = EmuBackend(tuning=dataclasses.replace(EMU_TUNING, map_blocks_per_sm=1),
                       device_attributes=DeviceAttributes(sm_count=2))
    x, w, b, dy = make((9, n), (n,), np.float64, seed=14)
    with recording() as log:
        y, saved = gpubn.layer_norm_forward(x, n, w, b, backend=small)
        dx, dw, db = gpubn.layer_norm_backward(dy, saved)
    assert log[0].grid[0] * log[0].block[1] < 9 and log[1].grid[0] * log[1].block[1] < 9
    y_ref, saved_ref = gpubn.layer_norm_forward(x, n, w, b, backend="numpy")
    for name, a, e in zip(("y", "dx", "dweight", "dbias"), (y, dx, dw, db),
                          (y_ref,) + gpubn.layer_norm_backward(dy, saved_ref)):
        assert_close(a, e, np.float64, name)


def test_properties_on_random_rows(backend):
    """Invariants that need no reference: each row of y (no affine) has mean 0
    and variance var/(var + eps); layer_norm(a*x + c) = layer_norm(x) for
    a > 0 up to eps; each row of dx is orthogonal to 1 and to xhat."""
    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    @hypothesis.settings(max_examples=15 if backend.name == "numpy" else 6, deadline=None,
                         derandomize=True)
    @hypothesis.given(rows=st.integers(1, 5), n=st.integers(2, 300),
                      a=st.floats(0.5, 20.0), c=st.floats(-50.0, 50.0),
                      seed=st.integers(0, 2 ** 16))
    def check(rows, n, a, c, seed):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((rows, n)) * rng.uniform(0.5, 3.0, (rows, 1))
        g = rng.standard_normal((rows, n))
        eps = 1e-12
        y, saved = gpubn.layer_norm_forward(to_backend(backend, x), n, eps=eps,
                                            backend=backend.name)
        y = to_numpy(y)
        np.testing.assert_allclose(y.mean(axis=1), 0.0, atol=1e-12)
        np.testing.assert_allclose(y.var(axis=1), 1.0, rtol=1e-9)
        y2, _ = gpubn.layer_norm_forward(to_backend(backend, a * x + c), n, eps=eps,
                                         backend=backend.name)
        np.testing.assert_allclose(to_numpy(y2), y, atol=1e-9)
        dx = to_numpy(gpubn.layer_norm_backward(to_backend(backend, g), saved)[0])
        scale = np.abs(g).max() * to_numpy(saved.rstd).max()
        np.testing.assert_allclose(dx.sum(axis=1), 0.0, atol=1e-10 * n * scale)
        np.testing.assert_allclose((dx * y).sum(axis=1), 0.0, atol=1e-10 * n * scale)

    check()

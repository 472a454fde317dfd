"""Shared fixtures and helpers: backends, tolerances, comparison, the oracle."""

from __future__ import annotations

import os

import numpy as np
import pytest

from gpubn.backends import BACKENDS, get_backend

def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="run the tests marked slow (CI, i.e. CI=true, always runs them)")


def run_slow(config) -> bool:
    """Slow tests (worker processes, wheel builds) run in CI (``CI`` set to a
    true value, as CI services and .ci/run do) or with ``--run-slow``."""
    ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    return ci or config.getoption("--run-slow")


@pytest.fixture(scope="module", autouse=True)
def _environment_per_module():
    """Each test module leaves ``os.environ`` as it found it: Dask's
    distributed sets variables for its workers in its parent's environment
    (``MALLOC_TRIM_THRESHOLD_``, ``OMP_NUM_THREADS``, ...), which every later
    subprocess of the suite would inherit."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def pytest_collection_modifyitems(config, items):
    if run_slow(config):
        return
    skip = pytest.mark.skip(reason="slow test: runs in CI (CI=true) or with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# (rtol, atol) per input dtype, used by every comparison in the suite.
TOL = {
    np.dtype(np.float16): (1e-2, 1e-2),
    np.dtype(np.float32): (1e-4, 1e-5),
    np.dtype(np.float64): (1e-9, 1e-11),
}

DTYPES = (np.float16, np.float32, np.float64)

try:
    import ml_dtypes
except ImportError:            # bfloat16 tests skip (the 'test' extra brings ml_dtypes)
    BFLOAT16 = None
else:
    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
    # bfloat16 keeps 8 significant bits: unit roundoff u = 2**-8.  A result
    # computed in float32 from bfloat16 inputs and rounded once to bfloat16 is
    # within u of the exact value relative to its magnitude (float32's own
    # error, ~2**-24 of the data's scale, is far below); 2u covers that
    # rounding plus one more in an input the caller rounded (running
    # statistics, parameters), both relative and near zero.
    TOL[BFLOAT16] = (2.0 ** -7, 2.0 ** -7)


def unavailable_reason(name):
    """Why backend ``name`` cannot run on this machine, or None."""
    try:
        get_backend(name)
    except RuntimeError as exc:
        return str(exc)
    return None


def backend_or_skip(name):
    """Backend ``name``, or a skip of the calling test with the backend's
    own reason when it cannot run on this machine."""
    try:
        return get_backend(name)
    except RuntimeError as exc:
        pytest.skip(str(exc))


@pytest.fixture(params=BACKENDS)
def backend(request):
    """A gpubn backend object; skips with the backend's own reason when it
    cannot run on this machine."""
    return backend_or_skip(request.param)


def xp_of(backend):
    """Array module of a backend (numpy or cupy)."""
    return backend.xp


def to_numpy(a):
    """NumPy copy of a NumPy/CuPy array (None passes through)."""
    if a is None:
        return None
    if hasattr(a, "get"):
        return a.get()
    return np.asarray(a)


def to_backend(backend, a):
    """Put a NumPy array on a backend's array module."""
    if a is None:
        return None
    return backend.xp.asarray(a)


def assert_close(actual, expected, dtype, name="value", scale=1.0):
    """Compare with ``TOL[dtype]`` (times ``scale``); on mismatch report the
    worst elements, their indices and both values."""
    rtol, atol = TOL[np.dtype(dtype)]
    rtol, atol = rtol * scale, atol * scale
    a = np.asarray(to_numpy(actual), dtype=np.float64)
    e = np.asarray(to_numpy(expected), dtype=np.float64)
    assert a.shape == e.shape, f"{name}: shape {a.shape} != expected {e.shape}"
    with np.errstate(invalid="ignore"):
        err = np.abs(a - e)
        bad = ~(err <= atol + rtol * np.abs(e))
    # NaN must match NaN, Inf must match Inf of the same sign
    same_nonfinite = (np.isnan(a) & np.isnan(e)) | ((a == e) & np.isinf(e))
    bad &= ~same_nonfinite
    if bad.any():
        with np.errstate(invalid="ignore"):
            excess = np.where(bad, np.nan_to_num(err, nan=np.inf) - rtol * np.abs(e), -np.inf)
        worst = np.argsort(excess, axis=None)[::-1][:min(5, int(bad.sum()))]
        lines = [f"  at {tuple(int(k) for k in np.unravel_index(i, a.shape))}: got "
                 f"{float(a.flat[i])!r}, expected {float(e.flat[i])!r} "
                 f"(abs err {float(err.flat[i]):.3g})" for i in worst]
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.size} elements differ beyond rtol={rtol:g}, "
            f"atol={atol:g} for {np.dtype(dtype).name}; worst:\n" + "\n".join(lines))


# ------------------------------------------------------- reduction bounds ----
def acc_unit_roundoff(dtype) -> float:
    """Unit roundoff of the accumulation dtype of storage ``dtype``: float64
    for float64, float32 for everything narrower."""
    acc = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    return float(np.finfo(acc).eps) / 2


def sum_tolerance(terms, reduce_axes, dtype):
    """Error bound for per-channel sums of ``terms`` (float64, the exact
    summands) over ``reduce_axes``, accumulated in the accumulation dtype of
    storage ``dtype`` by a blocked or tree reduction (every backend's).

    A tree over m terms has 1 + log2(m) levels; rounding errors are
    independent with random sign, so they grow like the square root of
    their number (Higham, Accuracy and Stability, sec. 2.8 and 4.2):
    ``|error| <= 4 * u * (1 + log2 m) * sqrt(sum t_i**2)``.  The inputs were
    rounded to ``dtype`` before the reference saw them, so that rounding is
    no error.  For float16/bfloat16 storage (float32 accumulation) one ulp
    of the storage dtype per term, all in one direction, exceeds it by
    orders of magnitude; for float32 and float64 from m of a few thousand
    on (tests/test_tolerances.py plants both)."""
    t = np.asarray(terms, dtype=np.float64)
    m = t.size // int(np.prod([s for i, s in enumerate(t.shape) if i not in reduce_axes]))
    return 4.0 * acc_unit_roundoff(dtype) * (1.0 + np.log2(max(m, 1))) \
        * np.sqrt((t * t).sum(axis=reduce_axes))


def assert_sum_close(actual, expected, terms, reduce_axes, dtype, name="sum", extra=0.0):
    """``actual`` (per-channel sums) within :func:`sum_tolerance` of
    ``expected``, plus ``extra`` (per channel: error from outside the sum,
    such as factors computed before it multiplies them); the report names
    the worst channel and its bound."""
    a = np.asarray(to_numpy(actual), dtype=np.float64)
    e = np.asarray(to_numpy(expected), dtype=np.float64)
    tol = sum_tolerance(terms, reduce_axes, dtype).reshape(e.shape) + extra
    err = np.abs(a - e)
    bad = ~(err <= tol)
    if bad.any():
        i = int(np.argmax(np.where(bad, err / np.maximum(tol, 1e-300), -np.inf)))
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.size} sums differ beyond the bound for "
            f"{np.dtype(dtype).name} data; worst at {i}: got {a.flat[i]!r}, expected "
            f"{e.flat[i]!r}, error {err.flat[i]:.3g} > bound {tol.flat[i]:.3g}")


def assert_rounded_close(actual, expected, dtype, slack, name="value"):
    """Elementwise: ``actual`` (in storage ``dtype``) within half an ulp of
    ``expected`` in that dtype (the final rounding) plus ``slack`` (per
    element: what the accumulation dtype's rounding may add before it).  For
    float16 storage the slack is orders of magnitude below half an ulp, so an
    error of one ulp fails."""
    a = np.asarray(to_numpy(actual), dtype=np.float64)
    e = np.asarray(to_numpy(expected), dtype=np.float64)
    assert a.shape == e.shape, f"{name}: shape {a.shape} != expected {e.shape}"
    with np.errstate(over="ignore", invalid="ignore"):
        # the ulp above |e|: at a power of two it is the wider of the two
        half_ulp = 0.5 * np.spacing(np.abs(e).astype(dtype)).astype(np.float64)
        tol = half_ulp + slack
        err = np.abs(a - e)
        bad = ~(err <= tol) & ~((a == e) | (np.isnan(a) & np.isnan(e)))
    if bad.any():
        i = int(np.argmax(np.where(bad, err / np.maximum(tol, 1e-300), -np.inf)))
        k = tuple(int(j) for j in np.unravel_index(i, a.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.size} elements differ beyond half an ulp of "
            f"{np.dtype(dtype).name} plus the accumulation slack; worst at {k}: got "
            f"{a.flat[i]!r}, expected {e.flat[i]!r}, error {err.flat[i]:.3g} > bound "
            f"{tol.flat[i]:.3g}")


def _channel_layout(x, axis, mean=None, var=None):
    """``x`` in float64, its reduction axes (all but the channel ``axis``),
    the per-channel broadcast shape, the values per channel ``m``, and the
    per-channel mean and (biased) variance: the batch's, or the given ones
    (an eval forward's running statistics)."""
    x = np.asarray(to_numpy(x), dtype=np.float64)
    axis = axis % x.ndim
    red = tuple(i for i in range(x.ndim) if i != axis)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    m = x.size // x.shape[axis]
    mean = x.mean(axis=red, keepdims=True) if mean is None else np.reshape(mean, shape)
    var = x.var(axis=red, keepdims=True) if var is None else np.reshape(var, shape)
    return x, red, shape, m, mean, var


def _abs_param(v, shape, ndim, default):
    """``|v|`` broadcastable against the data: a 1-D vector is per channel
    (reshaped to ``shape``), an array with the data's ``ndim`` is used as it
    is (per element: layer norm's weight along a row); None is ``default``."""
    if v is None:
        return default
    v = np.abs(np.asarray(to_numpy(v), dtype=np.float64))
    return v if v.ndim == ndim else v.reshape(shape)


def bn_output_slack(x, weight, bias, axis, dtype, mean=None, var=None, eps=1e-5):
    """Slack of :func:`assert_rounded_close` for batch norm's ``y``:
    ``4 u (1 + log2 m) (|w| (|x| + mean|x|) / sigma + |b|)`` with the
    accumulation dtype's unit roundoff ``u``: the centring, the scaling and
    the statistics (a mean of m values errs by about u (1 + log2 m) mean|x|)
    each round a few times.  ``weight`` / ``bias``: per channel, or arrays
    of x's ndim (see :func:`_abs_param`)."""
    x, red, shape, m, mean, var = _channel_layout(x, axis, mean, var)
    w = _abs_param(weight, shape, x.ndim, 1.0)
    b = _abs_param(bias, shape, x.ndim, 0.0)
    mean_abs = np.abs(x).mean(axis=red, keepdims=True) + np.abs(mean)
    scale = w * (np.abs(x) + mean_abs) / np.sqrt(var + eps) + b
    return 4.0 * acc_unit_roundoff(dtype) * (1.0 + np.log2(m)) * scale


def bn_dx_slack(x, dy, weight, axis, dtype, training, mean=None, var=None, eps=1e-5):
    """Slack of :func:`assert_rounded_close` for batch norm's ``dx``.  With
    batch statistics ``dx = w / sigma (dy - mean(dy) - xhat mean(dy xhat))``,
    whose terms cancel: ``4 u (1 + log2 m) |w| / sigma (|dy| + mean|dy| +
    (|xhat| + 1) mean(|dy| (|xhat| + 1)))``; with fixed statistics
    ``dx = dy w / sigma``: ``4 u |w| / sigma |dy|``."""
    x, red, shape, m, mean, var = _channel_layout(x, axis, mean, var)
    dy = np.abs(np.asarray(to_numpy(dy), dtype=np.float64))
    a = _abs_param(weight, shape, x.ndim, 1.0) / np.sqrt(var + eps)
    u = acc_unit_roundoff(dtype)
    if not training:
        return 4.0 * u * a * dy
    xhat1 = np.abs((x - mean) / np.sqrt(var + eps)) + 1.0
    terms = dy + dy.mean(axis=red, keepdims=True) + xhat1 * (dy * xhat1).mean(axis=red,
                                                                            keepdims=True)
    return 4.0 * u * (1.0 + np.log2(m)) * a * terms


def bn_sum_terms(x, dy, axis, eps=1e-5, mean=None, var=None):
    """Summands of batch norm's dbias (dy) and dweight (dy * xhat) in
    float64 with the batch statistics (or the given per-channel ``mean`` /
    ``var``: an eval forward's running statistics), as magnitudes for
    :func:`sum_tolerance`; each dweight term gets ``|dy|`` on top for the
    rounding of the saved mean and 1/sigma (a relative error of a few u in
    ``xhat``, on the scale of 1 after the centring)."""
    x, red, _, _, mean, var = _channel_layout(x, axis, mean, var)
    dy = np.asarray(to_numpy(dy), dtype=np.float64)
    xhat = (x - mean) / np.sqrt(var + eps)
    return red, dy, np.abs(dy) * (np.abs(xhat) + 1.0)


def renorm_output_slack(x, weight, bias, axis, dtype, r, d, running_mean, running_std,
                        eps=1e-5):
    """Slack of :func:`assert_rounded_close` for batch renorm's training
    ``y = (w r) xhat + (w d + b)``: batch norm's with weight ``|w r|`` and bias
    ``|w| (|d| + (mean|x| + |mu|) / sigma) + |b|``, whose middle term is
    the rounding of ``d = (mu_B - mu) / sigma`` (``mu_B`` and the
    subtraction; ``mu`` / ``sigma`` the moving statistics before the step),
    which ``|w r| mean|x| / sigma_B`` does not cover where ``r`` is clipped."""
    x64, red, shape, _, _, _ = _channel_layout(x, axis)
    w = _abs_param(weight, shape, x64.ndim, 1.0)
    mu, sigma = np.reshape(running_mean, shape), np.reshape(running_std, shape)
    d_err = (np.abs(x64).mean(axis=red, keepdims=True) + np.abs(mu)) / sigma
    return bn_output_slack(x64, w * np.abs(np.reshape(r, shape)),
                           w * (np.abs(np.reshape(d, shape)) + d_err)
                           + _abs_param(bias, shape, x64.ndim, 0.0), axis, dtype, eps=eps)


def ln_output_slack(x, n, weight, bias, dtype, eps=1e-5):
    """Slack of :func:`assert_rounded_close` for layer norm's ``y`` over
    rows of the last ``n`` values: batch norm's on the ``(rows, n)`` view,
    each row a channel, the weight and bias per element of the row."""
    x2 = np.asarray(to_numpy(x), dtype=np.float64).reshape(-1, n)
    w, b = (None if v is None else np.reshape(to_numpy(v), (1, n)) for v in (weight, bias))
    return bn_output_slack(x2, w, b, 0, dtype, eps=eps).reshape(np.shape(x))


def ln_dx_slack(x, dy, n, weight, dtype, eps=1e-5):
    """Slack of :func:`assert_rounded_close` for layer norm's ``dx = rstd (g
    - mean(g) - xhat mean(g xhat))`` with ``g = weight * dy`` (the weight
    inside the row's sums): batch norm's training slack on the ``(rows, n)``
    view with ``g`` for ``dy`` and no weight."""
    x2 = np.asarray(to_numpy(x), dtype=np.float64).reshape(-1, n)
    g = np.asarray(to_numpy(dy), dtype=np.float64).reshape(-1, n)
    if weight is not None:
        g = g * np.reshape(to_numpy(weight), (1, n))
    return bn_dx_slack(x2, g, None, 0, dtype, True, eps=eps).reshape(np.shape(x))


# ------------------------------------------------------ block schedules ----
# emu seeds besides the default schedule (seed None); 1 and 2 start the
# blocks in other orders than the default and than each other
# (test_emu_runtime.py)
SCHEDULE_SEEDS = (1, 2)


def assert_same_under_schedules(run, seeds=SCHEDULE_SEEDS):
    """Call ``run()`` (which returns a tuple of arrays, or None entries) under
    emu's default block schedule and under each seed of ``seeds``; every
    result must equal the default schedule's bit for bit (the kernels merge
    partials in a fixed order).  Returns the default schedule's results."""
    from gpubn import emu

    with emu.options(seed=None):
        first = run()
    for seed in seeds:
        with emu.options(seed=seed):
            other = run()
        assert len(other) == len(first)
        for i, (a, b) in enumerate(zip(first, other)):
            if a is None or b is None:
                assert a is None and b is None, f"result {i}: None under one schedule only"
                continue
            a, b = np.asarray(a), np.asarray(b)
            assert a.dtype == b.dtype and a.shape == b.shape, f"result {i}"
            if a.tobytes() != b.tobytes():    # bit patterns: -0.0 and NaN payloads count
                bytes_a, bytes_b = (np.ascontiguousarray(t).reshape(-1).view(np.uint8)
                                    .reshape(t.size, t.itemsize) for t in (a, b))
                k = int(np.flatnonzero((bytes_a != bytes_b).any(axis=1))[0])
                raise AssertionError(
                    f"result {i} depends on the block schedule: seed {seed} gives "
                    f"{b.reshape(-1)[k]!r} at flat index {k}, the default schedule "
                    f"{a.reshape(-1)[k]!r}")
    return first


# ---------------------------------------------------------------- oracle ----
def numeric_gradients(loss, args, h=1e-6):
    """Central finite differences of the scalar ``loss(*args)`` with respect to
    each float64 NumPy array in ``args`` (one gradient array per argument)."""
    grads = []
    for k, arr in enumerate(args):
        num = np.empty_like(arr)
        for i in np.ndindex(arr.shape):
            plus, minus = arr.copy(), arr.copy()
            plus[i] += h
            minus[i] -= h
            num[i] = (loss(*args[:k], plus, *args[k + 1:])
                      - loss(*args[:k], minus, *args[k + 1:])) / (2 * h)
        grads.append(num)
    return grads


def torch_or_skip():
    """The PyTorch CPU oracle, or skip the test saying why."""
    return pytest.importorskip("torch", reason="PyTorch (the test oracle) is not installed; "
                                               "install the 'test' extra")


@pytest.fixture
def torch():
    return torch_or_skip()


def torch_batch_norm(x, weight=None, bias=None, running_mean=None, running_var=None,
                     training=True, momentum=0.1, eps=1e-5, axis=1, dy=None):
    """Reference forward (and backward when ``dy`` is given) with PyTorch in
    float64.  Returns a dict with y, dx, dweight, dbias, running_mean,
    running_var as NumPy float64 arrays (None where not applicable)."""
    torch = torch_or_skip()
    x = np.moveaxis(to_numpy(x).astype(np.float64), axis, 1)
    xt = torch.tensor(x, requires_grad=dy is not None)
    wt = None if weight is None else torch.tensor(
        to_numpy(weight).astype(np.float64), requires_grad=dy is not None)
    bt = None if bias is None else torch.tensor(
        to_numpy(bias).astype(np.float64), requires_grad=dy is not None)
    rm = None if running_mean is None else torch.tensor(to_numpy(running_mean).astype(np.float64))
    rv = None if running_var is None else torch.tensor(to_numpy(running_var).astype(np.float64))
    y = torch.nn.functional.batch_norm(xt, rm, rv, wt, bt, training, momentum if momentum is not None else 0.0, eps)
    out = {"y": np.moveaxis(y.detach().numpy(), 1, axis), "dx": None, "dweight": None,
           "dbias": None,
           "running_mean": None if rm is None else rm.numpy(),
           "running_var": None if rv is None else rv.numpy()}
    if dy is not None:
        y.backward(torch.tensor(np.moveaxis(to_numpy(dy).astype(np.float64), axis, 1)))
        out["dx"] = np.moveaxis(xt.grad.numpy(), 1, axis)
        out["dweight"] = None if wt is None else wt.grad.numpy()
        out["dbias"] = None if bt is None else bt.grad.numpy()
    return out

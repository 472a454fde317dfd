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


def _unavailable(name):
    try:
        get_backend(name)
    except RuntimeError as exc:
        return str(exc)
    return None


@pytest.fixture(params=BACKENDS)
def backend(request):
    """A gpubn backend object; skips with the backend's own reason when it
    cannot run on this machine."""
    reason = _unavailable(request.param)
    if reason is not None:
        pytest.skip(reason)
    return get_backend(request.param)


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

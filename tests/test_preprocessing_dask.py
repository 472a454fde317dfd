"""The scalers on Dask arrays, under a local cluster of two worker processes.

Every statistic is checked against scikit-learn (or NumPy float64) on the
computed array, and ``StandardScaler`` against dask-ml's where it is
installed.  One cluster serves the module; each test runs under an alarm so a
hung scheduler fails the test instead of the suite.
"""

from __future__ import annotations

import math
import os
import pickle
import signal
import subprocess
import sys

import numpy as np
import pytest

dask = pytest.importorskip("dask", reason="Dask is not installed; install the 'test' extra")
da = pytest.importorskip("dask.array", reason="dask[array] is not installed")
distributed = pytest.importorskip("distributed", reason="distributed is not installed")

from gpubn.preprocessing import MinMaxScaler, StandardScaler, Whitening  # noqa: E402

from test_preprocessing import DT_TOL, _data, assert_same_state, fitted_state  # noqa: E402

TIMEOUT_S = 60
EPS = np.finfo(np.float64).eps

# row chunks: uneven, one chunk, and one with an empty block in the middle
CHUNKS = {"uneven": (7, 13, 1, 29, 50), "single": (100,), "empty": (30, 0, 70)}


def _alarm(seconds):
    def fail(signum, frame):
        raise TimeoutError(f"Dask test took longer than {seconds} s")
    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    return previous


@pytest.fixture(scope="module", autouse=True)
def client():
    """Two worker processes, one thread each; the default scheduler of every
    test in this module."""
    previous = _alarm(TIMEOUT_S)
    try:
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=None, memory_limit="2GiB")
        c = distributed.Client(cluster, timeout=TIMEOUT_S)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    try:
        yield c
    finally:
        c.close(timeout=TIMEOUT_S)
        cluster.close(timeout=TIMEOUT_S)


@pytest.fixture(autouse=True)
def _deadline():
    previous = _alarm(TIMEOUT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _sklearn():
    return pytest.importorskip("sklearn.preprocessing",
                               reason="scikit-learn (the oracle) is not installed")


def _dask(X, rows):
    return da.from_array(X, chunks=(rows, X.shape[1]))


# -- StandardScaler -------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("chunks", list(CHUNKS))
def test_standard_scaler_matches_sklearn(chunks, dtype):
    skp = _sklearn()
    Xn = _data(n=100, seed=3).astype(dtype)
    X = _dask(Xn, CHUNKS[chunks])
    s = StandardScaler().fit(X)
    ref = skp.StandardScaler().fit(Xn.astype(np.float64))
    for name in ("mean_", "var_", "scale_"):
        got = getattr(s, name)
        assert type(got) is np.ndarray and got.dtype == np.float64, name
        # 100 values per feature: a few eps of rounding in either computation
        np.testing.assert_allclose(got, getattr(ref, name), rtol=1e-12, atol=1e-12,
                                   err_msg=name)
    assert s.n_samples_seen_ == 100 and s.n_features_in_ == 5

    Z = s.transform(X)
    assert isinstance(Z, da.Array) and Z.dtype == dtype and type(Z._meta) is np.ndarray
    assert Z.chunks == X.chunks
    Zc = Z.compute()
    assert Zc.dtype == dtype
    np.testing.assert_allclose(Zc, ref.transform(Xn.astype(np.float64)), **DT_TOL[dtype])
    back = s.inverse_transform(Z)
    assert isinstance(back, da.Array) and back.dtype == dtype
    np.testing.assert_allclose(back.compute(), Xn, rtol=4 * DT_TOL[dtype]["rtol"],
                               atol=20 * DT_TOL[dtype]["atol"])
    # fit_transform on a Dask array is lazy too
    assert isinstance(StandardScaler().fit_transform(X), da.Array)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_offset_stays_stable(dtype):
    """1e6 + N(0, 1): the per-block Welford triples merged by Chan's formula
    keep the variance to a relative error of about n * eps * kappa, kappa =
    |mean| / std = 1e6; E[x^2] - E[x]^2 would lose about eps * kappa^2."""
    n = 2000
    rng = np.random.default_rng(7)
    Xn = (1e6 + rng.normal(size=(n, 3))).astype(dtype)
    X = _dask(Xn, (300, 1, 699, 0, 1000))
    s = StandardScaler().fit(X)
    # exact reference: x - 1e6 is exact in float64 (Sterbenz), so is the mean
    # shift; the variance of the shifted data is well conditioned.
    D = Xn.astype(np.float64) - 1e6
    ref_var = D.var(axis=0)
    ref_mean = 1e6 + np.array([math.fsum(D[:, j]) / n for j in range(3)])
    rtol_var = n * EPS * 1e6
    np.testing.assert_allclose(s.mean_, ref_mean, rtol=0, atol=16 * EPS * 1e6)
    np.testing.assert_allclose(s.var_, ref_var, rtol=rtol_var)
    # the bound separates the stable merge from the textbook formula
    X64 = Xn.astype(np.float64)
    naive = (X64 * X64).mean(axis=0) - X64.mean(axis=0) ** 2
    assert np.any(np.abs(naive - ref_var) > rtol_var * ref_var)


def test_matches_dask_ml():
    dml = pytest.importorskip("dask_ml.preprocessing",
                              reason="dask-ml (an optional second oracle) is not installed")
    Xn = _data(n=100, seed=4)
    X = _dask(Xn, CHUNKS["uneven"])
    ours, theirs = StandardScaler().fit(X), dml.StandardScaler().fit(X)
    np.testing.assert_allclose(ours.mean_, np.asarray(theirs.mean_), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours.var_, np.asarray(theirs.var_), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ours.transform(X).compute(),
                               np.asarray(theirs.transform(X)), rtol=1e-12, atol=1e-12)


def test_fit_does_not_depend_on_the_scheduler():
    Xn = _data(n=100, seed=5) + 1e3
    X = _dask(Xn, CHUNKS["uneven"])
    on_cluster = StandardScaler().fit(X)
    with dask.config.set(scheduler="synchronous"):
        in_process = StandardScaler().fit(X)
    for name in ("mean_", "var_", "scale_"):
        np.testing.assert_array_equal(getattr(on_cluster, name), getattr(in_process, name))


def test_blocks_use_the_requested_backend():
    """An explicit backend reaches every block: emu runs the CUDA statistics
    kernel on each one (in this process, to compile it once)."""
    Xn = _data(n=40, seed=6)
    X = _dask(Xn, (15, 25))
    try:
        with dask.config.set(scheduler="synchronous"):
            s = StandardScaler(backend="emu").fit(X)
    except RuntimeError as exc:  # emu needs a C++ compiler
        pytest.skip(str(exc))
    np.testing.assert_allclose(s.mean_, Xn.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.var_, Xn.var(axis=0), rtol=1e-12, atol=1e-12)


# -- MinMaxScaler and Whitening ---------------------------------------------------

@pytest.mark.parametrize("chunks", list(CHUNKS))
def test_minmax_scaler_matches_sklearn(chunks):
    skp = _sklearn()
    Xn = _data(n=100, seed=8).astype(np.float32)
    X = _dask(Xn, CHUNKS[chunks])
    s = MinMaxScaler((-1.0, 2.0), clip=True).fit(X)
    ref = skp.MinMaxScaler((-1.0, 2.0), clip=True).fit(Xn.astype(np.float64))
    for name in ("data_min_", "data_max_", "data_range_", "scale_", "min_"):
        np.testing.assert_allclose(getattr(s, name), getattr(ref, name), rtol=1e-15,
                                   err_msg=name)
    new = _dask(Xn[:30] * 1.5, (10, 20))
    Z = s.transform(new)
    assert isinstance(Z, da.Array) and Z.dtype == np.float32
    np.testing.assert_allclose(Z.compute(), ref.transform(Xn[:30].astype(np.float64) * 1.5),
                               **DT_TOL[np.float32])
    np.testing.assert_allclose(s.inverse_transform(s.transform(X)).compute(), Xn,
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("method", ["pca", "zca"])
def test_whitening_matches_the_in_memory_fit(method):
    Xn = _data(n=100, seed=9)
    Xn[:, 2] += np.random.default_rng(1).normal(size=100)   # full rank
    Xn[:, 1] += 0.5 * Xn[:, 0]                               # correlated
    X = _dask(Xn, CHUNKS["empty"])
    w = Whitening(method, eps=0.0).fit(X)
    ref = Whitening(method, eps=0.0).fit(Xn)
    assert type(w.covariance_) is np.ndarray
    np.testing.assert_allclose(w.covariance_, np.cov(Xn, rowvar=False, bias=True),
                               rtol=1e-12, atol=1e-12)
    for name in ("mean_", "eigenvalues_", "whitening_matrix_", "coloring_matrix_"):
        np.testing.assert_allclose(getattr(w, name), getattr(ref, name), rtol=1e-10,
                                   atol=1e-12, err_msg=name)
    Z = w.transform(X)
    assert isinstance(Z, da.Array)
    Zc = Z.compute()
    np.testing.assert_allclose(np.cov(Zc, rowvar=False, bias=True), np.eye(5), atol=1e-10)
    np.testing.assert_allclose(w.inverse_transform(Z).compute(), Xn, rtol=1e-10, atol=1e-10)


# -- partial_fit over Dask slices, pickling -------------------------------------

@pytest.mark.parametrize("make", [StandardScaler, MinMaxScaler])
def test_partial_fit_streams_dask_slices(make):
    skp = _sklearn()
    Xn = _data(n=100, seed=10) + 50.0
    X = _dask(Xn, (20, 20, 20, 20, 20))
    streamed, ref = make(), getattr(skp, make.__name__)()
    for start in (0, 35, 61):
        stop = {0: 35, 35: 61, 61: 100}[start]
        streamed.partial_fit(X[start:stop])
        ref.partial_fit(Xn[start:stop])
    streamed.partial_fit(Xn[:7])                 # an in-memory chunk joins the stream
    ref.partial_fit(Xn[:7])
    assert streamed.n_samples_seen_ == 107
    names = ("mean_", "var_", "scale_") if make is StandardScaler else \
        ("data_min_", "data_max_", "scale_", "min_")
    for name in names:
        np.testing.assert_allclose(getattr(streamed, name), getattr(ref, name),
                                   rtol=1e-12, atol=1e-12, err_msg=name)


def test_lazy_transform_keeps_the_fit_it_was_built_with():
    Xn = _data(n=60, seed=14)
    X = _dask(Xn, (25, 35))
    s = StandardScaler().fit(X)
    expected = s.transform(Xn)
    Z = s.transform(X)
    s.fit(Xn * 3.0 + 1.0)                        # refit before Z is computed
    np.testing.assert_array_equal(Z.compute(), expected)


def test_fitted_estimators_pickle():
    Xn = _data(n=60, seed=11)
    X = _dask(Xn, (25, 35))
    for est in (StandardScaler().fit(X), MinMaxScaler().fit(X), Whitening().fit(X)):
        clone = pickle.loads(pickle.dumps(est))
        np.testing.assert_array_equal(clone.transform(Xn), est.transform(Xn))
        np.testing.assert_array_equal(clone.transform(X).compute(), est.transform(Xn))


# -- bad input: rejected before any work is scheduled ----------------------------

def _never_computed(block):
    raise AssertionError("a block was computed before the input was validated")


def _poisoned(X, rows):
    """A Dask array with X's metadata whose blocks fail if ever computed."""
    return _dask(X, rows).map_blocks(_never_computed, dtype=X.dtype)


def _nan_chunks(Xn):
    X = _poisoned(Xn, (20, 20))
    return X[X[:, 0] > 0]


BAD = [
    ("features split", lambda Xn: da.from_array(Xn, chunks=(20, 2)), ValueError,
     r"X is chunked along features \(blocks of \(2, 2, 1\) features\).*rechunk\(\{1: -1\}\)"),
    ("integers", lambda Xn: _poisoned(Xn.astype(np.int64), (20, 20)), TypeError,
     r"floating-point Dask array, got dtype int64.*astype"),
    ("unknown chunks", _nan_chunks, ValueError,
     r"unknown chunk sizes.*compute_chunk_sizes\(\)"),
    ("1-D", lambda Xn: _poisoned(Xn, (20, 20))[:, 0], ValueError, r"must be 2-D"),
    ("no rows", lambda Xn: _poisoned(Xn, (20, 20))[:0], ValueError, r"0 samples"),
    ("wrong width", lambda Xn: _poisoned(Xn, (20, 20))[:, :4], ValueError,
     r"X has 4 features, but the estimator was fitted with 5"),
]


@pytest.mark.parametrize("make", [StandardScaler, MinMaxScaler, Whitening])
@pytest.mark.parametrize("case,bad,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_dask_input_fails_before_scheduling(make, case, bad, exc, match):
    Xn = _data(n=40, seed=12)
    est = make().fit(Xn)
    before = fitted_state(est)
    X = bad(Xn)
    if case == "wrong width":
        calls = [est.partial_fit, est.transform, est.inverse_transform] \
            if hasattr(est, "partial_fit") else [est.transform, est.inverse_transform]
    else:
        calls = [est.fit] + ([est.partial_fit] if hasattr(est, "partial_fit") else [])
        if case != "no rows":
            calls += [est.transform, est.inverse_transform]
    for call in calls:
        with pytest.raises(exc, match=match):
            call(X)
    assert_same_state(est, before)


def test_whitening_needs_two_rows_before_scheduling():
    Xn = _data(n=40, seed=12)
    with pytest.raises(ValueError, match="at least 2 samples.*got 1"):
        Whitening().fit(_poisoned(Xn, (20, 20))[:1])


def _with_nan_in_block_2(block, block_info=None):
    if block_info[0]["chunk-location"][0] == 2:
        block = block.copy()
        block[1, 3] = np.nan
    return block


def _as_list_in_block_1(block, block_info=None):
    return block.tolist() if block_info[0]["chunk-location"][0] == 1 else block


@pytest.mark.parametrize("make", [StandardScaler, MinMaxScaler, Whitening])
def test_bad_blocks_are_named_and_leave_the_fit_untouched(make):
    Xn = _data(n=40, seed=13)
    est = make().fit(Xn)
    before = fitted_state(est)
    X = _dask(Xn, (10, 10, 10, 10))
    with pytest.raises(ValueError, match=r"block 2 of X contains NaN or infinity"):
        est.fit(X.map_blocks(_with_nan_in_block_2, dtype=X.dtype))
    with pytest.raises(TypeError, match=r"block 1 of X is a builtins.list, but X's meta is a "
                                        r"numpy.ndarray; mixed array types"):
        est.fit(X.map_blocks(_as_list_in_block_1, dtype=X.dtype))
    assert_same_state(est, before)


def test_importing_gpubn_needs_no_dask():
    code = ("import sys; sys.modules['dask'] = None\n"
            "import numpy as np, gpubn\n"
            "from gpubn.preprocessing import StandardScaler\n"
            "s = StandardScaler().fit(np.arange(6.0).reshape(3, 2))\n"
            "assert s.mean_.tolist() == [2.0, 3.0]\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=TIMEOUT_S, cwd=root)
    out = subprocess.run([sys.executable, "-c", "import gpubn, sys; print('dask' in sys.modules)"],
                         check=True, timeout=TIMEOUT_S, capture_output=True, text=True,
                         cwd=root)
    assert out.stdout.strip() == "False"


def test_readme_cluster_example_runs():
    """The README's Dask example (a ``py`` block, which the README test does
    not run) works as written, in a process of its own."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("## Dask: fitting scalers out of core", 1)[1]
    code = section.split("```py\n", 1)[1].split("```", 1)[0]
    out = subprocess.run([sys.executable, "-c", code], check=True, timeout=TIMEOUT_S,
                         capture_output=True, text=True, cwd=root).stdout.splitlines()
    assert out[0].startswith("ndarray [5.")
    assert out[2] == "400000"

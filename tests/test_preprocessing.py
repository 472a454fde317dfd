"""StandardScaler, MinMaxScaler and Whitening on every backend.

Statistics are checked against NumPy float64 computations written here (no
optional dependency) and against scikit-learn's estimators of the same names
when scikit-learn is installed.
"""

from __future__ import annotations

import numpy as np
import pytest

from gpubn.preprocessing import MinMaxScaler, NotFittedError, StandardScaler, Whitening

from conftest import to_backend, to_numpy


def _sklearn():
    return pytest.importorskip(
        "sklearn.preprocessing",
        reason="scikit-learn (the oracle for the scalers) is not installed; install the "
               "'test' extra")


def _data(n=60, f=5, seed=0, offset=3.0):
    """Features of different scales and offsets; feature 2 is constant."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, f)) * np.linspace(0.5, 4.0, f) + offset * np.arange(f)
    X[:, 2] = 7.25
    return X


def fitted_state(est):
    """Copy of an estimator's attributes, tuples of arrays flattened to
    ``name[i]``, for :func:`assert_same_state`."""
    state = {}
    for k, v in vars(est).items():
        for i, item in enumerate(v) if isinstance(v, tuple) else [(None, v)]:
            key = k if i is None else f"{k}[{i}]"
            state[key] = np.copy(item) if isinstance(item, np.ndarray) else item
    return state


def assert_same_state(est, before):
    after = fitted_state(est)
    assert after.keys() == before.keys()
    for k, v in after.items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


DT_TOL = {np.float32: dict(rtol=2e-6, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-12)}


# -- StandardScaler -------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_standard_scaler_statistics_and_transform(backend, dtype):
    X = _data().astype(dtype)
    s = StandardScaler(backend=backend.name).fit(to_backend(backend, X))
    X64 = X.astype(np.float64)
    mean, var = X64.mean(axis=0), X64.var(axis=0)
    for name in ("mean_", "var_", "scale_"):
        assert getattr(s, name).dtype == np.float64, name
    np.testing.assert_allclose(to_numpy(s.mean_), mean, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(to_numpy(s.var_), var, rtol=1e-12, atol=1e-13)
    expected_scale = np.sqrt(var)
    expected_scale[2] = 1.0                      # the constant feature stays unscaled
    np.testing.assert_allclose(to_numpy(s.scale_), expected_scale, rtol=1e-12)
    assert s.n_samples_seen_ == 60 and s.n_features_in_ == 5

    Xb = to_backend(backend, X)
    Z = s.transform(Xb)
    assert backend.owns(Z) and Z.dtype == dtype and Z.shape == X.shape
    np.testing.assert_array_equal(to_numpy(Xb), X)            # the input is not modified
    Zn = to_numpy(Z).astype(np.float64)
    np.testing.assert_allclose(Zn, (X64 - mean) / expected_scale, **DT_TOL[dtype])
    assert np.all(Zn[:, 2] == 0.0)
    back = s.inverse_transform(Z)
    assert back.dtype == dtype
    np.testing.assert_allclose(to_numpy(back), X, rtol=4 * DT_TOL[dtype]["rtol"],
                               atol=20 * DT_TOL[dtype]["atol"])


@pytest.mark.parametrize("with_mean,with_std", [(True, True), (False, True), (True, False),
                                                (False, False)])
def test_standard_scaler_matches_sklearn(backend, with_mean, with_std):
    skp = _sklearn()
    X = _data(n=40, seed=1)
    ours = StandardScaler(with_mean=with_mean, with_std=with_std, backend=backend.name)
    ref = skp.StandardScaler(with_mean=with_mean, with_std=with_std)
    Z = ours.fit_transform(to_backend(backend, X))
    np.testing.assert_allclose(to_numpy(Z), ref.fit_transform(X), rtol=1e-12, atol=1e-12)
    for name in ("mean_", "var_", "scale_"):
        expected = getattr(ref, name)
        if expected is None:
            assert getattr(ours, name) is None, name
        else:
            np.testing.assert_allclose(to_numpy(getattr(ours, name)), expected,
                                       rtol=1e-12, atol=1e-13, err_msg=name)
    assert ours.n_samples_seen_ == ref.n_samples_seen_
    np.testing.assert_allclose(to_numpy(ours.inverse_transform(Z)),
                               ref.inverse_transform(ref.transform(X)), rtol=1e-12, atol=1e-12)


def test_standard_scaler_near_constant_feature_matches_sklearn():
    # variance at round-off level (not exactly zero) is treated as constant
    skp = _sklearn()
    X = np.full((30, 3), 0.1) + np.arange(3)
    X[:, 0] += np.random.default_rng(3).normal(size=30)
    X[::2, 1] = np.nextafter(X[::2, 1], 2.0)                  # one ulp of jitter
    ours, ref = StandardScaler().fit(X), skp.StandardScaler().fit(X)
    np.testing.assert_array_equal(ours.scale_[1:], [1.0, 1.0])
    np.testing.assert_allclose(ours.scale_, ref.scale_, rtol=1e-12)


def test_partial_fit_streams_chunks_like_one_fit(backend):
    X = _data(n=97, seed=2)
    full = StandardScaler(backend=backend.name).fit(to_backend(backend, X))
    s = StandardScaler(backend=backend.name)
    for chunk in np.split(X, [1, 2, 30, 31, 80]):       # sizes 1, 1, 28, 1, 49, 17
        s.partial_fit(to_backend(backend, chunk))
    assert s.n_samples_seen_ == 97
    np.testing.assert_allclose(to_numpy(s.mean_), to_numpy(full.mean_), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(to_numpy(s.var_), to_numpy(full.var_), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(s.var_), X.var(axis=0), rtol=1e-12, atol=1e-14)


def test_partial_fit_matches_sklearn_partial_fit():
    skp = _sklearn()
    X = _data(n=50, seed=4)
    ours, ref = StandardScaler(), skp.StandardScaler()
    for chunk in np.array_split(X, 6):
        ours.partial_fit(chunk)
        ref.partial_fit(chunk)
        np.testing.assert_allclose(ours.mean_, ref.mean_, rtol=1e-13)
        np.testing.assert_allclose(ours.var_, ref.var_, rtol=1e-12)
        assert ours.n_samples_seen_ == ref.n_samples_seen_


def test_partial_fit_is_stable_far_from_zero():
    # 1e9 + N(0, 1): E[x^2] - E[x]^2 would lose every digit of the variance
    rng = np.random.default_rng(5)
    noise = rng.normal(size=(4000, 3))
    s = StandardScaler()
    for chunk in np.array_split(1e9 + noise, 7):
        s.partial_fit(chunk)
    np.testing.assert_allclose(s.var_, noise.var(axis=0), rtol=1e-6)


def test_float32_data_gets_float64_statistics():
    # float32 accumulation of 1e4 + N(0,1) would be off by ~1e-7 relative;
    # the float64 statistics of the float32 values are exact to ~1e-15
    rng = np.random.default_rng(6)
    X = (1e4 + rng.normal(size=(20000, 2))).astype(np.float32)
    s = StandardScaler()
    for chunk in np.array_split(X, 3):
        s.partial_fit(chunk)
    X64 = X.astype(np.float64)
    assert s.mean_.dtype == np.float64
    np.testing.assert_allclose(s.mean_, X64.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(s.var_, X64.var(axis=0), rtol=1e-10)


def test_integer_data_is_converted_to_float64():
    X = np.arange(12, dtype=np.int32).reshape(6, 2)
    Z = StandardScaler().fit_transform(X)
    assert Z.dtype == np.float64
    np.testing.assert_allclose(Z.mean(axis=0), 0.0, atol=1e-15)
    np.testing.assert_allclose(Z.std(axis=0), 1.0, rtol=1e-14)


def test_refit_forgets_previous_data():
    s = StandardScaler()
    s.partial_fit(np.ones((5, 2)) * 100)
    s.fit(np.array([[0.0, 1.0], [2.0, 3.0]]))
    assert s.n_samples_seen_ == 2
    np.testing.assert_allclose(s.mean_, [1.0, 2.0])


# -- MinMaxScaler ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_minmax_scaler_range_and_inverse(backend, dtype):
    X = _data(seed=7).astype(dtype)
    s = MinMaxScaler((-1.0, 2.0), backend=backend.name)
    Z = s.fit_transform(to_backend(backend, X))
    assert backend.owns(Z) and Z.dtype == dtype
    Zn = to_numpy(Z).astype(np.float64)
    X64 = X.astype(np.float64)
    expected = (X64 - X64.min(0)) / np.where(np.ptp(X64, 0) == 0, 1.0, np.ptp(X64, 0)) * 3 - 1
    np.testing.assert_allclose(Zn, expected, **DT_TOL[dtype])
    varying = [0, 1, 3, 4]
    np.testing.assert_allclose(Zn[:, varying].min(0), -1.0, atol=DT_TOL[dtype]["atol"] * 4)
    np.testing.assert_allclose(Zn[:, varying].max(0), 2.0, rtol=DT_TOL[dtype]["rtol"] * 4)
    np.testing.assert_array_equal(Zn[:, 2], -1.0)          # constant feature -> low end
    np.testing.assert_allclose(to_numpy(s.inverse_transform(Z)), X,
                               rtol=8 * DT_TOL[dtype]["rtol"], atol=40 * DT_TOL[dtype]["atol"])


def test_minmax_scaler_matches_sklearn_streaming_and_clip():
    skp = _sklearn()
    X = _data(n=45, seed=8)
    ours = MinMaxScaler((-2.0, 3.0), clip=True)
    ref = skp.MinMaxScaler(feature_range=(-2.0, 3.0), clip=True)
    for chunk in np.array_split(X, 4):
        ours.partial_fit(chunk)
        ref.partial_fit(chunk)
    for name in ("data_min_", "data_max_", "data_range_", "scale_", "min_"):
        np.testing.assert_allclose(getattr(ours, name), getattr(ref, name), rtol=1e-13,
                                   atol=1e-13, err_msg=name)
    assert ours.n_samples_seen_ == ref.n_samples_seen_ == 45
    unseen = X * 1.5 - 4.0                       # partly outside the fitted range: clipped
    np.testing.assert_allclose(ours.transform(unseen), ref.transform(unseen),
                               rtol=1e-12, atol=1e-12)
    Z = ref.transform(X)
    np.testing.assert_allclose(ours.inverse_transform(Z), ref.inverse_transform(Z),
                               rtol=1e-12, atol=1e-12)


# -- Whitening ------------------------------------------------------------------

def _correlated(n=400, f=4, seed=9):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(f, f)) + 2 * np.eye(f)
    return rng.normal(size=(n, f)) @ A + np.arange(1.0, f + 1) * 10


@pytest.mark.parametrize("method", ["pca", "zca"])
def test_whitened_covariance_is_identity(backend, method):
    X = _correlated()
    w = Whitening(method, eps=0.0, backend=backend.name).fit(to_backend(backend, X))
    Z = to_numpy(w.transform(to_backend(backend, X)))
    cov = np.cov(Z, rowvar=False, bias=True)
    np.testing.assert_allclose(cov, np.eye(4), atol=1e-10)
    np.testing.assert_allclose(Z.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(to_numpy(w.inverse_transform(to_backend(backend, Z))), X,
                               rtol=1e-12, atol=1e-10)
    if method == "pca":    # output features are the principal components, largest first
        lam = np.linalg.eigvalsh(np.cov(X, rowvar=False, bias=True))[::-1]
        np.testing.assert_allclose(to_numpy(w.eigenvalues_), lam, rtol=1e-10)
    else:                  # the ZCA matrix is symmetric
        W = to_numpy(w.whitening_matrix_)
        np.testing.assert_allclose(W, W.T, atol=1e-12)


def test_whitening_eps_shrinks_the_eigenvalues():
    X = _correlated(seed=10)
    eps = 0.5
    w = Whitening("zca", eps=eps).fit(X)
    lam = np.linalg.eigvalsh(np.cov(X, rowvar=False, bias=True))
    got = np.linalg.eigvalsh(np.cov(w.transform(X), rowvar=False, bias=True))
    np.testing.assert_allclose(got, lam / (lam + eps), rtol=1e-10)


def test_zca_stays_closest_to_the_input():
    X = _correlated(seed=11)
    Xc = X - X.mean(axis=0)
    zca = Whitening("zca", eps=0.0).fit_transform(X)
    pca = Whitening("pca", eps=0.0).fit_transform(X)
    d_zca = np.mean((zca - Xc) ** 2)
    assert d_zca < np.mean((pca - Xc) ** 2)
    # every other whitening is an orthogonal rotation of ZCA's output
    rng = np.random.default_rng(12)
    for _ in range(20):
        Q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
        other = zca @ Q.T
        np.testing.assert_allclose(np.cov(other, rowvar=False, bias=True), np.eye(4),
                                   atol=1e-10)
        assert d_zca < np.mean((other - Xc) ** 2)


def test_pca_whitening_matches_sklearn_pca():
    skd = pytest.importorskip("sklearn.decomposition",
                              reason="scikit-learn is not installed")
    X = _correlated(n=300, seed=13)
    n = len(X)
    ours = Whitening("pca", eps=0.0).fit(X)
    ref = skd.PCA(whiten=True, svd_solver="full").fit(X)
    comps = ours.components_
    signs = np.sign(np.sum(comps * ref.components_, axis=1))
    np.testing.assert_allclose(comps * signs[:, None], ref.components_, atol=1e-10)
    # scikit-learn divides by the unbiased variances, we by the biased ones
    np.testing.assert_allclose(ours.transform(X) * signs,
                               ref.transform(X) * np.sqrt(n / (n - 1)), atol=1e-9)


def test_whitening_singular_covariance():
    X = _correlated(seed=14)
    X = np.column_stack([X, X[:, 0] + X[:, 1]])          # rank 4 of 5
    with pytest.raises(ValueError, match=r"singular \(rank 4 of 5\).*eps > 0"):
        Whitening("zca", eps=0.0).fit(X)
    w = Whitening("pca", eps=1e-3).fit(X)
    Z = w.transform(X)
    assert np.isfinite(Z).all()
    cov = np.cov(Z, rowvar=False, bias=True)
    np.testing.assert_allclose(np.diag(cov)[:4], 1.0, atol=1e-3)
    assert abs(cov[4, 4]) < 1e-9                          # the null direction stays 0


# -- bad input --------------------------------------------------------------------

@pytest.mark.parametrize("make", [StandardScaler, MinMaxScaler, lambda: Whitening("pca")])
@pytest.mark.parametrize("X,exc,match", [
    (np.ones(5), ValueError, r"X must be 2-D \(n_samples, n_features\), got shape \(5,\)"),
    (np.array([["a", "b"], ["c", "d"]]), TypeError, "X must hold real numbers, got dtype <U1"),
    (np.ones((3, 2)) + 1j, TypeError, "X must hold real numbers, got dtype complex128"),
    (np.array([[1.0, np.nan], [2.0, 3.0]]), ValueError, "X contains NaN or infinity"),
    (np.zeros((0, 3)), ValueError, "X has 0 samples"),
])
def test_bad_data_is_rejected(make, X, exc, match):
    with pytest.raises(exc, match=match):
        make().fit(X)


@pytest.mark.parametrize("make", [StandardScaler, MinMaxScaler])
def test_bad_chunk_leaves_the_fit_untouched(make):
    X = _data(n=20)
    s = make().fit(X)
    before = fitted_state(s)
    with pytest.raises(ValueError, match="X has 4 features, but the estimator was fitted with 5"):
        s.partial_fit(np.ones((3, 4)))
    with pytest.raises(ValueError, match="contains NaN"):
        s.partial_fit(np.full((3, 5), np.inf))
    with pytest.raises(ValueError, match="X has 4 features"):
        s.transform(np.ones((3, 4)))
    assert_same_state(s, before)


@pytest.mark.parametrize("est", [StandardScaler(), MinMaxScaler(), Whitening()])
def test_transform_before_fit(est):
    with pytest.raises(NotFittedError, match="is not fitted yet: call fit"):
        est.transform(np.ones((2, 2)))
    assert issubclass(NotFittedError, ValueError)


@pytest.mark.parametrize("make,exc,match", [
    (lambda: StandardScaler(with_mean="yes"), TypeError, "with_mean must be True or False"),
    (lambda: StandardScaler(with_std=None), TypeError, "with_std must be True or False"),
    (lambda: StandardScaler(backend="tpu"), ValueError, "backend must be one of"),
    (lambda: MinMaxScaler((1, 0)), ValueError, "feature_range must be finite with min < max"),
    (lambda: MinMaxScaler((0, np.inf)), ValueError, "feature_range must be finite"),
    (lambda: MinMaxScaler(5), TypeError, "feature_range must be a pair of numbers"),
    (lambda: Whitening("cholesky"), ValueError, "method must be 'pca' or 'zca', got 'cholesky'"),
    (lambda: Whitening(eps=-1.0), ValueError, "eps must be finite and >= 0, got -1.0"),
    (lambda: Whitening(eps="small"), TypeError, "eps must be a real number"),
])
def test_bad_options(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_whitening_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2 samples"):
        Whitening().fit(np.ones((1, 3)))

"""Data-set standardization on the batch-norm kernels.

Batch norm standardizes each channel of a layer's input; the same two kernels
(per-channel Welford statistics, then ``(x - mean) * invstd * weight + bias``)
standardize the features of a data matrix ``X`` of shape
``(n_samples, n_features)``, which is the canonical array
``X.reshape(n, F, 1)``.

* :class:`StandardScaler` -- zero mean, unit variance per feature; streams over
  chunks with :meth:`~StandardScaler.partial_fit`, merging the per-chunk
  Welford triples with Chan's formula in float64.
* :class:`MinMaxScaler` -- maps each feature's observed range onto
  ``feature_range``.
* :class:`Whitening` -- PCA or ZCA whitening from the eigendecomposition of
  the covariance matrix.

The scalers match scikit-learn's estimators of the same names.  NumPy arrays
run on the ``numpy`` backend (or ``emu`` on request) and CuPy arrays on the
``cuda`` backend; fitted attributes live in the array module of the data the
estimator was fitted on.  Statistics are kept in float64 whatever the data's
floating dtype; transformed arrays keep the input's dtype (float32 or float64;
other numeric dtypes are converted to float64, as scikit-learn does).
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np

from ._validation import acc_dtype
from .backends import get_backend

__all__ = ["StandardScaler", "MinMaxScaler", "Whitening", "NotFittedError"]


class NotFittedError(ValueError, AttributeError):
    """Raised when ``transform`` is called before the estimator was fitted."""


# -- helpers ------------------------------------------------------------------


def _is_cupy(a) -> bool:
    return type(a).__module__.split(".")[0] == "cupy"


def _move(a, xp):
    """Array ``a`` in array module ``xp`` (a no-op when it already is)."""
    if a is None:
        return None
    if xp is np:
        return a.get() if _is_cupy(a) else np.asarray(a)
    return xp.asarray(a)


def _prepare(X, backend, name, n_features=None, who="X"):
    """Validate a data matrix and pick its backend.

    Returns ``(backend, X)`` with ``X`` a C-contiguous 2-D float32/float64
    array of the backend's array module.  Raises before anything is changed.
    """
    if not _is_cupy(X) and not isinstance(X, np.ndarray):
        try:
            X = np.asarray(X)
        except Exception as exc:  # ragged lists and the like
            raise TypeError(f"{name}: {who} must be a 2-D array, could not convert "
                            f"{type(X).__name__}: {exc}") from exc
    be = get_backend(backend, X)
    if not be.owns(X):
        raise TypeError(
            f"{name}: backend {be.name!r} takes {be.xp.__name__} arrays, "
            f"got {type(X).__module__}.{type(X).__name__} for {who}")
    xp = be.xp
    if X.ndim != 2:
        raise ValueError(f"{name}: {who} must be 2-D (n_samples, n_features), "
                         f"got shape {tuple(X.shape)}")
    kind = X.dtype.kind
    if kind not in "fiub":
        raise TypeError(f"{name}: {who} must hold real numbers, got dtype {X.dtype}")
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float64)
    if X.shape[0] == 0:
        raise ValueError(f"{name}: {who} has 0 samples; at least 1 is required")
    if X.shape[1] == 0:
        raise ValueError(f"{name}: {who} has 0 features; at least 1 is required")
    if n_features is not None and X.shape[1] != n_features:
        raise ValueError(f"{name}: {who} has {X.shape[1]} features, but the estimator "
                         f"was fitted with {n_features}")
    if not bool(xp.isfinite(X).all()):
        raise ValueError(f"{name}: {who} contains NaN or infinity")
    return be, xp.ascontiguousarray(X)


def _check_bool(value, name, what):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: {what} must be True or False, got {value!r}")
    return bool(value)


def _apply(be, X, mean, invstd, bias):
    """``(X - mean) * invstd + bias`` per feature through the backend kernel.
    ``mean``/``invstd``/``bias`` are float64 vectors of the backend's module."""
    n, f = X.shape
    acc = acc_dtype(X.dtype)          # the backend interface's per-channel dtype
    xp = be.xp
    y3 = be.bn_apply(X.reshape(n, f, 1),
                     xp.ascontiguousarray(mean, dtype=acc),
                     xp.ascontiguousarray(invstd, dtype=acc),
                     None,
                     xp.ascontiguousarray(bias, dtype=acc))
    return y3.reshape(n, f)


def _chunk_stats(be, X):
    """float64 Welford triple ``(count, mean, m2)`` per feature of ``X``."""
    n, f = X.shape
    # float64 statistics whatever the data dtype: the backend accumulates in
    # float64 for float64 data.
    X64 = be.xp.ascontiguousarray(X, dtype=np.float64)
    st = be.bn_stats(X64.reshape(n, f, 1))
    return int(st.count), be.xp.asarray(st.mean, dtype=np.float64), \
        be.xp.asarray(st.m2, dtype=np.float64)


def _chan_merge(na, mean_a, m2a, nb, mean_b, m2b):
    """Chan, Golub & LeVeque's pairwise update of Welford triples."""
    n = na + nb
    delta = mean_b - mean_a
    mean = mean_a + delta * (nb / n)
    m2 = m2a + m2b + delta * delta * (na * nb / n)
    return n, mean, m2


class _Fitted:
    _fit_attrs: tuple = ()

    def _check_fitted(self, what):
        if getattr(self, "n_samples_seen_", None) is None:
            raise NotFittedError(
                f"{type(self).__name__} is not fitted yet: call fit{' or partial_fit' * hasattr(self, 'partial_fit')} "
                f"before {what}")

    def _reset(self):
        for attr in self._fit_attrs:
            if hasattr(self, attr):
                delattr(self, attr)

    def fit_transform(self, X):
        """``fit(X)`` followed by ``transform(X)``."""
        return self.fit(X).transform(X)


# -- StandardScaler -------------------------------------------------------------

class StandardScaler(_Fitted):
    """Standardize features to zero mean and unit variance.

    ``z = (x - mean_) / scale_`` with ``scale_ = sqrt(var_)`` (the biased,
    population variance).  Features whose variance is indistinguishable from
    zero in floating point keep ``scale_ = 1``, as in scikit-learn.

    Parameters
    ----------
    with_mean : bool
        Subtract the mean (``mean_`` is still computed when ``with_std``).
    with_std : bool
        Divide by the standard deviation.
    backend : str or None
        ``"numpy"``, ``"emu"``, ``"cuda"`` or None (by array type).

    Attributes
    ----------
    mean_, var_, scale_ : float64 arrays of shape (n_features,) or None
        ``mean_`` is None when neither option is set; ``var_`` and ``scale_``
        are None without ``with_std``.
    n_samples_seen_ : int
    n_features_in_ : int
    """

    _fit_attrs = ("mean_", "var_", "scale_", "n_samples_seen_", "n_features_in_", "_m2")

    def __init__(self, *, with_mean=True, with_std=True, backend=None):
        self.with_mean = _check_bool(with_mean, "StandardScaler", "with_mean")
        self.with_std = _check_bool(with_std, "StandardScaler", "with_std")
        if backend is not None:
            get_backend(backend)  # an unknown or unavailable backend fails here
        self.backend = backend

    def __repr__(self):
        return (f"StandardScaler(with_mean={self.with_mean}, with_std={self.with_std}, "
                f"backend={self.backend!r})")

    def fit(self, X):
        """Compute the per-feature mean and variance of ``X``; returns self."""
        be, X = _prepare(X, self.backend, "StandardScaler.fit")
        self._reset()
        self._update(be, X)
        return self

    def partial_fit(self, X):
        """Merge the statistics of one more chunk of samples (Chan's formula);
        returns self.  The chunks may be of any size, down to a single row."""
        first = getattr(self, "n_samples_seen_", None) is None
        be, X = _prepare(X, self.backend, "StandardScaler.partial_fit",
                         None if first else self.n_features_in_)
        self._update(be, X)
        return self

    def _update(self, be, X):
        xp = be.xp
        n, f = X.shape
        if not (self.with_mean or self.with_std):
            # nothing to estimate beyond the count, as scikit-learn does
            self.mean_ = self.var_ = self.scale_ = None
            self.n_samples_seen_ = (getattr(self, "n_samples_seen_", None) or 0) + n
            self.n_features_in_ = f
            return
        cnt, mean, m2 = _chunk_stats(be, X)
        if getattr(self, "n_samples_seen_", None):
            cnt, mean, m2 = _chan_merge(self.n_samples_seen_, _move(self.mean_, xp),
                                        _move(self._m2, xp), cnt, mean, m2)
        var = m2 / cnt
        self.n_samples_seen_ = cnt
        self.n_features_in_ = f
        self.mean_ = mean
        self._m2 = m2
        if self.with_std:
            # near-constant features: the variance is within the error bound
            # of the two-pass algorithm (Chan, Golub & LeVeque), as in
            # scikit-learn; they are left unscaled.
            eps = np.finfo(np.float64).eps
            constant = var <= cnt * eps * var + (cnt * mean * eps) ** 2
            self.var_ = var
            self.scale_ = xp.where(constant, 1.0, xp.sqrt(var))
        else:
            self.var_ = self.scale_ = None

    def _params(self, xp, f):
        mean = _move(self.mean_, xp) if self.with_mean else xp.zeros(f)
        scale = _move(self.scale_, xp) if self.with_std else xp.ones(f)
        return mean, scale

    def transform(self, X):
        """Standardized copy of ``X`` (same dtype for float32/float64)."""
        self._check_fitted("transform")
        be, X = _prepare(X, self.backend, "StandardScaler.transform", self.n_features_in_)
        mean, scale = self._params(be.xp, X.shape[1])
        return _apply(be, X, mean, 1.0 / scale, be.xp.zeros_like(mean))

    def inverse_transform(self, X):
        """Undo :meth:`transform`: ``x = z * scale_ + mean_``."""
        self._check_fitted("inverse_transform")
        be, X = _prepare(X, self.backend, "StandardScaler.inverse_transform",
                         self.n_features_in_)
        mean, scale = self._params(be.xp, X.shape[1])
        return _apply(be, X, be.xp.zeros_like(mean), scale, mean)


# -- MinMaxScaler ---------------------------------------------------------------

class MinMaxScaler(_Fitted):
    """Map each feature's observed ``[min, max]`` onto ``feature_range``.

    ``z = (x - data_min_) * scale_ + feature_range[0]`` with
    ``scale_ = (hi - lo) / data_range_``; a constant feature (range 0) gets
    ``scale_ = hi - lo``, as in scikit-learn.  ``clip=True`` clips transformed
    values of unseen data to ``feature_range``.

    Attributes: ``data_min_``, ``data_max_``, ``data_range_``, ``scale_``,
    ``min_`` (float64, shape (n_features,); ``z = x * scale_ + min_``),
    ``n_samples_seen_``, ``n_features_in_``.
    """

    _fit_attrs = ("data_min_", "data_max_", "data_range_", "scale_", "min_",
                  "n_samples_seen_", "n_features_in_")

    def __init__(self, feature_range=(0.0, 1.0), *, clip=False, backend=None):
        try:
            lo, hi = feature_range
            lo, hi = float(lo), float(hi)
        except (TypeError, ValueError) as exc:
            raise TypeError("MinMaxScaler: feature_range must be a pair of numbers "
                            f"(min, max), got {feature_range!r}") from exc
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
            raise ValueError("MinMaxScaler: feature_range must be finite with "
                             f"min < max, got {feature_range!r}")
        self.feature_range = (lo, hi)
        self.clip = _check_bool(clip, "MinMaxScaler", "clip")
        if backend is not None:
            get_backend(backend)
        self.backend = backend

    def __repr__(self):
        return (f"MinMaxScaler(feature_range={self.feature_range}, clip={self.clip}, "
                f"backend={self.backend!r})")

    def fit(self, X):
        """Record the per-feature minimum and maximum of ``X``; returns self."""
        be, X = _prepare(X, self.backend, "MinMaxScaler.fit")
        self._reset()
        self._update(be, X)
        return self

    def partial_fit(self, X):
        """Widen the recorded ranges with one more chunk; returns self."""
        first = getattr(self, "n_samples_seen_", None) is None
        be, X = _prepare(X, self.backend, "MinMaxScaler.partial_fit",
                         None if first else self.n_features_in_)
        self._update(be, X)
        return self

    def _update(self, be, X):
        xp = be.xp
        dmin = X.min(axis=0).astype(np.float64)
        dmax = X.max(axis=0).astype(np.float64)
        n = X.shape[0]
        if getattr(self, "n_samples_seen_", None):
            dmin = xp.minimum(_move(self.data_min_, xp), dmin)
            dmax = xp.maximum(_move(self.data_max_, xp), dmax)
            n += self.n_samples_seen_
        lo, hi = self.feature_range
        rng = dmax - dmin
        # the same near-zero test scikit-learn applies to a range
        safe = xp.where(rng < 10 * np.finfo(np.float64).eps, 1.0, rng)
        self.scale_ = (hi - lo) / safe
        self.min_ = lo - dmin * self.scale_
        self.data_min_, self.data_max_, self.data_range_ = dmin, dmax, rng
        self.n_samples_seen_ = n
        self.n_features_in_ = X.shape[1]

    def transform(self, X):
        """Scaled copy of ``X``."""
        self._check_fitted("transform")
        be, X = _prepare(X, self.backend, "MinMaxScaler.transform", self.n_features_in_)
        xp = be.xp
        lo, hi = self.feature_range
        scale = _move(self.scale_, xp)
        y = _apply(be, X, _move(self.data_min_, xp), scale, xp.full_like(scale, lo))
        if self.clip:
            y = xp.clip(y, lo, hi)
        return y

    def inverse_transform(self, X):
        """Undo :meth:`transform`: ``x = (z - feature_range[0]) / scale_ + data_min_``."""
        self._check_fitted("inverse_transform")
        be, X = _prepare(X, self.backend, "MinMaxScaler.inverse_transform",
                         self.n_features_in_)
        xp = be.xp
        lo, _ = self.feature_range
        scale = _move(self.scale_, xp)
        return _apply(be, X, xp.full_like(scale, lo), 1.0 / scale, _move(self.data_min_, xp))


# -- Whitening ------------------------------------------------------------------

class Whitening(_Fitted):
    """Decorrelate features and give them unit variance.

    With the covariance ``Sigma = U diag(lam) U^T`` of the training data
    (biased, like :class:`StandardScaler`'s variance) and
    ``D = diag(1 / sqrt(lam + eps))``:

    * ``method="pca"``: ``W = D U^T`` -- rotate onto the principal axes
      (largest variance first), then rescale.  Output feature ``k`` is the
      ``k``-th principal component.
    * ``method="zca"``: ``W = U D U^T`` -- the symmetric whitening matrix;
      of all whitening transforms it changes the data least (mean squared
      distance between input and output).

    ``transform`` computes ``(x - mean_) @ W.T``; with ``eps=0`` the
    covariance of the transformed training data is the identity, with
    ``eps > 0`` its eigenvalues are ``lam / (lam + eps)``.  ``eps=0``
    needs a covariance of full rank.

    Attributes: ``mean_`` (F,), ``covariance_`` (F, F), ``eigenvalues_`` (F,),
    descending, ``components_`` (F, F; row ``k`` is the ``k``-th principal
    axis, sign fixed so its largest entry is positive), ``whitening_matrix_``
    ``W``, ``coloring_matrix_`` (its inverse), all float64;
    ``n_samples_seen_``, ``n_features_in_``.
    """

    _fit_attrs = ("mean_", "covariance_", "eigenvalues_", "components_",
                  "whitening_matrix_", "coloring_matrix_", "n_samples_seen_",
                  "n_features_in_")

    def __init__(self, method="zca", *, eps=1e-5, backend=None):
        if method not in ("pca", "zca"):
            raise ValueError(f"Whitening: method must be 'pca' or 'zca', got {method!r}")
        if isinstance(eps, bool) or not isinstance(eps, Real):
            raise TypeError(f"Whitening: eps must be a real number, got {eps!r}")
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"Whitening: eps must be finite and >= 0, got {eps!r}")
        self.method = method
        self.eps = float(eps)
        if backend is not None:
            get_backend(backend)
        self.backend = backend

    def __repr__(self):
        return f"Whitening(method={self.method!r}, eps={self.eps}, backend={self.backend!r})"

    def fit(self, X):
        """Estimate mean and covariance of ``X`` and build the whitening
        matrix; returns self."""
        be, X = _prepare(X, self.backend, "Whitening.fit")
        xp = be.xp
        n, f = X.shape
        if n < 2:
            raise ValueError("Whitening.fit: X needs at least 2 samples to estimate a "
                             f"covariance, got {n}")
        cnt, mean, _ = _chunk_stats(be, X)
        Xc = xp.asarray(X, dtype=np.float64) - mean
        cov = (Xc.T @ Xc) / cnt
        cov = 0.5 * (cov + cov.T)
        lam, U = xp.linalg.eigh(cov)
        lam, U = lam[::-1], U[:, ::-1]  # descending
        # eigh may return tiny negative eigenvalues for a singular covariance
        lam = xp.maximum(lam, 0.0)
        tiny = float(lam[0]) * f * np.finfo(np.float64).eps
        if self.eps == 0.0 and float(lam[-1]) <= tiny:
            rank = int((lam > tiny).sum())
            raise ValueError(
                f"Whitening.fit: the covariance is singular (rank {rank} of {f}); "
                "pass eps > 0 to whiten it")
        # deterministic signs: each axis' largest-magnitude entry is positive
        idx = xp.argmax(xp.abs(U), axis=0)
        signs = xp.sign(U[idx, xp.arange(f)])
        U = U * signs
        d = 1.0 / xp.sqrt(lam + self.eps)
        comps = U.T
        if self.method == "pca":
            W = d[:, None] * comps
            Winv = U * (1.0 / d)
        else:
            W = (U * d) @ comps
            Winv = (U * (1.0 / d)) @ comps
        self.mean_, self.covariance_, self.eigenvalues_ = mean, cov, lam
        self.components_ = comps
        self.whitening_matrix_, self.coloring_matrix_ = W, Winv
        self.n_samples_seen_, self.n_features_in_ = cnt, f
        return self

    def transform(self, X):
        """Whitened copy of ``X``: ``(X - mean_) @ whitening_matrix_.T``."""
        self._check_fitted("transform")
        be, X = _prepare(X, self.backend, "Whitening.transform", self.n_features_in_)
        xp = be.xp
        mean = _move(self.mean_, xp)
        Xc = _apply(be, X, mean, xp.ones_like(mean), xp.zeros_like(mean))
        return Xc @ _move(self.whitening_matrix_, xp).T.astype(X.dtype)

    def inverse_transform(self, X):
        """Undo :meth:`transform`: ``Z @ coloring_matrix_.T + mean_``."""
        self._check_fitted("inverse_transform")
        be, X = _prepare(X, self.backend, "Whitening.inverse_transform",
                         self.n_features_in_)
        xp = be.xp
        mean = _move(self.mean_, xp)
        Y = xp.ascontiguousarray(X @ _move(self.coloring_matrix_, xp).T.astype(X.dtype))
        return _apply(be, Y, xp.zeros_like(mean), xp.ones_like(mean), mean)

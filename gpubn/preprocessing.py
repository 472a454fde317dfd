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

Dask arrays (``dask.array.Array`` of NumPy or CuPy blocks, whole rows per
block) are fitted out of core in one pass: each block is reduced on its
worker by the backend of its array type to a partial result -- ``(count,
mean, M2)`` per feature, ``(count, min, max)``, or ``(count, mean,
co-moment matrix)`` -- and the partials are merged with Chan's formulas in a
binary tree of fixed shape, so the fit does not depend on the scheduler and
only per-feature vectors (and, for whitening, one ``F x F`` matrix per block)
leave the workers.  ``transform`` and ``inverse_transform`` of a Dask array
are lazy (``map_blocks``).  Dask itself is imported only by the caller.
"""

from __future__ import annotations

import copy
import math
import sys
from numbers import Real

import numpy as np

from ._validation import acc_dtype
from .backends import get_backend, is_cupy_array

__all__ = ["StandardScaler", "MinMaxScaler", "Whitening", "NotFittedError"]


class NotFittedError(ValueError, AttributeError):
    """Raised when ``transform`` is called before the estimator was fitted."""


# -- helpers ------------------------------------------------------------------


def _move(a, xp):
    """Array ``a`` in array module ``xp`` (a no-op when it already is)."""
    if a is None:
        return None
    if xp is np:
        return a.get() if is_cupy_array(a) else np.asarray(a)
    return xp.asarray(a)


def _owner(backend, X, name, who):
    """The backend for array ``X`` (``backend`` or the automatic choice),
    which must take ``X``'s array type."""
    be = get_backend(backend, X)
    if not be.owns(X):
        raise TypeError(
            f"{name}: backend {be.name!r} takes {be.xp.__name__} arrays, "
            f"got {type(X).__module__}.{type(X).__name__} for {who}")
    return be


def _check_shape(shape, name, n_features, who):
    """A data matrix is 2-D, not empty, with the fitted number of features."""
    if len(shape) != 2:
        raise ValueError(f"{name}: {who} must be 2-D (n_samples, n_features), "
                         f"got shape {tuple(shape)}")
    if shape[0] == 0:
        raise ValueError(f"{name}: {who} has 0 samples; at least 1 is required")
    if shape[1] == 0:
        raise ValueError(f"{name}: {who} has 0 features; at least 1 is required")
    if n_features is not None and shape[1] != n_features:
        raise ValueError(f"{name}: {who} has {shape[1]} features, but the estimator "
                         f"was fitted with {n_features}")


def _prepare(X, backend, name, n_features=None, who="X"):
    """Validate a data matrix and pick its backend.

    Returns ``(backend, X)`` with ``X`` a C-contiguous 2-D float32/float64
    array of the backend's array module.  Raises before anything is changed.
    """
    if not is_cupy_array(X) and not isinstance(X, np.ndarray):
        try:
            X = np.asarray(X)
        except Exception as exc:  # ragged lists and the like
            raise TypeError(f"{name}: {who} must be a 2-D array, could not convert "
                            f"{type(X).__name__}: {exc}") from exc
    be = _owner(backend, X, name, who)
    xp = be.xp
    if X.dtype.kind not in "fiub":
        raise TypeError(f"{name}: {who} must hold real numbers, got dtype {X.dtype}")
    _check_shape(X.shape, name, n_features, who)
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float64)
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


def _module_of(a):
    """The array module (numpy or cupy) of array ``a``."""
    return sys.modules["cupy"] if is_cupy_array(a) else np


# -- partial results: one per block of samples, merged with Chan's formulas ----
#
# A partial is a tuple ``(count, a, b)``: a Python int and two float64 arrays of
# the block's array module.  Each estimator reduces a block with one function
# and merges two partials with another; a merge of an empty partial (count 0)
# returns the other one unchanged.


def _moments(be, X):
    """float64 Welford triple ``(count, mean, m2)`` per feature of ``X``."""
    n, f = X.shape
    xp = be.xp
    if n == 0:
        return 0, xp.zeros(f), xp.zeros(f)
    # float64 statistics whatever the data dtype: the backend accumulates in
    # float64 for float64 data.
    X64 = xp.ascontiguousarray(X, dtype=np.float64)
    st = be.bn_stats(X64.reshape(n, f, 1))
    return int(st.count), xp.asarray(st.mean, dtype=np.float64), \
        xp.asarray(st.m2, dtype=np.float64)


def _merge_moments(a, b):
    """Chan, Golub & LeVeque's pairwise update of Welford triples."""
    na, mean_a, m2a = a
    nb, mean_b, m2b = b
    if na == 0 or nb == 0:
        return b if na == 0 else a
    n = na + nb
    delta = mean_b - mean_a
    return n, mean_a + delta * (nb / n), m2a + m2b + delta * delta * (na * nb / n)


def _range(be, X):
    """``(count, min, max)`` per feature of ``X`` (+inf/-inf when empty)."""
    n, f = X.shape
    xp = be.xp
    if n == 0:
        return 0, xp.full(f, np.inf), xp.full(f, -np.inf)
    return n, X.min(axis=0).astype(np.float64), X.max(axis=0).astype(np.float64)


def _merge_range(a, b):
    xp = _module_of(a[1])
    return a[0] + b[0], xp.minimum(a[1], b[1]), xp.maximum(a[2], b[2])


def _comoment(be, X):
    """``(count, mean, C)`` of ``X``: the float64 mean per feature and the
    co-moment matrix ``C = (X - mean).T @ (X - mean)`` (F x F)."""
    n, f = X.shape
    xp = be.xp
    if n == 0:
        return 0, xp.zeros(f), xp.zeros((f, f))
    cnt, mean, _ = _moments(be, X)
    Xc = xp.asarray(X, dtype=np.float64) - mean
    return cnt, mean, Xc.T @ Xc


def _merge_comoment(a, b):
    """Chan's update for co-moment matrices:
    ``C = Ca + Cb + outer(d, d) * na * nb / n`` with ``d = mean_b - mean_a``."""
    na, mean_a, ca = a
    nb, mean_b, cb = b
    if na == 0 or nb == 0:
        return b if na == 0 else a
    n = na + nb
    delta = mean_b - mean_a
    return (n, mean_a + delta * (nb / n),
            ca + cb + (delta[:, None] * delta[None, :]) * (na * nb / n))


def _finite(xp, partial):
    return all(bool(xp.isfinite(v).all()) for v in partial[1:])


# -- Dask: validation before scheduling, one task per block, a fixed tree ------


def _is_dask(X) -> bool:
    """True for a ``dask.array.Array`` (never imports Dask)."""
    mod = sys.modules.get("dask.array")
    return mod is not None and isinstance(X, mod.Array)


def _check_dask(X, name, n_features=None, who="X"):
    """Validate a Dask data matrix from its metadata alone (nothing is
    computed): 2-D, floating point, NumPy or CuPy blocks, known chunk sizes,
    whole rows per block."""
    meta = X._meta
    if not (isinstance(meta, np.ndarray) or is_cupy_array(meta)):
        raise TypeError(f"{name}: {who} must be a Dask array of NumPy or CuPy blocks, "
                        f"its meta is {type(meta).__module__}.{type(meta).__name__}")
    if X.ndim == 2 and X.dtype.kind != "f":
        raise TypeError(f"{name}: {who} must be a floating-point Dask array, got dtype "
                        f"{X.dtype}; convert it with {who}.astype(np.float64)")
    if any(math.isnan(c) for axis in X.chunks for c in axis):
        raise ValueError(f"{name}: {who} has unknown chunk sizes (NaN, e.g. after "
                         f"boolean indexing); call {who}.compute_chunk_sizes() first")
    _check_shape(X.shape, name, n_features, who)
    if len(X.chunks[1]) != 1:
        raise ValueError(f"{name}: {who} is chunked along features (blocks of "
                         f"{X.chunks[1]} features); every block must hold whole rows: "
                         f"use {who}.rechunk({{1: -1}})")


def _reduce_block(reduce, backend, name, on_gpu, index, block):
    """One block's partial result, on the worker that holds the block."""
    if is_cupy_array(block) != on_gpu or not (on_gpu or isinstance(block, np.ndarray)):
        raise TypeError(
            f"{name}: block {index} of X is a {type(block).__module__}."
            f"{type(block).__name__}, but X's meta is a "
            f"{'cupy' if on_gpu else 'numpy'}.ndarray; mixed array types are not supported")
    who = f"block {index} of X"
    be = _owner(backend, block, name, who)
    block = be.xp.ascontiguousarray(block)
    partial = reduce(be, block)
    # NaN and infinity propagate into every partial result, so the data is
    # scanned only when the partial is not finite.
    if block.shape[0] and not _finite(be.xp, partial) and not bool(be.xp.isfinite(block).all()):
        raise ValueError(f"{name}: {who} contains NaN or infinity")
    return partial


def _dask_reduce(X, reduce, merge, backend, name):
    """Reduce every block of the Dask array ``X`` with ``reduce(be, block)``
    and merge the partials pairwise in a binary tree whose shape depends only
    on the number of blocks; returns the root partial, computed."""
    import dask

    on_gpu = is_cupy_array(X._meta)
    task, merge_task = dask.delayed(_reduce_block, pure=True), dask.delayed(merge, pure=True)
    parts = [task(reduce, backend, name, on_gpu, i, block)
             for i, block in enumerate(X.to_delayed().ravel())]
    while len(parts) > 1:
        parts = [merge_task(parts[i], parts[i + 1]) if i + 1 < len(parts) else parts[i]
                 for i in range(0, len(parts), 2)]
    (root,) = dask.compute(parts[0])
    return root


def _transform_block(block, estimator, method, dtype):
    if block.shape[0] == 0:          # an empty block of a Dask array
        return block.astype(dtype)
    return getattr(estimator, method)(block)


class _Fitted:
    """Shared fitting machinery.  A subclass names its block reduction
    ``_reduce(be, X)`` and its merge ``_merge(a, b)``, and turns the merged
    partial into its attributes with ``_finish(partial)``; the partial itself
    is kept in ``_stats`` for ``partial_fit``.  ``fit`` is the same whether
    ``X`` is one array (a single block) or a Dask array of many."""

    def _check_fitted(self, what):
        if getattr(self, "n_samples_seen_", None) is None:
            raise NotFittedError(
                f"{type(self).__name__} is not fitted yet: call fit{' or partial_fit' * hasattr(self, 'partial_fit')} "
                f"before {what}")

    def _reduce_data(self, X, name, n_features=None):
        """The partial result of all of ``X``: a NumPy/CuPy array in one
        call, a Dask array block by block on its workers."""
        if _is_dask(X):
            _check_dask(X, name, n_features)
            self._check_rows(X.shape[0], name)
            return _dask_reduce(X, self._reduce, self._merge, self.backend, name)
        be, X = _prepare(X, self.backend, name, n_features)
        self._check_rows(X.shape[0], name)
        return self._reduce(be, X)

    def _check_rows(self, n, name):
        """Hook: reject a sample count the estimator cannot fit."""

    def _absorb(self, partial, previous=None):
        """Set the attributes from ``partial`` merged with ``previous`` (a
        partial already absorbed, or None); ``_finish`` raises before it
        changes anything."""
        if previous is not None:
            xp = _module_of(partial[1])
            previous = (previous[0],) + tuple(_move(a, xp) for a in previous[1:])
            partial = self._merge(previous, partial)
        self._finish(partial)
        self._stats = partial

    def _fit(self, X):
        self._absorb(self._reduce_data(X, f"{type(self).__name__}.fit"))
        return self

    def _partial_fit(self, X):
        previous = getattr(self, "_stats", None)
        partial = self._reduce_data(X, f"{type(self).__name__}.partial_fit",
                                    None if previous is None else self.n_features_in_)
        self._absorb(partial, previous)
        return self

    def _lazy(self, X, method):
        """``method`` (transform or inverse_transform) of a Dask array: a lazy
        Dask array, each block computed on its worker by a copy of this
        estimator as fitted now (a later fit replaces the attributes, never
        changes them in place, so a shallow copy keeps this fit)."""
        _check_dask(X, f"{type(self).__name__}.{method}", self.n_features_in_)
        dtype = X.dtype if X.dtype in (np.float32, np.float64) else np.dtype(np.float64)
        return X.map_blocks(_transform_block, copy.copy(self), method, dtype, dtype=dtype,
                            meta=X._meta.astype(dtype))

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

    def __init__(self, *, with_mean=True, with_std=True, backend=None):
        self.with_mean = _check_bool(with_mean, "StandardScaler", "with_mean")
        self.with_std = _check_bool(with_std, "StandardScaler", "with_std")
        if backend is not None:
            get_backend(backend)  # an unknown or unavailable backend fails here
        self.backend = backend

    def __repr__(self):
        return (f"StandardScaler(with_mean={self.with_mean}, with_std={self.with_std}, "
                f"backend={self.backend!r})")

    _reduce = staticmethod(_moments)
    _merge = staticmethod(_merge_moments)

    def fit(self, X):
        """Compute the per-feature mean and variance of ``X``; returns self."""
        return self._fit(X)

    def partial_fit(self, X):
        """Merge the statistics of one more chunk of samples (Chan's formula);
        returns self.  The chunks may be of any size, down to a single row,
        and may be Dask arrays (slices of a larger one, for instance)."""
        return self._partial_fit(X)

    def _finish(self, partial):
        cnt, mean, m2 = partial
        xp = _module_of(mean)
        self.n_samples_seen_ = cnt
        self.n_features_in_ = mean.shape[0]
        if not (self.with_mean or self.with_std):
            # nothing to estimate beyond the count, as scikit-learn does
            self.mean_ = self.var_ = self.scale_ = None
            return
        var = m2 / cnt
        self.mean_ = mean
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
        """Standardized copy of ``X`` (same dtype for float32/float64); lazy
        for a Dask array."""
        self._check_fitted("transform")
        if _is_dask(X):
            return self._lazy(X, "transform")
        be, X = _prepare(X, self.backend, "StandardScaler.transform", self.n_features_in_)
        mean, scale = self._params(be.xp, X.shape[1])
        return _apply(be, X, mean, 1.0 / scale, be.xp.zeros_like(mean))

    def inverse_transform(self, X):
        """Undo :meth:`transform`: ``x = z * scale_ + mean_``."""
        self._check_fitted("inverse_transform")
        if _is_dask(X):
            return self._lazy(X, "inverse_transform")
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

    _reduce = staticmethod(_range)
    _merge = staticmethod(_merge_range)

    def fit(self, X):
        """Record the per-feature minimum and maximum of ``X``; returns self."""
        return self._fit(X)

    def partial_fit(self, X):
        """Widen the recorded ranges with one more chunk; returns self."""
        return self._partial_fit(X)

    def _finish(self, partial):
        n, dmin, dmax = partial
        xp = _module_of(dmin)
        lo, hi = self.feature_range
        rng = dmax - dmin
        # the same near-zero test scikit-learn applies to a range
        safe = xp.where(rng < 10 * np.finfo(np.float64).eps, 1.0, rng)
        self.scale_ = (hi - lo) / safe
        self.min_ = lo - dmin * self.scale_
        self.data_min_, self.data_max_, self.data_range_ = dmin, dmax, rng
        self.n_samples_seen_ = n
        self.n_features_in_ = dmin.shape[0]

    def transform(self, X):
        """Scaled copy of ``X``; lazy for a Dask array."""
        self._check_fitted("transform")
        if _is_dask(X):
            return self._lazy(X, "transform")
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
        if _is_dask(X):
            return self._lazy(X, "inverse_transform")
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

    _reduce = staticmethod(_comoment)
    _merge = staticmethod(_merge_comoment)

    def fit(self, X):
        """Estimate mean and covariance of ``X`` and build the whitening
        matrix; returns self."""
        return self._fit(X)

    def _check_rows(self, n, name):
        if n < 2:
            raise ValueError(f"{name}: X needs at least 2 samples to estimate a "
                             f"covariance, got {n}")

    def _finish(self, partial):
        cnt, mean, comoment = partial
        xp = _module_of(mean)
        f = mean.shape[0]
        cov = comoment / cnt
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

    def transform(self, X):
        """Whitened copy of ``X``: ``(X - mean_) @ whitening_matrix_.T``;
        lazy for a Dask array."""
        self._check_fitted("transform")
        if _is_dask(X):
            return self._lazy(X, "transform")
        be, X = _prepare(X, self.backend, "Whitening.transform", self.n_features_in_)
        xp = be.xp
        mean = _move(self.mean_, xp)
        Xc = _apply(be, X, mean, xp.ones_like(mean), xp.zeros_like(mean))
        return Xc @ _move(self.whitening_matrix_, xp).T.astype(X.dtype)

    def inverse_transform(self, X):
        """Undo :meth:`transform`: ``Z @ coloring_matrix_.T + mean_``."""
        self._check_fitted("inverse_transform")
        if _is_dask(X):
            return self._lazy(X, "inverse_transform")
        be, X = _prepare(X, self.backend, "Whitening.inverse_transform",
                         self.n_features_in_)
        xp = be.xp
        mean = _move(self.mean_, xp)
        Y = xp.ascontiguousarray(X @ _move(self.coloring_matrix_, xp).T.astype(X.dtype))
        return _apply(be, Y, xp.zeros_like(mean), xp.ones_like(mean), mean)

"""Stateful layers with PyTorch's semantics and state_dict key names."""

from __future__ import annotations

import numbers

import numpy as np

from . import _validation as V
from .backends import get_backend
from .functional import batch_norm_backward, batch_norm_forward


class Layer:
    """What every layer shares: train/eval mode, ``backward`` through the state
    saved by the last forward, and checked ``load_state_dict``.

    A subclass sets ``backend``, ``training``, ``grad_weight``, ``grad_bias``
    and ``_saved`` and provides ``state_dict()``, ``_functional_backward`` and
    ``_state_shape(key)`` (the shape a state entry must have).
    """

    def train(self, mode: bool = True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def _functional_backward(self, dy, saved):
        raise NotImplementedError

    def backward(self, dy):
        """``dx`` for the last forward; sets ``grad_weight`` / ``grad_bias``."""
        if self._saved is None:
            raise ValueError("backward called before any forward: call the layer on an "
                             "input first")
        dx, dw, db = self._functional_backward(dy, self._saved)
        self.grad_weight, self.grad_bias = dw, db
        return dx

    def _state_shape(self, key):
        raise NotImplementedError

    def load_state_dict(self, state, strict: bool = True):
        """Load values (NumPy/CuPy arrays, or anything with ``.numpy()`` such as
        CPU torch tensors) into the existing arrays; everything is checked
        before anything is written."""
        if not hasattr(state, "keys"):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        expected = set(self.state_dict().keys())
        got = set(state.keys())
        if strict and got != expected:
            missing, unexpected = sorted(expected - got), sorted(got - expected)
            raise ValueError(f"state keys do not match: missing {missing}, unexpected {unexpected}")
        xp = self.backend.xp
        new = {}
        for key in expected & got:
            v = state[key]
            if hasattr(v, "detach") and hasattr(v, "numpy"):
                v = v.detach().cpu().numpy()
            v = xp.asarray(v)
            if key == "num_batches_tracked":
                if v.shape != () or v.dtype.kind not in "iu":
                    raise ValueError(f"state['num_batches_tracked'] must be an integer scalar, "
                                     f"got shape {v.shape} dtype {v.dtype}")
                new[key] = int(v)
                continue
            want = tuple(self._state_shape(key))
            if tuple(v.shape) != want:
                raise ValueError(f"state[{key!r}] must have shape {want}, got {tuple(v.shape)}")
            if v.dtype.kind != "f":
                raise TypeError(f"state[{key!r}] must be floating point, got {v.dtype}")
            new[key] = v
        for key, v in new.items():
            if key == "num_batches_tracked":
                self.num_batches_tracked = v
            else:
                getattr(self, key)[...] = v


class BatchNorm(Layer):
    """Batch normalization layer, the counterpart of ``torch.nn.BatchNorm1d/2d/3d``.

    ``bn(x)`` normalizes over every axis of ``x`` but ``axis`` (1 by default:
    NC, NCL, NCHW, NCDHW; -1 for channels-last).  In training mode (the
    default; ``bn.train()``) it uses batch statistics and updates the running
    statistics; in eval mode (``bn.eval()``) it uses the running statistics,
    unless ``track_running_stats=False``, in which case batch statistics are
    always used.  ``bn.backward(dy)`` returns ``dx`` and sets ``grad_weight`` /
    ``grad_bias`` (None when ``affine=False``); after an eval-mode forward the
    statistics are held fixed.

    Parameters live in ``dtype`` (float32 by default) on the backend's array
    module; inputs may be float16, float32 or float64.
    """

    # attribute (and state_dict key) names of the running statistics: the
    # mean, and the spread that starts at 1 (a subclass may track another)
    _running_names = ("running_mean", "running_var")

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, axis=1, dtype="float32", backend=None):
        if (isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral)):
            raise TypeError(f"num_features must be an int, got {type(num_features).__name__}")
        if num_features < 1:
            raise ValueError(f"num_features must be at least 1, got {num_features}")
        self.eps = V.check_eps(eps)
        self.momentum = V.check_momentum(momentum)
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"axis must be an int, got {type(axis).__name__}")
        dt = V.check_param_dtype(dtype)
        self.num_features = int(num_features)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = int(axis)
        self.dtype = dt
        self.backend = get_backend(backend)
        xp = self.backend.xp
        c = self.num_features
        self.weight = xp.ones(c, dtype=dt) if self.affine else None
        self.bias = xp.zeros(c, dtype=dt) if self.affine else None
        if self.track_running_stats:
            self.running_mean = xp.zeros(c, dtype=dt)
            self.running_var = xp.ones(c, dtype=dt)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = None
            self.num_batches_tracked = None
        self.training = True
        self.grad_weight = None
        self.grad_bias = None
        self._saved = None

    # -- mode ------------------------------------------------------------
    def reset_running_stats(self):
        if self.track_running_stats:
            mean_name, spread_name = self._running_names
            getattr(self, mean_name)[...] = 0
            getattr(self, spread_name)[...] = 1
            self.num_batches_tracked = 0

    # -- forward / backward ----------------------------------------------
    def forward(self, x):
        use_batch_stats = self.training or self.running_mean is None
        update = self.training and self.track_running_stats
        y, saved = self._functional_forward(
            x, weight=self.weight, bias=self.bias,
            running_mean=self.running_mean if update or not use_batch_stats else None,
            running_var=self.running_var if update or not use_batch_stats else None,
            training=use_batch_stats, momentum=self.momentum, eps=self.eps,
            axis=self.axis, backend=self.backend,
            num_batches_tracked=self.num_batches_tracked if update else None)
        if update:
            self.num_batches_tracked += 1
        self._saved = saved
        return y

    __call__ = forward

    # hooks: the functional pair a subclass normalizes with (SyncBatchNorm)
    def _functional_forward(self, x, **kwargs):
        return batch_norm_forward(x, **kwargs)

    def _functional_backward(self, dy, saved):
        return batch_norm_backward(dy, saved)

    # -- state -----------------------------------------------------------
    def state_dict(self):
        """Copies of the state under PyTorch's key names."""
        xp = self.backend.xp
        state = {}
        if self.affine:
            state["weight"] = self.weight.copy()
            state["bias"] = self.bias.copy()
        if self.track_running_stats:
            for name in self._running_names:
                state[name] = getattr(self, name).copy()
            state["num_batches_tracked"] = xp.asarray(self.num_batches_tracked, dtype=np.int64)
        return state

    def _state_shape(self, key):
        return (self.num_features,)

    def __repr__(self):
        return (f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
                f"axis={self.axis}, dtype={self.dtype.name}, backend={self.backend.name!r})")


__all__ = ["BatchNorm", "Layer"]

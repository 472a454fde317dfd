"""Stateful layers with PyTorch's semantics and state_dict key names."""

from __future__ import annotations

import numbers

import numpy as np

from . import _validation as V
from .backends import get_backend, is_cupy_array
from .functional import batch_norm_backward, batch_norm_forward


def _on_module(a, xp):
    """``a`` (a NumPy or CuPy array) as an array of module ``xp``."""
    if xp is np:
        return a.get() if is_cupy_array(a) else a
    return xp.asarray(a)


class Layer:
    """What every layer shares: the backend (fixed by ``backend=``, else chosen
    per call from the input like the functional API), train/eval mode,
    ``backward`` through the state saved by the last forward, and checked
    ``load_state_dict``.

    A subclass calls ``_init_backend(backend)``, sets ``training``,
    ``grad_weight``, ``grad_bias`` and ``_saved``, lists its state arrays in
    ``_state_arrays`` and provides ``state_dict()``, ``_functional_backward``
    and ``_state_shape(key)`` (the shape a state entry must have).
    """

    _state_arrays = ("weight", "bias")
    # integer scalars of the state (attribute and state_dict key names)
    _counter_keys = ("num_batches_tracked",)

    def _init_backend(self, backend):
        """``backend`` given: every call runs there.  None: the state starts on
        the default backend's array module and each call picks the backend
        from its input (``GPUBN_BACKEND``, else CuPy input -> ``cuda``, NumPy
        input -> the CPU), moving the state to that array module first."""
        self._backend_fixed = backend is not None
        self.backend = get_backend(backend)

    def _backend_for(self, x):
        """The backend this call runs on (see ``_init_backend``)."""
        if self._backend_fixed:
            return self.backend
        be = get_backend(None, x)
        if be.xp is not self.backend.xp:
            for name in self._state_arrays:
                a = getattr(self, name)
                if a is not None:
                    setattr(self, name, _on_module(a, be.xp))
        self.backend = be
        return be

    def _backend_repr(self) -> str:
        return repr(self.backend.name) if self._backend_fixed else "None"

    def train(self, mode: bool = True):
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def _functional_backward(self, dy, saved):
        raise NotImplementedError

    def backward(self, dy):
        """``dx`` for the last forward (``(dx, dresidual)`` when it added a
        residual); sets ``grad_weight`` / ``grad_bias``."""
        if self._saved is None:
            raise ValueError("backward called before any forward: call the layer on an "
                             "input first")
        dx, dw, db, *dresidual = self._functional_backward(dy, self._saved)
        self.grad_weight, self.grad_bias = dw, db
        return (dx, *dresidual) if dresidual else dx

    def _state_shape(self, key):
        raise NotImplementedError

    def _check_state_value(self, key, value):
        """Raise when ``value`` may not be loaded as ``state[key]`` (a hook)."""

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
            if key in self._counter_keys:
                if v.shape != () or v.dtype.kind not in "iu" or int(v) < 0:
                    raise ValueError(f"state[{key!r}] must be a non-negative integer scalar, "
                                     f"got shape {v.shape} dtype {v.dtype}")
                new[key] = int(v)
                continue
            want = tuple(self._state_shape(key))
            if tuple(v.shape) != want:
                raise ValueError(f"state[{key!r}] must have shape {want}, got {tuple(v.shape)}")
            if v.dtype.kind != "f":
                raise TypeError(f"state[{key!r}] must be floating point, got {v.dtype}")
            self._check_state_value(key, v)
            new[key] = v
        for key, v in new.items():
            if key in self._counter_keys:
                setattr(self, key, v)
            else:
                getattr(self, key)[...] = v


class ChannelNorm(Layer):
    """What the per-channel normalization layers (``BatchNorm``,
    ``BatchRenorm``, ``SyncBatchNorm``) share: the constructor's checks,
    ``weight`` / ``bias`` of ``num_features`` values in ``dtype``, the running
    statistics named by ``_running_names`` (a mean that starts at 0 and a
    spread that starts at 1) with ``num_batches_tracked``, and ``state_dict``
    under those names; with ``guard_running_stats=True`` (and running
    statistics) the count of skipped channel updates, ``skipped_updates``,
    which a subclass's forward adds to with :meth:`_count_skipped`.
    """

    # attribute (and state_dict key) names of the running statistics: the
    # mean, and the spread that starts at 1
    _running_names = ("running_mean", "running_var")

    def __init__(self, num_features, *, eps, momentum, affine, track_running_stats, axis,
                 dtype, backend, guard_running_stats=False):
        guard = V.check_flag(guard_running_stats, "guard_running_stats")
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
        self._init_backend(backend)
        self._state_arrays = ("weight", "bias") + self._running_names
        xp = self.backend.xp
        c = self.num_features
        self.weight = xp.ones(c, dtype=dt) if self.affine else None
        self.bias = xp.zeros(c, dtype=dt) if self.affine else None
        mean_name, spread_name = self._running_names
        if self.track_running_stats:
            setattr(self, mean_name, xp.zeros(c, dtype=dt))
            setattr(self, spread_name, xp.ones(c, dtype=dt))
            self.num_batches_tracked = 0
        else:
            setattr(self, mean_name, None)
            setattr(self, spread_name, None)
            self.num_batches_tracked = None
        self.training = True
        self.grad_weight = None
        self.grad_bias = None
        self._saved = None
        self.guard_running_stats = guard
        self._skipped = None
        if guard and self.track_running_stats:
            # skipped channel updates, counted on the state's array module (no
            # host round trip per step); read through ``skipped_updates``
            self._counter_keys = ("num_batches_tracked", "skipped_updates")
            self._state_arrays = self._state_arrays + ("_skipped",)
            self._skipped = xp.zeros((), dtype=np.int64)

    @property
    def skipped_updates(self):
        """Channel updates of the running statistics the guard skipped so far
        (``guard_running_stats=True``; None without the guard)."""
        return None if self._skipped is None else int(self._skipped)

    @skipped_updates.setter
    def skipped_updates(self, value):
        self._skipped[...] = value

    def _count_skipped(self, skipped):
        """Add a forward's ``saved.skipped`` flags (None: no guard) to the count."""
        if skipped is not None:
            self._skipped += skipped.sum(dtype=np.int64)

    def reset_running_stats(self):
        if self.track_running_stats:
            mean_name, spread_name = self._running_names
            getattr(self, mean_name)[...] = 0
            getattr(self, spread_name)[...] = 1
            self.num_batches_tracked = 0
        if self._skipped is not None:
            self._skipped[...] = 0

    def state_dict(self):
        """Copies of the state under PyTorch's key names, plus
        ``skipped_updates`` when the guard is on."""
        xp = self.backend.xp
        state = {}
        if self.affine:
            state["weight"] = self.weight.copy()
            state["bias"] = self.bias.copy()
        if self.track_running_stats:
            for name in self._running_names:
                state[name] = getattr(self, name).copy()
            state["num_batches_tracked"] = xp.asarray(self.num_batches_tracked, dtype=np.int64)
        if self._skipped is not None:
            state["skipped_updates"] = self._skipped.copy()
        return state

    def _state_shape(self, key):
        return (self.num_features,)


class BatchNorm(ChannelNorm):
    """Batch normalization layer, the counterpart of ``torch.nn.BatchNorm1d/2d/3d``.

    ``bn(x)`` normalizes over every axis of ``x`` but ``axis`` (1 by default:
    NC, NCL, NCHW, NCDHW; -1 for channels-last).  In training mode (the
    default; ``bn.train()``) it uses batch statistics and updates the running
    statistics; in eval mode (``bn.eval()``) it uses the running statistics,
    unless ``track_running_stats=False``, in which case batch statistics are
    always used.  ``bn.backward(dy)`` returns ``dx`` and sets ``grad_weight`` /
    ``grad_bias`` (None when ``affine=False``); after an eval-mode forward the
    statistics are held fixed.

    ``guard_running_stats=True`` keeps a channel's running statistics for a
    step whose batch mean or variance is not finite and counts those channel
    updates in ``skipped_updates``; ``virtual_batch_size=k`` is ghost batch
    norm in training (see ``batch_norm_forward`` for both).

    Parameters live in ``dtype`` (float32 by default); inputs may be float16,
    bfloat16, float32 or float64.  ``backend=None`` (the default) picks the backend per
    call from the input, like ``batch_norm_forward``: CuPy input runs on
    ``cuda``, NumPy input on the CPU, and the state moves to the input's array
    module; a named ``backend`` fixes it.

    The residual block's epilogue runs in the same launches:
    ``BatchNorm(C, activation="relu")`` returns ``relu(bn(x))``, and
    ``bn(x, residual=z)`` adds ``z`` (x's shape and dtype) before the
    activation; ``bn.backward(dy)`` then returns ``(dx, dresidual)``.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, axis=1, dtype="float32", backend=None, *,
                 guard_running_stats=False, virtual_batch_size=None, activation=None):
        V.check_activation(activation)
        if virtual_batch_size is not None:   # a batch of one group checks the value itself
            V.check_virtual_batch_size(virtual_batch_size, (virtual_batch_size,), 1)
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, axis=axis, dtype=dtype,
                         backend=backend, guard_running_stats=guard_running_stats)
        self.virtual_batch_size = virtual_batch_size if virtual_batch_size is None \
            else int(virtual_batch_size)
        self.activation = activation

    def forward(self, x, residual=None):
        backend = self._backend_for(x)
        use_batch_stats = self.training or self.running_mean is None
        update = self.training and self.track_running_stats
        options = {}
        if residual is not None or self.activation is not None:
            options.update(residual=residual, activation=self.activation)
        if self._skipped is not None:
            options["guard_running_stats"] = True
        if self.training and self.virtual_batch_size is not None:
            options["virtual_batch_size"] = self.virtual_batch_size
        y, saved = self._functional_forward(
            x, weight=self.weight, bias=self.bias,
            running_mean=self.running_mean if update or not use_batch_stats else None,
            running_var=self.running_var if update or not use_batch_stats else None,
            training=use_batch_stats, momentum=self.momentum, eps=self.eps,
            axis=self.axis, backend=backend,
            num_batches_tracked=self.num_batches_tracked if update else None, **options)
        if update:
            self.num_batches_tracked += 1
        self._count_skipped(saved.skipped)
        self._saved = saved
        return y

    __call__ = forward

    # hooks: the functional pair a subclass normalizes with (SyncBatchNorm)
    def _functional_forward(self, x, **kwargs):
        return batch_norm_forward(x, **kwargs)

    def _functional_backward(self, dy, saved):
        return batch_norm_backward(dy, saved)

    def __repr__(self):
        return (f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
                f"axis={self.axis}, dtype={self.dtype.name}, backend={self._backend_repr()}"
                + (", guard_running_stats=True" if self.guard_running_stats else "")
                + (f", virtual_batch_size={self.virtual_batch_size}"
                   if self.virtual_batch_size is not None else "")
                + (f", activation={self.activation!r}" if self.activation else "") + ")")


__all__ = ["BatchNorm", "ChannelNorm", "Layer"]

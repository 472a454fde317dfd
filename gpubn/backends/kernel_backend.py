"""The launch sequence of every op, shared by the ``cuda`` and ``emu`` backends.

A kernel backend differs from another only in three things, the hooks a
subclass provides:

* ``_get_function(source, dtype_key, name)``: a compiled kernel callable as
  ``fn(grid, block, args, shared_mem=0)`` (CuPy ``RawModule`` functions and
  ``gpubn.emu.RawModule`` functions both are);
* ``xp``: the array module (CuPy or NumPy);
* ``device_attributes()``: the ``gpubn.launch.DeviceAttributes`` the launch
  configuration is computed from.

(plus two one-liners about arrays: ``_address`` and ``_zeroed_counters``).

Kernel arguments are always explicit NumPy scalars of the exact C type of the
parameter (``long long`` -> ``np.int64``, ``int`` -> ``np.int32``, ``Acc`` ->
``np.float32`` / ``np.float64``); ``None`` is a null pointer.

Ops and launches (see kernels/*.cu):

=====================  ==========================================  ========
op                     kernels                                     launches
=====================  ==========================================  ========
bn_stats               bn_stats_*                                  1
bn_forward_train       bn_stats_* (+ finish), bn_apply_*           2
bn_forward_eval        bn_apply_* (invstd from running_var)        1
bn_apply               bn_apply_*                                  1
bn_backward (train)    bn_backward_reduce_*, bn_backward_dx_*      2
bn_backward (eval)     bn_backward_reduce_* (writes dx as well)    1
=====================  ==========================================  ========
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

import numpy as np

from .. import kernels as catalog
from ..launch import DeviceAttributes, Launch, Tuning, map_launch, reduce_launch
from .base import Backend, ChannelStats

_ACC_DTYPES = {"float": np.dtype(np.float32), "double": np.dtype(np.float64)}


def debug_enabled() -> bool:
    """``GPUBN_DEBUG_KERNELS=1`` turns on kernel resource / launch reports on stderr."""
    return os.environ.get("GPUBN_DEBUG_KERNELS", "") not in ("", "0")


def debug_report(line: str) -> None:
    if debug_enabled():
        print(f"[gpubn] {line}", file=sys.stderr, flush=True)


class KernelBackend(Backend):
    """Backend running kernels/*.cu; subclasses provide the hooks above."""

    def __init__(self, tuning: Optional[Tuning] = None,
                 device_attributes: Optional[DeviceAttributes] = None):
        self.tuning = tuning if tuning is not None else self.default_tuning()
        self._device_override = device_attributes

    # -- hooks ---------------------------------------------------------------
    def default_tuning(self) -> Tuning:
        return Tuning()

    def device_attributes(self) -> DeviceAttributes:
        raise NotImplementedError

    def _get_function(self, source: str, dtype_key: str, name: str):
        raise NotImplementedError

    def _address(self, a) -> int:
        raise NotImplementedError

    def _zeroed_counters(self, n: int):
        """A uint32 array of at least ``n`` zeros (reduction arrival counters;
        kernels leave them zero again)."""
        raise NotImplementedError

    # -- helpers -------------------------------------------------------------
    def _device(self) -> DeviceAttributes:
        return self._device_override or self.device_attributes()

    def _aligned(self, *arrays) -> bool:
        return all(a is None or self._address(a) % catalog.VECTOR_BYTES == 0 for a in arrays)

    def _types(self, x3):
        key = catalog.dtype_name(x3.dtype)
        acc = _ACC_DTYPES[catalog.CXX_TYPES[key][1]]
        return key, acc

    def _check_tensor(self, a, like, name: str):
        if not self.owns(a):
            raise TypeError(f"{name} must be a {self.xp.__name__} array for the {self.name!r} "
                            f"backend, got {type(a).__module__}.{type(a).__name__}")
        if like is not None and (a.shape != like.shape or a.dtype != like.dtype):
            raise ValueError(f"{name} must have shape {like.shape} and dtype {like.dtype}, got "
                             f"{a.shape} {a.dtype}")
        if a.ndim != 3 or not a.flags.c_contiguous:
            raise ValueError(f"{name} must be a C-contiguous (outer, C, inner) array")

    def _check_channel(self, v, channels: int, acc, name: str, optional: bool = True):
        if v is None:
            if optional:
                return
            raise ValueError(f"{name} is required")
        if not self.owns(v):
            raise TypeError(f"{name} must be a {self.xp.__name__} array for the {self.name!r} "
                            f"backend, got {type(v).__module__}.{type(v).__name__}")
        if v.shape != (channels,) or v.dtype != acc or not v.flags.c_contiguous:
            raise ValueError(f"{name} must be a contiguous ({channels},) {acc.name} array, got "
                             f"shape {v.shape} dtype {v.dtype}")

    def _launch(self, cfg: Launch, dtype_key: str, args) -> None:
        spec = catalog.KERNELS[cfg.kernel]
        name = catalog.name_expression(cfg.kernel, dtype_key, cfg.vec)
        fn = self._get_function(spec.source, dtype_key, name)
        debug_report(f"{self.name}: launch {name} grid={cfg.grid} block={cfg.block} "
                     f"splits={cfg.splits}")
        fn(cfg.grid, cfg.block, tuple(args), shared_mem=0)

    def _workspace(self, cfg: Launch):
        if cfg.splits <= 1:
            return None, None
        partials = self.xp.empty(cfg.partial_bytes, dtype=np.uint8)
        return partials, self._zeroed_counters(cfg.counters)

    # -- statistics ----------------------------------------------------------
    def _stats(self, x3, acc, key, mean_out, m2_out, invstd_out, running_mean, running_var,
               momentum, eps):
        outer, channels, inner = x3.shape
        cfg = reduce_launch("stats", x3.shape, key, self._aligned(x3), self._device(),
                            self.tuning)
        partials, counters = self._workspace(cfg)
        a = acc.type
        if cfg.kernel.endswith("nchw"):
            shape_args = (x3, np.int64(outer), np.int32(channels), np.int64(inner))
        else:
            shape_args = (x3, np.int64(outer), np.int32(channels))
        self._launch(cfg, key, shape_args + (
            partials, counters, mean_out, m2_out, invstd_out, running_mean, running_var,
            a(momentum), a(eps)))

    def bn_stats(self, x3) -> ChannelStats:
        self._check_tensor(x3, None, "x")
        key, acc = self._types(x3)
        channels = x3.shape[1]
        mean = self.xp.empty(channels, dtype=acc)
        m2 = self.xp.empty(channels, dtype=acc)
        count = int(x3.shape[0]) * int(x3.shape[2])
        if count == 0:
            mean.fill(np.nan)
            m2.fill(0)
        else:
            self._stats(x3, acc, key, mean, m2, None, None, None, 0.0, 0.0)
        return ChannelStats(count=count, mean=mean, m2=m2)

    # -- forward -------------------------------------------------------------
    def _apply(self, x3, key, acc, mean, spread, weight, bias, mean_out, invstd_out,
               from_var: bool, eps: float):
        outer, channels, inner = x3.shape
        y3 = self.xp.empty_like(x3)
        if x3.size == 0:
            return y3
        cfg = map_launch("apply", x3.shape, key, self._aligned(x3, y3), self._device(),
                         self.tuning)
        if cfg.kernel.endswith("nchw"):
            shape_args = (np.int64(outer), np.int32(channels), np.int64(inner))
        else:
            shape_args = (np.int64(outer), np.int32(channels))
        self._launch(cfg, key, (x3, y3, mean, spread, weight, bias, mean_out, invstd_out)
                     + shape_args + (np.int32(1 if from_var else 0), acc.type(eps)))
        return y3

    def bn_forward_train(self, x3, weight, bias, running_mean, running_var, momentum, eps):
        self._check_tensor(x3, None, "x")
        key, acc = self._types(x3)
        channels = x3.shape[1]
        for v, n in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"),
                     (running_var, "running_var")):
            self._check_channel(v, channels, acc, n)
        if x3.shape[0] * x3.shape[2] == 0:
            raise ValueError("x has no values per channel")
        mean = self.xp.empty(channels, dtype=acc)
        invstd = self.xp.empty(channels, dtype=acc)
        self._stats(x3, acc, key, mean, None, invstd, running_mean, running_var,
                    float(momentum), float(eps))
        y3 = self._apply(x3, key, acc, mean, invstd, weight, bias, None, None, False, eps)
        return y3, mean, invstd

    def bn_forward_eval(self, x3, weight, bias, running_mean, running_var, eps):
        self._check_tensor(x3, None, "x")
        key, acc = self._types(x3)
        channels = x3.shape[1]
        for v, n in ((weight, "weight"), (bias, "bias")):
            self._check_channel(v, channels, acc, n)
        for v, n in ((running_mean, "running_mean"), (running_var, "running_var")):
            self._check_channel(v, channels, acc, n, optional=False)
        mean = self.xp.empty(channels, dtype=acc)
        invstd = self.xp.empty(channels, dtype=acc)
        if x3.size == 0:  # nothing to launch over; the statistics still come back
            mean[...] = running_mean
            invstd[...] = 1.0 / self.xp.sqrt(running_var + acc.type(eps))
            return self.xp.empty_like(x3), mean, invstd
        y3 = self._apply(x3, key, acc, running_mean, running_var, weight, bias, mean, invstd,
                         True, eps)
        return y3, mean, invstd

    def bn_apply(self, x3, mean, invstd, weight, bias):
        self._check_tensor(x3, None, "x")
        key, acc = self._types(x3)
        channels = x3.shape[1]
        self._check_channel(mean, channels, acc, "mean", optional=False)
        self._check_channel(invstd, channels, acc, "invstd", optional=False)
        for v, n in ((weight, "weight"), (bias, "bias")):
            self._check_channel(v, channels, acc, n)
        return self._apply(x3, key, acc, mean, invstd, weight, bias, None, None, False, 0.0)

    # -- backward ------------------------------------------------------------
    def _check_backward(self, dy3, x3, mean, invstd, weight):
        self._check_tensor(x3, None, "x")
        self._check_tensor(dy3, x3, "dy")
        key, acc = self._types(x3)
        channels = x3.shape[1]
        self._check_channel(mean, channels, acc, "mean", optional=False)
        self._check_channel(invstd, channels, acc, "invstd", optional=False)
        self._check_channel(weight, channels, acc, "weight")
        return key, acc

    def _reduce(self, dy3, x3, key, acc, mean, invstd, weight, dx_eval):
        outer, channels, inner = x3.shape
        sum_dy = self.xp.empty(channels, dtype=acc)
        sum_dy_xhat = self.xp.empty(channels, dtype=acc)
        if x3.size == 0:
            sum_dy.fill(0)
            sum_dy_xhat.fill(0)
            return sum_dy, sum_dy_xhat
        cfg = reduce_launch("grad", x3.shape, key, self._aligned(x3, dy3, dx_eval),
                            self._device(), self.tuning)
        partials, counters = self._workspace(cfg)
        if cfg.kernel.endswith("nchw"):
            shape_args = (np.int64(outer), np.int32(channels), np.int64(inner))
        else:
            shape_args = (np.int64(outer), np.int32(channels))
        self._launch(cfg, key, (dy3, x3, mean, invstd, weight, dx_eval) + shape_args
                     + (partials, counters, sum_dy, sum_dy_xhat))
        return sum_dy, sum_dy_xhat

    def _dx(self, dy3, x3, key, acc, mean, invstd, weight, sum_dy, sum_dy_xhat, count):
        outer, channels, inner = x3.shape
        dx3 = self.xp.empty_like(x3)
        if x3.size == 0:
            return dx3
        cfg = map_launch("dx", x3.shape, key, self._aligned(x3, dy3, dx3), self._device(),
                         self.tuning)
        if cfg.kernel.endswith("nchw"):
            shape_args = (np.int64(outer), np.int32(channels), np.int64(inner))
        else:
            shape_args = (np.int64(outer), np.int32(channels))
        self._launch(cfg, key, (dy3, x3, dx3, mean, invstd, weight, sum_dy, sum_dy_xhat)
                     + shape_args + (acc.type(1.0 / count), np.int32(1)))
        return dx3

    def bn_backward_reduce(self, dy3, x3, mean, invstd):
        key, acc = self._check_backward(dy3, x3, mean, invstd, None)
        return self._reduce(dy3, x3, key, acc, mean, invstd, None, None)

    def bn_backward_dx(self, dy3, x3, mean, invstd, weight, sum_dy, sum_dy_xhat, count):
        key, acc = self._check_backward(dy3, x3, mean, invstd, weight)
        channels = x3.shape[1]
        self._check_channel(sum_dy, channels, acc, "sum_dy", optional=False)
        self._check_channel(sum_dy_xhat, channels, acc, "sum_dy_xhat", optional=False)
        if int(count) < 1:
            raise ValueError(f"count must be a positive number of values per channel, got {count}")
        return self._dx(dy3, x3, key, acc, mean, invstd, weight, sum_dy, sum_dy_xhat, int(count))

    def bn_backward(self, dy3, x3, mean, invstd, weight, training):
        key, acc = self._check_backward(dy3, x3, mean, invstd, weight)
        if training:
            sum_dy, sum_dy_xhat = self._reduce(dy3, x3, key, acc, mean, invstd, None, None)
            count = int(x3.shape[0]) * int(x3.shape[2])
            dx3 = self._dx(dy3, x3, key, acc, mean, invstd, weight, sum_dy, sum_dy_xhat, count)
        else:
            dx3 = self.xp.empty_like(x3)
            sum_dy, sum_dy_xhat = self._reduce(dy3, x3, key, acc, mean, invstd, weight, dx3)
        return dx3, sum_dy_xhat, sum_dy


__all__ = ["KernelBackend", "debug_enabled", "debug_report"]

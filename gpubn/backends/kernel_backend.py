"""The launch sequence of every op, shared by the ``cuda`` and ``emu`` backends.

A kernel backend differs from another only in its seven hooks.  A subclass
must provide four:

* ``_get_function(source, dtype_key, name)``: a compiled kernel callable as
  ``fn(grid, block, args, shared_mem=0)``, reporting ``num_regs`` and
  ``shared_size_bytes`` and with a settable ``max_dynamic_shared_size_bytes``
  (CuPy ``RawModule`` functions and ``gpubn.emu.RawModule`` functions both
  are);
* ``xp``: the array module (CuPy or NumPy);
* ``device_attributes()``: the ``gpubn.launch.DeviceAttributes`` the launch
  configuration is computed from;
* ``_address(a)``: the device address of an array;

and may override three that have a default:

* ``_launch_counters(n)``: the zeroed arrival counters one two-stage
  reduction launch owns;
* ``_static_shared_bytes(fn, cfg, dtype_key)``: the static shared memory of
  a compiled layer-norm row kernel, which its weight/bias staging leaves
  room for within 48 KiB (default from ``gpubn.launch``'s model);
* ``_blocks_per_sm(fn, cfg)``: the occupancy of a compiled reduction kernel,
  which sizes its grid to one wave (default from ``gpubn.launch``'s model).

Every launch plan (block, grid, vector width, workspace) comes from
``gpubn.launch``; this module only runs them.

Kernel arguments are always explicit NumPy scalars of the exact C type of the
parameter (``long long`` -> ``np.int64``, ``int`` -> ``np.int32``, ``Acc`` ->
``np.float32`` / ``np.float64``).  An absent array (``None`` in the launch
sequence) is passed as ``NULL_POINTER``, ``np.uint64(0)``: CuPy's RawKernel
would not pass ``None`` as a null pointer, and emu refuses it for that reason.

Ops and launches (see kernels/*.cu):

=======================  ==========================================  ========
op                       kernels                                     launches
=======================  ==========================================  ========
bn_stats                 bn_stats_*                                  1
bn_forward_train         bn_forward_once_* (x fits on chip)          1
                         else bn_stats_* (+ finish), bn_apply_*      2
bn_forward_train_groups  bn_stats_*, bn_apply_*, the group as grid z 2
bn_forward_eval          bn_apply_* (invstd from running_var)        1
bn_apply                 bn_apply_*                                  1
bn_backward (train)      bn_backward_once_* (x, dy fit on chip)       1
                         else bn_backward_reduce_*, bn_backward_dx_* 2
bn_backward (eval)       bn_backward_reduce_* (writes dx as well)    1
bn_backward_groups       the training two, the group as grid z       2
=======================  ==========================================  ========

The residual-block epilogue (``*_act``, ``bn_backward_relu``) adds no launch:
bn_apply_* reads the residual and applies the ReLU; bn_backward_reduce_*
masks dy with ``y <= 0`` (the forward's output) and writes the masked
gradient g (= dresidual), which bn_backward_dx_* reads in place of dy.
Passes over tensor-sized buffers: forward training 4 (read x twice and the
residual, write y; 3 read-once), inference 3; backward training with the ReLU 7 (read dy,
y, x; write g; read g, x; write dx; 5 read-once: read dy, y, x, write dx, g), eval 5
(read dy, y, x; write dx, g).
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import numpy as np

from .. import _validation as V
from .. import kernels as catalog
from ..launch import (REDUCE_MIN_BLOCKS, DeviceAttributes, Launch, Tuning, ln_row_launch,
                      ln_stage_bytes, ln_static_shared_bytes, ln_wgrad_launch, map_launch,
                      once_fits, once_launch, reduce_launch, renorm_finish_launch)
from .base import Backend, ChannelStats

_ACC_DTYPES = {"float": np.dtype(np.float32), "double": np.dtype(np.float64)}

# A null pointer argument, passed the same way by CuPy and emu (8 zero bytes).
NULL_POINTER = np.uint64(0)


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

    def _launch_counters(self, n: int):
        """The arrival counters of one two-stage reduction launch: ``n`` uint32
        zeros owned by that launch, zeroed on the launching stream (CuPy's
        ``zeros`` is an asynchronous memset on the current stream).

        Counters belong to a launch, not to a stream: concurrent launches (per-
        thread default streams share a stream pointer; graph capture records the
        memset with the launch) can never share one.  The kernels leave them zero
        again (the last block resets its counter), which emu checks."""
        return self.xp.zeros(n, dtype=np.uint32)

    # -- helpers -------------------------------------------------------------
    def _device(self) -> DeviceAttributes:
        return self._device_override or self.device_attributes()

    def _aligned(self, *arrays) -> bool:
        return all(a is None or self._address(a) % catalog.VECTOR_BYTES == 0 for a in arrays)

    def _types(self, x3):
        key = catalog.dtype_name(x3.dtype)
        acc = _ACC_DTYPES[catalog.CXX_TYPES[key][1]]
        return key, acc

    def _check_like(self, a, like, name: str):
        """``a`` is this backend's array and, when ``like`` is given, of its
        shape and dtype."""
        V.check_owned(a, self, name)
        if like is not None and (a.shape != like.shape or a.dtype != like.dtype):
            raise ValueError(f"{name} must have shape {like.shape} and dtype {like.dtype}, got "
                             f"{a.shape} {a.dtype}")

    def _check_tensor(self, a, like, name: str):
        self._check_like(a, like, name)
        if a.ndim != 3 or not a.flags.c_contiguous:
            raise ValueError(f"{name} must be a C-contiguous (outer, C, inner) array")

    def _check_channel(self, v, channels: int, acc, name: str, optional: bool = True):
        if v is None:
            if optional:
                return
            raise ValueError(f"{name} is required")
        V.check_owned(v, self, name)
        if v.shape != (channels,) or v.dtype != acc or not v.flags.c_contiguous:
            raise ValueError(f"{name} must be a contiguous ({channels},) {acc.name} array, got "
                             f"shape {v.shape} dtype {v.dtype}")

    def _function(self, cfg: Launch, dtype_key: str):
        """The compiled function of ``cfg``'s kernel for ``dtype_key``."""
        name = catalog.name_expression(cfg.kernel, dtype_key, cfg.vec)
        return self._get_function(catalog.KERNELS[cfg.kernel].source, dtype_key, name)

    def _static_shared_bytes(self, fn, cfg: Launch, dtype_key: str) -> int:
        """Static shared memory of a compiled layer-norm row kernel (CuPy
        reports it per function; the default is launch.py's model)."""
        return ln_static_shared_bytes(cfg.kernel, dtype_key)

    def _blocks_per_sm(self, fn, cfg: Launch) -> int:
        """Occupancy of a compiled reduction kernel at ``cfg``'s block size
        (CuPy reports the function's registers and shared memory; the
        default is the minimum the kernels declare in __launch_bounds__)."""
        return REDUCE_MIN_BLOCKS

    def _one_wave(self, plan, key: str) -> Launch:
        """The reduction launch ``plan(blocks_per_sm)`` with its grid sized to
        one wave of the compiled function's occupancy (the kernel, vector
        width and block do not depend on it)."""
        cfg = plan(REDUCE_MIN_BLOCKS)
        blocks = self._blocks_per_sm(self._function(cfg, key), cfg)
        return cfg if blocks == REDUCE_MIN_BLOCKS else plan(max(1, blocks))

    def _reduce_launch(self, op: str, shape3, key: str, aligned: bool, groups: int = 1) -> Launch:
        return self._one_wave(lambda blocks: reduce_launch(
            op, shape3, key, aligned, self._device(), self.tuning, blocks_per_sm=blocks,
            groups=groups), key)

    def _launch(self, cfg: Launch, dtype_key: str, args, shared_mem: int = 0) -> None:
        """Launch ``cfg``'s kernel for ``dtype_key``; ``None`` in ``args`` is an
        absent array, passed as a null pointer."""
        name = catalog.name_expression(cfg.kernel, dtype_key, cfg.vec)
        fn = self._function(cfg, dtype_key)
        debug_report(f"{self.name}: launch {name} grid={cfg.grid} block={cfg.block} "
                     f"splits={cfg.splits} shared={shared_mem}")
        args = tuple(NULL_POINTER if a is None else a for a in args)
        if shared_mem and shared_mem > fn.max_dynamic_shared_size_bytes:
            # above 48 KiB static + dynamic a function must opt in (CUDA's
            # cudaFuncAttributeMaxDynamicSharedMemorySize; CuPy's and emu's
            # Function attribute): always to the device's most, so that
            # threads launching it concurrently never lower it for another
            fn.max_dynamic_shared_size_bytes = \
                self._device().max_shared_per_block_optin - int(fn.shared_size_bytes)
        fn(cfg.grid, cfg.block, args, shared_mem=int(shared_mem))

    def _workspace(self, cfg: Launch):
        if cfg.splits <= 1:
            return None, None
        partials = self.xp.empty(cfg.partial_bytes, dtype=np.uint8)
        return partials, self._launch_counters(cfg.counters)

    # -- statistics ----------------------------------------------------------
    def _stats(self, x3, acc, key, mean_out, mean_lo_out, m2_out, invstd_out, running_mean,
               running_var, momentum, eps, skipped=None, groups=1):
        outer, channels, inner = x3.shape
        if channels == 0:
            return
        cfg = self._reduce_launch("stats", x3.shape, key, self._aligned(x3), groups)
        outer //= groups
        partials, counters = self._workspace(cfg)
        a = acc.type
        if cfg.kernel.endswith("nchw"):
            shape_args = (x3, np.int64(outer), np.int32(channels), np.int64(inner))
        else:
            shape_args = (x3, np.int64(outer), np.int32(channels))
        self._launch(cfg, key, shape_args + (
            partials, counters, mean_out, mean_lo_out, m2_out, invstd_out, running_mean,
            running_var, skipped, a(momentum), a(eps)))

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
            self._stats(x3, acc, key, mean, None, m2, None, None, None, 0.0, 0.0)
        return ChannelStats(count=count, mean=mean, m2=m2)

    # -- forward -------------------------------------------------------------
    def _apply(self, x3, key, acc, mean, mean_lo, spread, weight, bias, mean_out, invstd_out,
               from_var: bool, eps: float, residual=None, relu: bool = False,
               groups: int = 1, out=None):
        """y from the channel mean ``mean`` (+ ``mean_lo``, what rounding it
        left out, or None) and ``spread`` (invstd, or the variance when
        ``from_var``), plus ``residual`` (or None) and through a ReLU when
        ``relu``; with ``groups``, per-group ``(groups, C)`` statistics; into
        ``out`` when given."""
        outer, channels, inner = x3.shape
        y3 = self._output(x3, out)
        if x3.size == 0:
            return y3
        cfg = map_launch("apply", x3.shape, key, self._aligned(x3, y3, residual), self._device(),
                         self.tuning, groups)
        outer //= groups
        if cfg.kernel.endswith("nchw"):
            shape_args = (np.int64(outer), np.int32(channels), np.int64(inner))
        else:
            shape_args = (np.int64(outer), np.int32(channels))
        self._launch(cfg, key, (x3, y3, residual, mean, mean_lo, spread, weight, bias, mean_out,
                                invstd_out)
                     + shape_args + (np.int32(1 if from_var else 0), np.int32(1 if relu else 0),
                                     acc.type(eps)))
        return y3

    def _output(self, x3, out):
        """A result like ``x3``: ``out`` (checked) when given, else a new array."""
        if out is None:
            return self.xp.empty_like(x3)
        self._check_tensor(out, x3, "out")
        return out

    def bn_forward_train(self, x3, weight, bias, running_mean, running_var, momentum, eps,
                         skipped=None, out=None):
        return self.bn_forward_train_act(x3, weight, bias, running_mean, running_var, momentum,
                                         eps, None, False, skipped=skipped, out=out)

    def bn_forward_train_act(self, x3, weight, bias, running_mean, running_var, momentum, eps,
                             residual, relu, skipped=None, out=None):
        self._check_tensor(x3, None, "x")
        if residual is not None:
            self._check_tensor(residual, x3, "residual")
        if out is not None:
            self._check_tensor(out, x3, "out")
        key, acc = self._types(x3)
        channels = x3.shape[1]
        for v, n in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"),
                     (running_var, "running_var")):
            self._check_channel(v, channels, acc, n)
        self._check_channel(skipped, channels, np.dtype(np.int32), "skipped")
        if x3.shape[0] * x3.shape[2] == 0:
            raise ValueError("x has no values per channel")
        mean = self.xp.empty(channels, dtype=acc)
        invstd = self.xp.empty(channels, dtype=acc)
        once = self._once_plan(x3, key, "forward")
        if once is not None:
            y3 = self._output(x3, out)
            self._launch(once, key, (x3, y3, residual) + self._once_shape_and_workspace(once, x3)
                         + (weight, bias, mean, invstd, running_mean, running_var, skipped,
                            np.int32(1 if relu else 0), acc.type(momentum), acc.type(eps)),
                         once.shared_mem)
            return y3, mean, invstd
        mean_lo = self.xp.empty(channels, dtype=acc)
        self._stats(x3, acc, key, mean, mean_lo, None, invstd, running_mean, running_var,
                    float(momentum), float(eps), skipped)
        y3 = self._apply(x3, key, acc, mean, mean_lo, invstd, weight, bias, None, None, False,
                         eps, residual, relu, out=out)
        return y3, mean, invstd

    def _once_shape_and_workspace(self, once: Launch, x3) -> tuple:
        """The read-once kernels' arguments after their tensors: the shape
        (``outer, channels`` plus ``inner`` for channel axis 1), the values
        each thread stages in shared memory, the partials' workspace and
        this launch's arrival counters."""
        outer, channels, inner = x3.shape
        shape_args = (np.int64(outer), np.int32(channels))
        if once.kernel.endswith("nchw"):
            shape_args += (np.int64(inner),)
        return shape_args + (np.int32(once.staged),
                             self.xp.empty(once.partial_bytes, dtype=np.uint8),
                             self._launch_counters(once.counters))

    def _once_plan(self, x3, key: str, op: str) -> Optional[Launch]:
        """The read-once training ``op`` (``'forward'`` or ``'backward'``)
        launch when it runs (the tensor fits on chip, ``Tuning.read_once``
        allows it), else None; with ``GPUBN_DEBUG_KERNELS=1`` it says which
        path and why."""
        if x3.shape[1] == 0 or x3.size == 0:
            return None
        if self.tuning.read_once is False:
            debug_report(f"{self.name}: {op} training: two-pass (Tuning.read_once=False)")
            return None
        # the compiled function's registers and static shared memory (CuPy's
        # and emu's functions report both) decide how many blocks fit per SM
        fn = self._function(once_launch(x3.shape, key, op), key)
        resources = (self._device(), int(fn.num_regs), int(fn.shared_size_bytes))
        cfg = once_launch(x3.shape, key, op, *resources)
        fits, why = once_fits(cfg, *resources)
        debug_report(f"{self.name}: {op} training: {'read-once' if fits else 'two-pass'} "
                     f"({why})")
        if not fits and self.tuning.read_once:
            raise ValueError(f"Tuning.read_once=True, but the read-once {op} cannot run: {why}")
        return cfg if fits else None

    def bn_forward_train_groups(self, x3, groups, weight, bias, eps, out=None):
        self._check_tensor(x3, None, "x")
        key, acc = self._types(x3)
        outer, channels, _ = x3.shape
        for v, n in ((weight, "weight"), (bias, "bias")):
            self._check_channel(v, channels, acc, n)
        if x3.shape[2] * (outer // groups) < 2:
            raise ValueError("x has fewer than 2 values per channel and group")
        debug_report(f"{self.name}: forward training: two-pass (ghost batch norm: {groups} "
                     f"groups reduce separately)")
        mean, mean_lo, m2, invstd = (self.xp.empty((groups, channels), dtype=acc)
                                     for _ in range(4))
        self._stats(x3, acc, key, mean, mean_lo, m2, invstd, None, None, 0.0, float(eps),
                    groups=groups)
        y3 = self._apply(x3, key, acc, mean, mean_lo, invstd, weight, bias, None, None, False,
                         eps, groups=groups, out=out)
        return y3, mean, invstd, m2

    def bn_forward_eval(self, x3, weight, bias, running_mean, running_var, eps, out=None):
        return self.bn_forward_eval_act(x3, weight, bias, running_mean, running_var, eps, None,
                                        False, out=out)

    def bn_forward_eval_act(self, x3, weight, bias, running_mean, running_var, eps, residual,
                            relu, out=None):
        self._check_tensor(x3, None, "x")
        if residual is not None:
            self._check_tensor(residual, x3, "residual")
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
            return self._output(x3, out), mean, invstd
        y3 = self._apply(x3, key, acc, running_mean, None, running_var, weight, bias, mean,
                         invstd, True, eps, residual, relu, out=out)
        return y3, mean, invstd

    def bn_apply(self, x3, mean, invstd, weight, bias):
        self._check_tensor(x3, None, "x")
        key, acc = self._types(x3)
        channels = x3.shape[1]
        self._check_channel(mean, channels, acc, "mean", optional=False)
        self._check_channel(invstd, channels, acc, "invstd", optional=False)
        for v, n in ((weight, "weight"), (bias, "bias")):
            self._check_channel(v, channels, acc, n)
        return self._apply(x3, key, acc, mean, None, invstd, weight, bias, None, None, False, 0.0)

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

    def _reduce(self, dy3, x3, key, acc, mean, invstd, weight, dx_eval, y_mask=None,
                g_out=None, groups=1):
        outer, channels, inner = x3.shape
        shape = (groups, channels) if groups > 1 else (channels,)
        sum_dy = self.xp.empty(shape, dtype=acc)
        sum_dy_xhat = self.xp.empty(shape, dtype=acc)
        if x3.size == 0:
            sum_dy.fill(0)
            sum_dy_xhat.fill(0)
            return sum_dy, sum_dy_xhat
        cfg = self._reduce_launch("grad", x3.shape, key,
                                  self._aligned(x3, dy3, dx_eval, y_mask, g_out), groups)
        outer //= groups
        partials, counters = self._workspace(cfg)
        if cfg.kernel.endswith("nchw"):
            shape_args = (np.int64(outer), np.int32(channels), np.int64(inner))
        else:
            shape_args = (np.int64(outer), np.int32(channels))
        self._launch(cfg, key, (dy3, x3, mean, invstd, weight, dx_eval, y_mask, g_out)
                     + shape_args + (partials, counters, sum_dy, sum_dy_xhat))
        return sum_dy, sum_dy_xhat

    def _dx(self, dy3, x3, key, acc, mean, invstd, weight, sum_dy, sum_dy_xhat, count,
            groups=1, out=None):
        outer, channels, inner = x3.shape
        dx3 = self._output(x3, out)
        if x3.size == 0:
            return dx3
        cfg = map_launch("dx", x3.shape, key, self._aligned(x3, dy3, dx3), self._device(),
                         self.tuning, groups)
        outer //= groups
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

    def _backward(self, dy3, x3, key, acc, mean, invstd, weight, training, y_mask, g_out,
                  out=None):
        """dx, into ``out`` when given (and with ``y_mask``, the ReLU's masked
        gradient into ``g_out``, which the dx launch then reads in place of dy
        and the mask)."""
        once = self._once_plan(x3, key, "backward") if training else None
        if once is not None:
            outer, channels, inner = x3.shape
            dx3 = self._output(x3, out)
            sum_dy = self.xp.empty(channels, dtype=acc)
            sum_dy_xhat = self.xp.empty(channels, dtype=acc)
            self._launch(once, key, (dy3, x3, dx3, y_mask, g_out)
                         + self._once_shape_and_workspace(once, x3)
                         + (mean, invstd, weight, sum_dy, sum_dy_xhat,
                            acc.type(1.0 / (int(outer) * int(inner)))), once.shared_mem)
        elif training:
            sum_dy, sum_dy_xhat = self._reduce(dy3, x3, key, acc, mean, invstd, None, None,
                                               y_mask, g_out)
            count = int(x3.shape[0]) * int(x3.shape[2])
            g3 = dy3 if y_mask is None else g_out
            dx3 = self._dx(g3, x3, key, acc, mean, invstd, weight, sum_dy, sum_dy_xhat, count,
                           out=out)
        else:
            dx3 = self._output(x3, out)
            sum_dy, sum_dy_xhat = self._reduce(dy3, x3, key, acc, mean, invstd, weight, dx3,
                                               y_mask, g_out)
        return dx3, sum_dy_xhat, sum_dy

    def bn_backward(self, dy3, x3, mean, invstd, weight, training, out=None):
        key, acc = self._check_backward(dy3, x3, mean, invstd, weight)
        return self._backward(dy3, x3, key, acc, mean, invstd, weight, training, None, None,
                              out)

    def bn_backward_relu(self, dy3, x3, mean, invstd, weight, y3, training, out=None):
        key, acc = self._check_backward(dy3, x3, mean, invstd, weight)
        self._check_tensor(y3, x3, "y")
        g3 = self.xp.empty_like(x3)
        return (*self._backward(dy3, x3, key, acc, mean, invstd, weight, training, y3, g3, out),
                g3)

    def bn_backward_groups(self, dy3, x3, mean, invstd, weight, out=None):
        self._check_tensor(x3, None, "x")
        self._check_tensor(dy3, x3, "dy")
        key, acc = self._types(x3)
        outer, channels, inner = x3.shape
        for v, n in ((mean, "mean"), (invstd, "invstd")):
            V.check_owned(v, self, n)
            if v.ndim != 2 or v.shape[1] != channels or v.dtype != acc or not v.flags.c_contiguous:
                raise ValueError(f"{n} must be a contiguous (groups, {channels}) {acc.name} array,"
                                 f" got shape {v.shape} dtype {v.dtype}")
        groups = mean.shape[0]
        self._check_channel(weight, channels, acc, "weight")
        debug_report(f"{self.name}: backward training: two-pass (ghost batch norm: {groups} "
                     f"groups reduce separately)")
        sum_dy, sum_dy_xhat = self._reduce(dy3, x3, key, acc, mean, invstd, None, None,
                                           groups=groups)
        count = (outer // groups) * inner
        dx3 = self._dx(dy3, x3, key, acc, mean, invstd, weight, sum_dy, sum_dy_xhat, count,
                       groups, out=out)
        return dx3, sum_dy_xhat.sum(axis=0), sum_dy.sum(axis=0)

    # ======================================================================
    # Batch renorm and layer norm (kernels/bn_renorm.cu, kernels/layer_norm.cu)
    #
    #   bn_renorm_forward_train  bn_stats_*, bn_renorm_finish, bn_apply_*   3
    #   (renorm backward is bn_backward with weight * r)                    2
    #   ln_forward               ln_forward_{warp,block}                    1
    #   ln_backward              ln_backward_dx_{warp,block}
    #                            (+ ln_backward_wgrad for dweight/dbias)   1-2
    # ======================================================================
    def bn_renorm_forward_train(self, x3, weight, bias, running_mean, running_std, rmax, dmax,
                                momentum, eps, skipped=None):
        self._check_tensor(x3, None, "x")
        key, acc = self._types(x3)
        channels = x3.shape[1]
        for v, n in ((weight, "weight"), (bias, "bias")):
            self._check_channel(v, channels, acc, n)
        for v, n in ((running_mean, "running_mean"), (running_std, "running_std")):
            self._check_channel(v, channels, acc, n, optional=False)
        self._check_channel(skipped, channels, np.dtype(np.int32), "skipped")
        count = int(x3.shape[0]) * int(x3.shape[2])
        if count == 0:
            raise ValueError("x has no values per channel")
        xp, a = self.xp, acc.type
        mean, mean_lo, m2, invstd = (xp.empty(channels, dtype=acc) for _ in range(4))
        self._stats(x3, acc, key, mean, mean_lo, m2, invstd, None, None, 0.0, float(eps))
        r, d, w_eff, b_eff = (xp.empty(channels, dtype=acc) for _ in range(4))
        self._launch(renorm_finish_launch(channels), key, (
            mean, m2, np.int64(count), np.int32(channels), weight, bias, running_mean,
            running_std, r, d, w_eff, b_eff, skipped, a(rmax), a(dmax), a(momentum), a(eps)))
        y3 = self._apply(x3, key, acc, mean, mean_lo, invstd, w_eff, b_eff, None, None, False,
                         eps)
        return y3, mean, invstd, r, d, w_eff

    def _check_rows(self, a, like, name: str):
        self._check_like(a, like, name)
        if a.ndim != 2 or not a.flags.c_contiguous or a.shape[1] < 1:
            raise ValueError(f"{name} must be a C-contiguous (rows, n) array with n >= 1")
        if a.shape[1] > np.iinfo(np.int32).max:
            raise ValueError(f"{name}: rows longer than 2**31 - 1 elements are not supported")

    def _ln_stage_bytes(self, cfg: Launch, key: str, n: int, acc, weight, bias) -> int:
        """Dynamic shared memory staging the non-null of weight / bias for a
        layer-norm row kernel, within what its static shared memory leaves."""
        static = self._static_shared_bytes(self._function(cfg, key), cfg, key)
        arrays = (weight is not None) + (bias is not None)
        return ln_stage_bytes(n, acc.itemsize, arrays, static)

    def ln_forward(self, x2, weight, bias, eps, out=None):
        self._check_rows(x2, None, "x")
        if out is not None:
            self._check_rows(out, x2, "out")
        key, acc = self._types(x2)
        rows, n = (int(s) for s in x2.shape)
        for v, name in ((weight, "weight"), (bias, "bias")):
            self._check_channel(v, n, acc, name)
        y2 = self.xp.empty_like(x2) if out is None else out
        mean = self.xp.empty(rows, dtype=acc)
        rstd = self.xp.empty(rows, dtype=acc)
        if rows:
            cfg = ln_row_launch("forward", rows, n, key, self._aligned(x2, y2), self._device(),
                                self.tuning)
            smem = self._ln_stage_bytes(cfg, key, n, acc, weight, bias)
            self._launch(cfg, key, (x2, y2, weight, bias, mean, rstd, np.int64(rows),
                                    np.int64(n), acc.type(eps), np.int32(smem > 0)), smem)
        return y2, mean, rstd

    def ln_backward(self, dy2, x2, mean, rstd, weight, want_grads, out=None):
        self._check_rows(x2, None, "x")
        self._check_rows(dy2, x2, "dy")
        if out is not None:
            self._check_rows(out, x2, "out")
        key, acc = self._types(x2)
        rows, n = (int(s) for s in x2.shape)
        self._check_channel(mean, rows, acc, "mean", optional=False)
        self._check_channel(rstd, rows, acc, "rstd", optional=False)
        self._check_channel(weight, n, acc, "weight")
        dx2 = self.xp.empty_like(x2) if out is None else out
        if rows:
            cfg = ln_row_launch("backward_dx", rows, n, key, self._aligned(x2, dy2, dx2),
                                self._device(), self.tuning)
            smem = self._ln_stage_bytes(cfg, key, n, acc, weight, None)
            self._launch(cfg, key, (dy2, x2, dx2, mean, rstd, weight, np.int64(rows),
                                    np.int64(n), np.int32(smem > 0)), smem)
        if not want_grads:
            return dx2, None, None
        dweight = self.xp.empty(n, dtype=acc)
        dbias = self.xp.empty(n, dtype=acc)
        if rows == 0:
            dweight.fill(0)
            dbias.fill(0)
            return dx2, dweight, dbias
        cfg = self._one_wave(lambda blocks: ln_wgrad_launch(
            rows, n, key, self._device(), self.tuning, blocks_per_sm=blocks), key)
        partials, counters = self._workspace(cfg)
        self._launch(cfg, key, (dy2, x2, mean, rstd, np.int64(rows), np.int32(n), partials,
                                counters, dweight, dbias))
        return dx2, dweight, dbias


__all__ = ["KernelBackend", "debug_enabled", "debug_report"]

"""Exact bytes moved, bandwidth, device peak and timing summaries.

Bytes moved are the *minimum* global-memory traffic an op needs: every
element-sized tensor it must read or write, once, plus the small per-channel
(batch norm) or per-row/per-feature (layer norm) vectors.  Anything a kernel
moves beyond that (re-reading x, workspaces) is not counted, so GB/s computed
from these bytes is "useful" bandwidth and comparable across implementations.

Per op (n = elements, e = element size, p = size of the accumulation dtype:
4 for float16/float32 data, 8 for float64; C = channels):

batch norm / batch renorm
  fwd_train  read x, write y                         2*n*e
             read weight, bias; read+write running
             mean, var; write saved mean, invstd      + 8*C*p
  fwd_infer  read x, write y                         2*n*e
             read weight, bias, running mean, var    + 4*C*p
  bwd        read dy, x, write dx                    3*n*e
             read mean, invstd, weight; write
             dweight, dbias                          + 5*C*p
  fwd_bwd    fwd_train + bwd
  fwd_train_add_relu   y = relu(bn(x) + residual): fwd_train plus the
             residual's read                         3*n*e + 8*C*p
  bwd_add_relu         its backward: read dy, x and y (the ReLU's mask),
             write dx and dresidual                  5*n*e + 5*C*p
             (a 1-bit mask instead of y: 4*n*e + n/8)

layer norm (R rows of H features)
  fwd_train  read x, write y; read weight, bias (H); write mean, rstd (R)
             2*n*e + 2*H*p + 2*R*p
  fwd_infer  2*n*e + 2*H*p
  bwd        read dy, x, write dx; read mean, rstd (R), weight (H);
             write dweight, dbias (H)
             3*n*e + 2*R*p + 3*H*p
  fwd_bwd    fwd_train + bwd
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Optional

import numpy as np

ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def acc_itemsize(dtype: str) -> int:
    """Size of the accumulation dtype (per-channel vectors) for ``dtype``."""
    return 8 if dtype == "float64" else 4


def element_passes(kind: str, op: str) -> int:
    """Element-sized tensors the op must read or write at minimum."""
    passes = {"fwd_train": 2, "fwd_infer": 2, "bwd": 3, "fwd_bwd": 5}
    if kind != "layer_norm":
        passes.update(fwd_train_add_relu=3, bwd_add_relu=5)
    if op not in passes:
        raise ValueError(f"op must be one of {', '.join(passes)} for {kind}, got {op!r}")
    return passes[op]


def bytes_moved(kind: str, op: str, shape, axis: int, dtype: str) -> int:
    """Minimum global-memory bytes for ``op`` on an array of ``shape`` and
    ``dtype`` (see the module docstring for the definition)."""
    if dtype not in ITEMSIZE:
        raise ValueError(f"dtype must be one of {tuple(ITEMSIZE)}, got {dtype!r}")
    if kind not in ("batch_norm", "batch_renorm", "layer_norm"):
        raise ValueError(f"kind must be batch_norm, batch_renorm or layer_norm, got {kind!r}")
    shape = tuple(int(d) for d in shape)
    if not shape or min(shape) < 1:
        raise ValueError(f"shape must have positive dimensions, got {shape}")
    n = math.prod(shape)
    e = ITEMSIZE[dtype]
    p = acc_itemsize(dtype)
    big = element_passes(kind, op) * n * e
    if kind == "layer_norm":
        h = shape[-1]
        r = n // h
        small = {
            "fwd_train": 2 * h + 2 * r,
            "fwd_infer": 2 * h,
            "bwd": 2 * r + 3 * h,
            "fwd_bwd": (2 * h + 2 * r) + (2 * r + 3 * h),
        }[op]
    else:
        if not -len(shape) <= axis < len(shape):
            raise ValueError(f"axis {axis} is out of range for shape {shape}")
        c = shape[axis]
        small = {"fwd_train": 8 * c, "fwd_infer": 4 * c, "bwd": 5 * c, "fwd_bwd": 13 * c,
                 "fwd_train_add_relu": 8 * c, "bwd_add_relu": 5 * c}[op]
    return big + small * p


def peak_bandwidth(memory_clock_khz: float, bus_width_bits: int) -> float:
    """Theoretical DRAM bandwidth in bytes/s from device attributes: double
    data rate, ``2 * clock * bus width in bytes``.  An H100 SXM reports
    2,619,000 kHz and 5120 bits: 3.35e12 B/s."""
    if not memory_clock_khz or memory_clock_khz <= 0:
        raise ValueError(f"memory_clock_khz must be positive, got {memory_clock_khz!r}")
    if not bus_width_bits or bus_width_bits <= 0:
        raise ValueError(f"bus_width_bits must be positive, got {bus_width_bits!r}")
    return 2.0 * float(memory_clock_khz) * 1e3 * (int(bus_width_bits) / 8.0)


def gbps(nbytes: int, seconds: float) -> Optional[float]:
    """Bandwidth in GB/s (1e9 bytes per second); None for a non-positive time."""
    if seconds is None or not seconds > 0:
        return None
    return nbytes / seconds / 1e9


def summarize(times: Iterable[float]) -> Dict[str, float]:
    """Median, min and max of repeated timings (seconds)."""
    t = np.asarray(list(times), dtype=np.float64)
    if t.size == 0:
        raise ValueError("times must not be empty")
    if not np.all(np.isfinite(t)):
        raise ValueError("times must be finite")
    return {"median": float(np.median(t)), "min": float(t.min()), "max": float(t.max()),
            "repeats": int(t.size)}

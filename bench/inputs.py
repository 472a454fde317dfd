"""One setup per (case, dtype), shared by every provider.

All providers of a case see the same input values: ``x``, ``dy``, weight,
bias and the starting running statistics are drawn from a seeded generator
as NumPy arrays (a worker process that times a provider on its own rebuilds
the same values from the seed); each provider copies what it needs to its own
device (outside the timed region) and gets its own copy of the running
statistics, so one provider's in-place updates never change another's
inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import numpy as np

from .suites import Case

# Hyper-parameters used for every case.
MOMENTUM = 0.1
RENORM_MOMENTUM = 0.01
EPS = 1e-5
RMAX = 3.0
DMAX = 5.0


def acc_dtype(dtype: str):
    return np.float64 if dtype == "float64" else np.float32


@dataclass
class Setup:
    case: Case
    x: np.ndarray
    dy: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray   # batch norm: running variance; batch renorm: running std

    def state(self) -> Dict[str, np.ndarray]:
        """Fresh copies of the running statistics for one provider."""
        return {"running_mean": self.running_mean.copy(), "running_var": self.running_var.copy()}


def residual(setup: Setup) -> np.ndarray:
    """The residual the epilogue ops add (``y = relu(bn(x) + residual)``): x
    reversed along its first axis, a contiguous array of x's shape and dtype
    whose values do not line up with x's, the same for every provider."""
    return np.ascontiguousarray(setup.x[::-1])


def make_setup(case: Case, seed: int = 0) -> Setup:
    rng = np.random.default_rng(seed)
    dt = np.dtype(case.dtype)
    acc = acc_dtype(case.dtype)
    c = case.channels
    # Non-zero mean and non-unit scale so that statistics matter.
    x = rng.standard_normal(case.shape, dtype=np.float32)
    x *= 2.0
    x += 0.5
    x = x.astype(dt, copy=False)
    dy = rng.standard_normal(case.shape, dtype=np.float32).astype(dt, copy=False)
    weight = (1.0 + 0.1 * rng.standard_normal(c)).astype(acc)
    bias = (0.1 * rng.standard_normal(c)).astype(acc)
    running_mean = (0.5 + 0.1 * rng.standard_normal(c)).astype(acc)
    if case.kind == "batch_renorm":
        running_var = (2.0 * (1.0 + 0.1 * rng.random(c))).astype(acc)   # running std
    else:
        running_var = (4.0 * (1.0 + 0.1 * rng.random(c))).astype(acc)
    return Setup(case, x, dy, weight, bias, running_mean, running_var)

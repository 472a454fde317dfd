"""Providers: the implementations measured side by side.

A provider turns a shared :class:`~bench.inputs.Setup` and an op into a
zero-argument callable that runs the op once and returns its outputs
(``fwd_*``: ``(y,)``; ``bwd``: ``(dx, dweight, dbias)``; ``fwd_bwd``:
``(y, dx, dweight, dbias)``; ``bwd_add_relu``: ``(dx, dweight, dbias,
dresidual)``).  The epilogue ops (``fwd_train_add_relu``, ``bwd_add_relu``:
``y = relu(bn(x) + residual)`` and its backward) exist for batch norm only.
Everything that is not the op itself (copies to the device, the forward pass
that a ``bwd`` measurement needs) happens in ``prepare``, outside the timed
region.

A provider that cannot run here (missing package, API not there yet, no
device) says why through :meth:`Provider.unavailable_reason`; one that cannot
run a given case says why through :meth:`Provider.supports`.  The runner
reports those reasons in the output instead of failing.
"""

from __future__ import annotations

import importlib
import time
from typing import Callable, List, Optional, Sequence

import numpy as np

from . import naive
from .inputs import DMAX, EPS, MOMENTUM, RENORM_MOMENTUM, RMAX, Setup, residual
from .suites import EPILOGUE_OPS, Case

_FORWARD_NAMES = {
    "batch_norm": ("batch_norm_forward", "batch_norm_backward"),
    "batch_renorm": ("batch_renorm_forward", "batch_renorm_backward"),
    "layer_norm": ("layer_norm_forward", "layer_norm_backward"),
}


def epilogue_unsupported(case: Case, op: str) -> Optional[str]:
    """Why ``op`` cannot run on ``case`` when it is an epilogue op on
    anything but batch norm, else None."""
    if op in EPILOGUE_OPS and case.kind != "batch_norm":
        return f"{op} is batch norm's residual-block epilogue, not defined for {case.kind}"
    return None


def cpu_timer(fn: Callable[[], object], repeats: int, warmup: int) -> List[float]:
    """Wall-clock seconds of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


class Provider:
    name = "?"
    device = "cpu"        # "cpu" or "gpu"
    backend = "?"         # what runs the math: numpy, torch, cuda, ...
    peer = False          # the reference that ratios are computed against
    note = ""

    def unavailable_reason(self) -> Optional[str]:
        return None

    def supports(self, case: Case, op: str) -> Optional[str]:
        return None

    def prepare(self, setup: Setup, op: str) -> Callable[[], tuple]:
        raise NotImplementedError

    def to_host(self, outputs) -> tuple:
        return tuple(np.asarray(o) for o in outputs)

    def timer(self, fn, repeats: int, warmup: int) -> List[float]:
        return cpu_timer(fn, repeats, warmup)

    def versions(self) -> dict:
        return {}


# -- gpubn ----------------------------------------------------------------

class GpubnProvider(Provider):
    """gpubn's public functional API on one backend (``numpy`` or ``cpu`` on
    the CPU, ``cuda`` on the GPU).  ``out=True`` (batch norm and layer norm,
    named ``gpubn-<backend>-out``): y and dx are written into arrays
    allocated once in ``prepare`` (``out=`` of the forward and backward), as a
    training loop that keeps its buffers would."""

    peer = False

    def __init__(self, backend: str = "numpy", out: bool = False):
        self.backend = backend
        self.out = out
        self.name = f"gpubn-{backend}" + ("-out" if out else "")
        self.device = "gpu" if backend == "cuda" else "cpu"
        if out:
            self.note = "y and dx written into the caller's arrays (out=)"

    def _gpubn(self):
        return importlib.import_module("gpubn")

    def unavailable_reason(self):
        try:
            gpubn = self._gpubn()
        except Exception as exc:  # pragma: no cover - the checkout is importable
            return f"cannot import gpubn: {exc}"
        if not hasattr(gpubn, "batch_norm_forward"):
            return "gpubn.batch_norm_forward is not available in this version"
        try:
            from gpubn.backends import get_backend
            get_backend(self.backend)
        except Exception as exc:
            return str(exc)
        return None

    def supports(self, case, op):
        reason = epilogue_unsupported(case, op)
        if reason:
            return reason
        if self.out and case.kind == "batch_renorm":
            return "batch renorm takes no out="
        fwd_name, bwd_name = _FORWARD_NAMES[case.kind]
        gpubn = self._gpubn()
        for fname in (fwd_name, bwd_name) if op != "fwd_infer" else (fwd_name,):
            if not hasattr(gpubn, fname):
                return f"gpubn.{fname} is not available in this version"
        return None

    def _xp(self):
        if self.backend == "cuda":
            return importlib.import_module("cupy")
        return np

    def to_host(self, outputs):
        if self.backend == "cuda":
            cupy = importlib.import_module("cupy")
            return tuple(cupy.asnumpy(o) for o in outputs)
        return tuple(np.asarray(o) for o in outputs)

    def prepare(self, setup, op):
        gpubn = self._gpubn()
        xp = self._xp()
        case = setup.case
        state = setup.state()
        x = xp.asarray(setup.x)
        dy = xp.asarray(setup.dy)
        w = xp.asarray(setup.weight)
        b = xp.asarray(setup.bias)
        rm = xp.asarray(state["running_mean"])
        rv = xp.asarray(state["running_var"])
        backend = self.backend
        fwd_name, bwd_name = _FORWARD_NAMES[case.kind]
        fwd_fn = getattr(gpubn, fwd_name)
        bwd_fn = getattr(gpubn, bwd_name, None)
        training = op != "fwd_infer"
        epilogue = {}
        if op in EPILOGUE_OPS:
            epilogue = dict(residual=xp.asarray(residual(setup)), activation="relu")

        into_y, into_dx = {}, {}
        if self.out:
            into_y, into_dx = {"out": xp.empty_like(x)}, {"out": xp.empty_like(x)}
        if case.kind == "batch_norm":
            def forward():
                return fwd_fn(x, weight=w, bias=b, running_mean=rm, running_var=rv,
                              training=training, momentum=MOMENTUM, eps=EPS, axis=case.axis,
                              backend=backend, **epilogue, **into_y)
        elif case.kind == "batch_renorm":
            def forward():
                return fwd_fn(x, weight=w, bias=b, running_mean=rm, running_std=rv, rmax=RMAX,
                              dmax=DMAX, training=training, momentum=RENORM_MOMENTUM, eps=EPS,
                              axis=case.axis, backend=backend)
        else:
            normalized_shape = (case.shape[-1],)

            def forward():
                return fwd_fn(x, normalized_shape, w, b, eps=EPS, backend=backend, **into_y)

        if op in ("fwd_train", "fwd_infer", "fwd_train_add_relu"):
            return lambda: (forward()[0],)
        if op in ("bwd", "bwd_add_relu"):
            _, saved = forward()
            return lambda: tuple(bwd_fn(dy, saved, **into_dx))
        if op == "fwd_bwd":
            def fwd_bwd():
                y, saved = forward()
                return (y,) + tuple(bwd_fn(dy, saved, **into_dx))
            return fwd_bwd
        raise ValueError(f"unknown op {op!r}")

    def versions(self):
        try:
            return {"gpubn": self._gpubn().__version__}
        except Exception:
            return {}


# -- naive textbook NumPy --------------------------------------------------

class NaiveProvider(Provider):
    name = "naive-numpy"
    backend = "numpy"
    note = "textbook formulas, step-by-step chain rule (bench/naive.py)"

    def prepare(self, setup, op):
        case = setup.case
        state = setup.state()
        x, dy, w, b = setup.x, setup.dy, setup.weight, setup.bias
        rm, rv = state["running_mean"], state["running_var"]
        if case.kind == "batch_norm":
            if op == "fwd_infer":
                return lambda: (naive.batch_norm_forward_infer(x, w, b, rm, rv, EPS, case.axis),)

            def forward():
                return naive.batch_norm_forward_train(x, w, b, rm, rv, MOMENTUM, EPS, case.axis)
            backward = naive.batch_norm_backward
        elif case.kind == "batch_renorm":
            if op == "fwd_infer":
                def infer():
                    # inference uses the moving statistics: an affine map
                    return (naive.batch_norm_forward_infer(x, w, b, rm, rv ** 2 - EPS, EPS, case.axis),)
                return infer

            def forward():
                return naive.batch_renorm_forward_train(x, w, b, rm, rv, RMAX, DMAX,
                                                        RENORM_MOMENTUM, EPS, case.axis)
            backward = naive.batch_renorm_backward
        else:
            def forward():
                return naive.layer_norm_forward(x, w, b, EPS)
            backward = naive.layer_norm_backward

        if op in ("fwd_train", "fwd_infer"):
            return lambda: (forward()[0],)
        if op == "bwd":
            _, cache = forward()
            return lambda: backward(dy, cache)
        if op == "fwd_bwd":
            def fwd_bwd():
                y, cache = forward()
                return (y,) + tuple(backward(dy, cache))
            return fwd_bwd
        raise ValueError(f"unknown op {op!r}")

    def supports(self, case, op):
        if case.kind == "layer_norm" and op == "fwd_infer":
            return "layer norm has no separate inference forward"
        if op in EPILOGUE_OPS:
            return "the textbook version has no residual add + ReLU"
        return None


# -- PyTorch -----------------------------------------------------------------

class TorchProvider(Provider):
    """``torch.nn.functional.batch_norm`` / ``layer_norm`` with autograd for
    the backward.  Channels-last inputs are passed as NCHW-shaped tensors with
    channels-last strides (``torch.channels_last``), as PyTorch users hold
    them.  PyTorch has no batch renorm: that case uses a composition of
    tensor ops (statistics, clipped r and d, affine), noted in the row."""

    peer = True
    backend = "torch"

    def __init__(self, device: str = "cpu"):
        self.torch_device = "cuda" if device == "gpu" else "cpu"
        self.device = device
        self.name = f"torch-{self.torch_device}"

    def unavailable_reason(self):
        try:
            torch = importlib.import_module("torch")
        except Exception as exc:
            return f"PyTorch is not installed ({exc})"
        if self.torch_device == "cuda" and not torch.cuda.is_available():
            return "PyTorch has no CUDA device here"
        return None

    def supports(self, case, op):
        if case.kind == "layer_norm" and op == "fwd_infer":
            return "layer norm has no separate inference forward"
        return epilogue_unsupported(case, op)

    def _tensor(self, a, case, requires_grad=False):
        torch = importlib.import_module("torch")
        t = torch.from_numpy(np.ascontiguousarray(a))
        if self.torch_device != "cpu":
            t = t.to(self.torch_device)
        if case.layout == "NHWC":
            t = t.permute(0, 3, 1, 2)  # NCHW shape, channels-last memory
        if requires_grad:
            t = t.detach().requires_grad_(True)
        return t

    def _vec(self, a, requires_grad=False, dtype=None):
        torch = importlib.import_module("torch")
        t = torch.from_numpy(a.copy())
        if dtype is not None:
            t = t.to(dtype)
        t = t.to(self.torch_device)
        if requires_grad:
            t.requires_grad_(True)
        return t

    def to_host(self, outputs):
        out = []
        for o in outputs:
            a = o.detach()
            if a.dim() == 4 and self._nhwc:
                a = a.permute(0, 2, 3, 1)
            out.append(a.cpu().numpy())
        return tuple(out)

    def timer(self, fn, repeats, warmup):
        if self.torch_device == "cpu":
            return cpu_timer(fn, repeats, warmup)
        torch = importlib.import_module("torch")
        return cuda_event_timer(fn, repeats, warmup, torch.cuda.Event, torch.cuda.synchronize)

    def prepare(self, setup, op):
        torch = importlib.import_module("torch")
        F = torch.nn.functional
        case = setup.case
        self._nhwc = case.layout == "NHWC"
        train = op != "fwd_infer"
        x = self._tensor(setup.x, case, requires_grad=train)
        dy = self._tensor(setup.dy, case)
        state = setup.state()
        wdtype = x.dtype if case.kind == "layer_norm" else None
        w = self._vec(setup.weight, requires_grad=train, dtype=wdtype)
        b = self._vec(setup.bias, requires_grad=train, dtype=wdtype)
        rm = self._vec(state["running_mean"])
        rv = self._vec(state["running_var"])

        inputs = (x, w, b)
        if op in EPILOGUE_OPS:
            # as torchvision's residual blocks run it: batch norm, then an
            # in-place add of the identity and an in-place ReLU (two more
            # launches; PyTorch has no fused form)
            z = self._tensor(residual(setup), case, requires_grad=True)
            inputs = (x, w, b, z)

            def forward():
                out = F.batch_norm(x, rm, rv, w, b, training=True, momentum=MOMENTUM, eps=EPS)
                out += z
                return F.relu(out, inplace=True)
        elif case.kind == "batch_norm":
            def forward():
                return F.batch_norm(x, rm, rv, w, b, training=train, momentum=MOMENTUM, eps=EPS)
        elif case.kind == "batch_renorm":
            dims = [0] + list(range(2, x.dim()))
            bshape = [1, -1] + [1] * (x.dim() - 2)

            def forward():
                if not train:
                    return F.batch_norm(x, rm, rv * rv - EPS, w, b, training=False, eps=EPS)
                xf = x
                mu = xf.mean(dims, keepdim=True)
                var = xf.var(dims, unbiased=False, keepdim=True)
                std = (var + EPS).sqrt()
                with torch.no_grad():
                    r = (std / rv.view(bshape)).clamp(1.0 / RMAX, RMAX)
                    d = ((mu - rm.view(bshape)) / rv.view(bshape)).clamp(-DMAX, DMAX)
                    rm.add_(RENORM_MOMENTUM * (mu.view(-1) - rm))
                    rv.add_(RENORM_MOMENTUM * (std.view(-1) - rv))
                xhat = (xf - mu) / std * r + d
                return xhat * w.view(bshape) + b.view(bshape)
        else:
            normalized_shape = (case.shape[-1],)

            def forward():
                return F.layer_norm(x, normalized_shape, w, b, EPS)

        if op == "fwd_infer":
            def infer():
                with torch.no_grad():
                    return (forward(),)
            return infer
        if op in ("fwd_train", "fwd_train_add_relu"):
            return lambda: (forward(),)
        if op in ("bwd", "bwd_add_relu"):
            y = forward()
            return lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True)
        if op == "fwd_bwd":
            def fwd_bwd():
                y = forward()
                return (y,) + tuple(torch.autograd.grad(y, inputs, dy))
            return fwd_bwd
        raise ValueError(f"unknown op {op!r}")

    def versions(self):
        try:
            torch = importlib.import_module("torch")
        except Exception:
            return {}
        v = {"torch": torch.__version__}
        if self.torch_device == "cpu":
            v["torch_threads"] = torch.get_num_threads()
        return v


def cuda_event_timer(fn, repeats, warmup, event_cls, synchronize) -> List[float]:
    """Seconds per call measured with CUDA events around each call (device
    time, not host time).  ``event_cls(enable_timing=True)`` must give an
    object with ``record()`` and ``elapsed_time(other)`` in milliseconds, as
    ``torch.cuda.Event`` does."""
    for _ in range(warmup):
        fn()
    synchronize()
    pairs = []
    for _ in range(repeats):
        start, end = event_cls(enable_timing=True), event_cls(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in pairs]


def cpu_providers() -> List[Provider]:
    """The CPU line-up: PyTorch CPU (the peer), gpubn's numpy reference (the
    peer when PyTorch is missing) and its fused cpu backend (also writing
    into the caller's arrays), the naive textbook version."""
    return [TorchProvider("cpu"), GpubnProvider("numpy"), GpubnProvider("cpu"),
            GpubnProvider("cpu", out=True), NaiveProvider()]


def select(providers: Sequence[Provider], names: Optional[Sequence[str]]):
    if not names:
        return list(providers)
    known = {p.name for p in providers}
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown provider(s) {bad}; known: {sorted(known)}")
    return [p for p in providers if p.name in names]

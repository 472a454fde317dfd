"""Backend registry and selection.

Selection order: explicit ``backend=`` argument > ``GPUBN_BACKEND`` environment
variable > automatic (CuPy arrays -> ``cuda``; NumPy arrays -> ``cpu`` when
Numba imports, else ``numpy``).
An explicitly requested backend that cannot run raises ``RuntimeError`` saying
why; automatic selection never falls back silently.
"""

from __future__ import annotations

import functools
import importlib
import os

import numpy as np

from .base import Backend, ChannelStats

# name -> "module:Class", imported on first use so that importing gpubn never
# needs CuPy or a C++ compiler.
_REGISTRY = {
    "numpy": "gpubn.backends.numpy_backend:NumpyBackend",
    "cpu": "gpubn.backends.cpu:CpuBackend",
    "emu": "gpubn.backends.emu:EmuBackend",
    "cuda": "gpubn.backends.cuda:CudaBackend",
}
_INSTANCES: dict = {}

BACKENDS = tuple(_REGISTRY)


def _load(name: str) -> Backend:
    if name not in _INSTANCES:
        module_name, cls_name = _REGISTRY[name].split(":")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except ImportError as exc:  # backend module missing its dependency
            raise RuntimeError(f"backend {name!r} is not available: {exc}") from exc
        reason = cls.unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"backend {name!r} is not available: {reason}")
        _INSTANCES[name] = cls()
    return _INSTANCES[name]


def available_backends():
    """Names of the backends that can run on this machine."""
    names = []
    for name in _REGISTRY:
        try:
            _load(name)
        except RuntimeError:
            continue
        names.append(name)
    return names


def is_cupy_array(x) -> bool:
    """Whether ``x`` is a CuPy array (tested without importing CuPy)."""
    return type(x).__module__.split(".")[0] == "cupy"


@functools.lru_cache(maxsize=None)
def _host_auto() -> str:
    """The automatic choice for NumPy arrays: ``cpu`` when it can run, else ``numpy``."""
    try:
        _load("cpu")
    except RuntimeError:   # Numba is not installed
        return "numpy"
    return "cpu"


def array_module(x):
    """``cupy`` for a CuPy array, else ``numpy`` (without importing CuPy)."""
    if is_cupy_array(x):
        return importlib.import_module("cupy")
    return importlib.import_module("numpy")


def get_backend(backend=None, x=None) -> Backend:
    """Resolve a backend name (or ``None``) for array ``x``."""
    if backend is None:
        backend = os.environ.get("GPUBN_BACKEND") or None
        if backend is None:     # automatic
            if type(x) is not np.ndarray and is_cupy_array(x):
                return _load("cuda")
            return _load(_host_auto())
        if backend not in _REGISTRY:
            raise ValueError(f"GPUBN_BACKEND={backend!r} (environment variable) is not one "
                             f"of {_known()}; unset it for automatic selection")
    elif isinstance(backend, Backend):
        return backend
    if not isinstance(backend, str) or backend not in _REGISTRY:
        raise ValueError(f"backend must be one of {_known()} or None, got {backend!r}")
    return _load(backend)


def _known() -> str:
    return ", ".join(map(repr, _REGISTRY))


__all__ = ["Backend", "ChannelStats", "BACKENDS", "array_module", "available_backends",
           "get_backend", "is_cupy_array"]

"""The kernel catalog: which source holds which kernel, and the name
expressions (template instantiations) each storage dtype needs.

Both kernel backends (``cuda`` through CuPy ``RawModule``, ``emu`` through
``gpubn.emu.RawModule``) and the NVRTC compile test take their kernel names
from here, so a kernel added to ``kernels/*.cu`` is registered in one place.

Kernel sources live in the checkout's ``kernels/`` directory; an installed
package ships them as ``gpubn/_kernels`` (see pyproject).  ``kernels_dir()``
finds whichever is present.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np

# storage dtype name -> (C++ storage type, C++ accumulation type)
CXX_TYPES: Dict[str, Tuple[str, str]] = {
    "float16": ("gpubn::half", "float"),
    "bfloat16": ("gpubn::bfloat16", "float"),
    "float32": ("float", "float"),
    "float64": ("double", "double"),
}

# Bytes moved by one vectorized load or store.
VECTOR_BYTES = 16

# Options every compile uses (besides the include directory of kernels/).
COMPILE_OPTIONS = ("-std=c++17",)


@dataclass(frozen=True)
class KernelSpec:
    """One templated kernel: its source file, whether it takes a VEC
    (elements per vector access) template argument, and the positions of its
    tensor-sized arguments (x, y, dy, dx: what traffic counts measure).
    ``vector_bytes``: the access sizes instantiated besides one element;
    ``max_vec``: the most elements per access (a kernel keeping a state per
    element of a vector bounds it to stay within its registers)."""

    name: str
    source: str
    vectorized: bool
    tensor_args: Tuple[int, ...]
    vector_bytes: Tuple[int, ...] = (VECTOR_BYTES,)
    max_vec: int = 16


# Channel-axis-1 kernels also get 8-byte vectors: runs such as 14*14 = 196
# float16 values are a multiple of 4 elements but not of 8 (and channels-last
# statistics: C = 12 float16 channels).
_RUN_VECTORS = (8, VECTOR_BYTES)

KERNELS: Dict[str, KernelSpec] = {
    spec.name: spec
    for spec in (
        KernelSpec("bn_stats_nchw", "bn_stats.cu", True, (0,), _RUN_VECTORS),
        # one Welford state per channel of a vector: at most 4 channels per thread
        KernelSpec("bn_stats_nhwc", "bn_stats.cu", True, (0,), _RUN_VECTORS, max_vec=4),
        KernelSpec("bn_apply_nchw", "bn_forward.cu", True, (0, 1, 2), _RUN_VECTORS),
        KernelSpec("bn_apply_nhwc", "bn_forward.cu", True, (0, 1, 2)),
        KernelSpec("bn_backward_reduce_nchw", "bn_backward.cu", True, (0, 1, 5, 6, 7),
                   _RUN_VECTORS),
        # one pair of sums per channel of a vector: at most 4 channels per thread
        KernelSpec("bn_backward_reduce_nhwc", "bn_backward.cu", True, (0, 1, 5, 6, 7),
                   _RUN_VECTORS, max_vec=4),
        KernelSpec("bn_backward_dx_nchw", "bn_backward.cu", True, (0, 1, 2), _RUN_VECTORS),
        KernelSpec("bn_backward_dx_nhwc", "bn_backward.cu", True, (0, 1, 2)),
        # read-once training forward and backward (cooperative launches: COOPERATIVE_SOURCES)
        KernelSpec("bn_forward_once_nchw", "bn_persistent.cu", False, (0, 1, 2)),
        KernelSpec("bn_forward_once_nhwc", "bn_persistent.cu", False, (0, 1, 2)),
        # read-once training backward: dy, x, dx and the ReLU's y and g
        KernelSpec("bn_backward_once_nchw", "bn_persistent.cu", False, (0, 1, 2, 3, 4)),
        KernelSpec("bn_backward_once_nhwc", "bn_persistent.cu", False, (0, 1, 2, 3, 4)),
        # batch renorm (per-channel finish between bn_stats_* and bn_apply_*)
        KernelSpec("bn_renorm_finish", "bn_renorm.cu", False, ()),
        # layer norm over (rows, n)
        KernelSpec("ln_forward_warp", "layer_norm.cu", True, (0, 1)),
        KernelSpec("ln_forward_block", "layer_norm.cu", True, (0, 1)),
        KernelSpec("ln_backward_dx_warp", "layer_norm.cu", True, (0, 1, 2)),
        KernelSpec("ln_backward_dx_block", "layer_norm.cu", True, (0, 1, 2)),
        KernelSpec("ln_backward_wgrad", "layer_norm.cu", False, (0, 1)),
    )
}

SOURCES: Tuple[str, ...] = tuple(dict.fromkeys(spec.source for spec in KERNELS.values()))

# Sources whose modules are loaded for cooperative launches (every block
# co-resident, CuPy's RawModule(..., enable_cooperative_groups=True)): their
# kernels wait at a grid barrier.
COOPERATIVE_SOURCES: Tuple[str, ...] = ("bn_persistent.cu",)


def dtype_name(dtype) -> str:
    """Catalog key of a storage dtype ('float16', 'bfloat16', 'float32', 'float64')."""
    if isinstance(dtype, str) and dtype in CXX_TYPES:
        return dtype
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in CXX_TYPES:
        raise TypeError(f"dtype {name!r} has no kernels; supported: {', '.join(CXX_TYPES)}")
    return name


def itemsize(dtype_key: str) -> int:
    return 2 if dtype_key in ("float16", "bfloat16") else np.dtype(dtype_key).itemsize


def vector_widths(kernel: str, dtype) -> Tuple[int, ...]:
    """Elements per access instantiated for a kernel and storage dtype,
    ascending, starting with 1 (scalar)."""
    spec = KERNELS[kernel]
    if not spec.vectorized:
        return (1,)
    size = itemsize(dtype_name(dtype))
    return tuple(sorted({1} | {b // size for b in spec.vector_bytes
                               if b >= size and b // size <= spec.max_vec}))


def name_expression(kernel: str, dtype, vec: int = 1) -> str:
    """The C++ name expression of one instantiation, e.g.
    ``gpubn::bn_stats_nchw<float, float, 4>``."""
    spec = KERNELS[kernel]
    key = dtype_name(dtype)
    t, acc = CXX_TYPES[key]
    if spec.vectorized:
        widths = vector_widths(kernel, key)
        if vec not in widths:
            raise ValueError(f"{kernel}: vec must be one of {widths} for {key}, got {vec}")
        return f"gpubn::{kernel}<{t}, {acc}, {vec}>"
    if vec != 1:
        raise ValueError(f"{kernel} is not vectorized (vec must be 1, got {vec})")
    return f"gpubn::{kernel}<{t}, {acc}>"


def kernel_of(name_expr: str) -> KernelSpec:
    """The catalog entry of a name expression such as
    ``gpubn::bn_apply_nchw<float, float, 4>``."""
    base = name_expr.split("<", 1)[0].strip()
    base = base.split("::")[-1]
    if base not in KERNELS:
        raise KeyError(f"{name_expr!r} is not a catalog kernel")
    return KERNELS[base]


def name_expressions(source: str, dtype) -> Tuple[str, ...]:
    """Every instantiation of ``source`` that one storage dtype needs."""
    key = dtype_name(dtype)
    names = []
    for spec in KERNELS.values():
        if spec.source != source:
            continue
        names.extend(name_expression(spec.name, key, w) for w in vector_widths(spec.name, key))
    return tuple(names)


def all_name_expressions(source: str) -> Tuple[str, ...]:
    """Every instantiation of ``source`` over all storage dtypes."""
    return tuple(n for key in CXX_TYPES for n in name_expressions(source, key))


def kernels_dir() -> str:
    """Directory holding kernels/*.cu and *.cuh: ``gpubn/_kernels`` in an
    installed package, the checkout's ``kernels/`` otherwise.

    ``gpubn/_kernels`` is package data without an ``__init__.py``: a namespace
    package, which ``importlib.resources`` cannot turn into one path, so the
    directory is found next to this module.
    """
    package = os.path.dirname(os.path.abspath(__file__))
    for path in (os.path.join(package, "_kernels"),
                 os.path.join(os.path.dirname(package), "kernels")):
        if os.path.isfile(os.path.join(path, "gpubn_common.cuh")):
            return path
    raise FileNotFoundError(f"gpubn kernel sources not found: neither {package}/_kernels "
                            "(an installed package) nor kernels/ next to the package "
                            "(a checkout) holds gpubn_common.cuh")


@functools.lru_cache(maxsize=None)
def read_source(source: str) -> str:
    """Text of one kernel source file, read once per process."""
    if source not in SOURCES:
        raise ValueError(f"unknown kernel source {source!r}; known: {', '.join(SOURCES)}")
    with open(os.path.join(kernels_dir(), source), encoding="utf-8") as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def headers_fingerprint() -> str:
    """A hash of the kernel headers (*.cuh) and of the sources (*.cu), which
    other sources include too (bn_persistent.cu).  CuPy's on-disk cache keys
    compiled modules by source text and options, not by included files, so
    the fingerprint goes into the options: an edited include recompiles."""
    import hashlib

    digest = hashlib.sha256()
    directory = kernels_dir()
    for name in sorted(os.listdir(directory)):
        if name.endswith((".cuh", ".cu")):
            digest.update(name.encode())
            with open(os.path.join(directory, name), "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:16]


def cache_dir(kind: str) -> str:
    """Folder for compiled kernels of one kind (``emu`` libraries, ``cuda``
    cubins): ``$GPUBN_CACHE_DIR/<kind>``, default ``~/.cache/gpubn/<kind>``
    (``$XDG_CACHE_HOME`` when set)."""
    root = os.environ.get("GPUBN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "gpubn")
    return os.path.join(root, kind)


def compile_options() -> Tuple[str, ...]:
    """Options for NVRTC / emu: the kernels' include directory, C++17 and the
    headers' fingerprint."""
    return (("-I" + kernels_dir(),) + COMPILE_OPTIONS
            + (f"-DGPUBN_HEADERS=0x{headers_fingerprint()}",))


__all__ = [
    "COOPERATIVE_SOURCES", "CXX_TYPES", "KERNELS", "SOURCES", "KernelSpec", "dtype_name",
    "vector_widths",
    "name_expression", "name_expressions", "kernel_of", "all_name_expressions", "kernels_dir",
    "read_source", "compile_options", "headers_fingerprint", "cache_dir",
]

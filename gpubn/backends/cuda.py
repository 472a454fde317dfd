"""The ``cuda`` backend: kernels/*.cu compiled by NVRTC through CuPy's
``RawModule`` and launched on CuPy arrays, with the launch sequence shared
with ``emu`` (``gpubn.backends.kernel_backend``).

CuPy arrays in, CuPy arrays out.  NumPy input is refused (``TypeError``):
gpubn never copies between host and device behind the caller's back.
Arrays from PyTorch, JAX and other DLPack producers work without a copy
through ``cupy.from_dlpack(t)`` (and results go back with
``torch.from_dlpack(y)``).

Subnormal numbers are kept, as on emu and in NumPy: CuPy appends
``-ftz=true`` to every RawModule compile (float32 arithmetic would flush
subnormal inputs and results to zero on the GPU only), so gpubn compiles its
kernels itself with NVRTC (``gpubn._nvrtc``, ``-ftz=false``) to a cubin for
the device's architecture and loads it with ``RawModule(path=...)``.  Only
when gpubn cannot load NVRTC itself does it let CuPy compile (and flush).

Modules are compiled once per (source, dtype, options, device) per process;
cubins are cached in ``$GPUBN_CACHE_DIR/cuda`` (default
``~/.cache/gpubn/cuda``).  ``GPUBN_DEBUG_KERNELS=1`` reports each kernel's
registers, local and shared memory when it is first loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Dict, Optional, Tuple

from .. import kernels as catalog
from ..launch import DeviceAttributes, occupancy
from .kernel_backend import KernelBackend, debug_enabled, debug_report

try:
    import cupy
except ImportError:  # pragma: no cover - depends on the machine
    cupy = None


class CudaBackend(KernelBackend):
    name = "cuda"
    xp = cupy

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        if cupy is None:
            return "CuPy is not installed (pip install 'gpubn[cuda12]' or 'gpubn[cuda13]')"
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # no driver, or the driver reports an error
            return f"no CUDA device ({exc})"
        if count < 1:
            return "no CUDA device"
        return None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self._modules: Dict[Tuple, object] = {}
        self._functions: Dict[Tuple, object] = {}
        self._attributes: Dict[int, DeviceAttributes] = {}

    # -- hooks ---------------------------------------------------------------
    def device_attributes(self) -> DeviceAttributes:
        dev = cupy.cuda.Device()
        attrs = self._attributes.get(dev.id)
        if attrs is None:
            a = dev.attributes
            base = DeviceAttributes(sm_count=1)
            per_sm = {field: int(a.get(attr, getattr(base, field))) for field, attr in (
                ("max_threads_per_sm", "MaxThreadsPerMultiProcessor"),
                ("registers_per_sm", "MaxRegistersPerMultiprocessor"),
                ("shared_per_sm", "MaxSharedMemoryPerMultiprocessor"),
                ("reserved_shared_per_block", "ReservedSharedMemoryPerBlock"),
                ("max_blocks_per_sm", "MaxBlocksPerMultiprocessor"),
                ("max_shared_per_block_optin", "MaxSharedMemoryPerBlockOptin"))}
            attrs = DeviceAttributes(sm_count=int(a["MultiProcessorCount"]),
                                     max_threads_per_block=int(a["MaxThreadsPerBlock"]),
                                     max_grid_y=int(a["MaxGridDimY"]),
                                     cooperative_launch=bool(a.get("CooperativeLaunch", 0)),
                                     name=f"cuda:{dev.id}", **per_sm)
            self._attributes[dev.id] = attrs
        return attrs

    def _get_function(self, source: str, dtype_key: str, name: str):
        dev = cupy.cuda.Device()
        device = dev.id
        options = catalog.compile_options()
        key = (source, dtype_key, options, device, name)
        fn = self._functions.get(key)
        if fn is not None:
            return fn
        with self._lock:
            mkey = key[:4]
            module = self._modules.get(mkey)
            if module is None:
                module = _load_module(source, dtype_key, str(dev.compute_capability))
                self._modules[mkey] = module
            raw, lowered = module
            fn = raw.get_function(lowered.get(name, name))
            self._functions[key] = fn
        if debug_enabled():
            debug_report(f"cuda:{device} {name}: {fn.num_regs} registers, "
                         f"{fn.local_size_bytes} B local, {fn.shared_size_bytes} B shared, "
                         f"max {fn.max_threads_per_block} threads/block")
        return fn

    def _static_shared_bytes(self, fn, cfg, dtype_key) -> int:
        return int(fn.shared_size_bytes)

    def _blocks_per_sm(self, fn, cfg) -> int:
        threads = cfg.block[0] * cfg.block[1] * cfg.block[2]
        return occupancy(int(fn.num_regs), int(fn.shared_size_bytes), threads, 0,
                         self.device_attributes())

    def _address(self, a) -> int:
        return a.data.ptr

        self._attributes: Dict[int, DeviceAttributes] = {}
    # -- arrays --------------------------------------------------------------
    def owns(self, x) -> bool:
        return cupy is not None and isinstance(x, cupy.ndarray)

    def _check_tensor(self, a, like, name: str):
        if not self.owns(a) and type(a).__module__.split(".")[0] == "numpy":
            raise TypeError(
                f"{name} is a NumPy array, but backend 'cuda' works on CuPy arrays and never "
                f"copies between host and device implicitly; pass cupy.asarray({name}) (or "
                f"cupy.from_dlpack(...) for PyTorch/JAX tensors), or use backend='numpy'")
        super()._check_tensor(a, like, name)
        if a.device.id != cupy.cuda.Device().id:
            raise ValueError(f"{name} lives on device {a.device.id} but the current device is "
                             f"{cupy.cuda.Device().id}; launch inside `with cupy.cuda.Device"
                             f"({a.device.id}):`")


# Options of gpubn's own compile besides the catalog's: keep subnormals.
CUDA_COMPILE_OPTIONS = ("-ftz=false",)


def cuda_compile_options(compute_capability: str) -> Tuple[str, ...]:
    """NVRTC options of a cubin for a device of ``compute_capability``
    (CuPy's spelling, e.g. ``"90"``)."""
    return (catalog.compile_options() + CUDA_COMPILE_OPTIONS
            + (f"--gpu-architecture=sm_{compute_capability}",))


def build_cubin(source: str, dtype_key: str, compute_capability: str) -> Tuple[str, Dict[str, str]]:
    """A cubin of every instantiation of ``source`` for ``dtype_key``, in the
    cache folder (compiled on the first request): its path, and the mangled
    name of each name expression."""
    from .. import _nvrtc

    options = cuda_compile_options(compute_capability)
    names = catalog.name_expressions(source, dtype_key)
    text = catalog.read_source(source)
    digest = hashlib.sha256("\0".join((text, *options, *names,
                                        ".".join(map(str, _nvrtc.version())))).encode())
    stem = f"{os.path.splitext(source)[0]}-{dtype_key}-sm{compute_capability}-" \
           f"{digest.hexdigest()[:20]}"
    folder = catalog.cache_dir("cuda")
    path, names_path = os.path.join(folder, stem + ".cubin"), os.path.join(folder, stem + ".json")
    if os.path.exists(path) and os.path.exists(names_path):
        with open(names_path, encoding="utf-8") as f:
            return path, json.load(f)
    result = _nvrtc.compile_to_cubin(text, names, options, source)
    os.makedirs(folder, exist_ok=True)
    for dest, data in ((path, result.cubin),
                       (names_path, json.dumps(result.lowered_names).encode())):
        tmp = f"{dest}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)
    return path, result.lowered_names


def _load_module(source: str, dtype_key: str, compute_capability: str):
    """``(RawModule, {name expression: name to look up})``: gpubn's cubin,
    or CuPy's own compile (which flushes subnormals) when gpubn cannot load
    NVRTC itself."""
    from .. import _nvrtc

    # the read-once kernels' modules launch cooperatively (the others as before)
    cooperative = ({"enable_cooperative_groups": True}
                   if source in catalog.COOPERATIVE_SOURCES else {})
    if _nvrtc.unavailable_reason() is None:
        path, lowered = build_cubin(source, dtype_key, compute_capability)
        return cupy.RawModule(path=path, **cooperative), lowered
    debug_report(f"cuda: {_nvrtc.unavailable_reason()}; CuPy compiles {source} (subnormals "
                 f"flush to zero)")
    module = cupy.RawModule(code=catalog.read_source(source), options=catalog.compile_options(),
                            name_expressions=catalog.name_expressions(source, dtype_key),
                            **cooperative)
    return module, {}


__all__ = ["CudaBackend", "CUDA_COMPILE_OPTIONS", "build_cubin", "cuda_compile_options"]

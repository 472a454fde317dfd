"""The GPU side: device description, peak bandwidth and CUDA-event timing.

gpubn's ``cuda`` backend is timed with ``cupyx.profiler.benchmark`` (CUDA
events around each call on the current stream: device time, launch
overheads included); PyTorch CUDA with ``torch.cuda.Event`` pairs.  Achieved
GB/s is the op's minimum bytes moved (:mod:`bench.metrics`) over the median
time, and its share of the device-to-device copy bandwidth measured in the
same run (:func:`copy_bandwidth`: the practical ceiling of a kernel that
reads and writes each byte once) and of the device's theoretical peak,
``2 * memory clock * bus width / 8``, read from the device attributes
(``cudaDevAttrMemoryClockRate`` in kHz and ``cudaDevAttrGlobalMemoryBusWidth``
in bits; CUDA 13 dropped ``memoryClockRate`` from the properties struct, the
attribute query works on every version).

Nothing here is imported at module level that needs a GPU: the parts that
can be checked without one (parsing attributes, peak, timer result handling)
are plain functions with tests.
"""

from __future__ import annotations

import importlib
from typing import Dict, List, Optional

import numpy as np

from .metrics import peak_bandwidth
from .providers import GpubnProvider, TorchProvider

# cudaDeviceAttr values (driver_types.h), stable across CUDA versions.
ATTR_MULTIPROCESSOR_COUNT = 16
ATTR_MEMORY_CLOCK_RATE = 36
ATTR_GLOBAL_MEMORY_BUS_WIDTH = 37


def gpu_unavailable_reason() -> Optional[str]:
    """None when CuPy sees a CUDA device, else why not."""
    try:
        cupy = importlib.import_module("cupy")
    except Exception as exc:
        return f"CuPy is not installed ({type(exc).__name__}: {exc})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return f"no CUDA device ({type(exc).__name__}: {exc})"
    if n < 1:
        return "no CUDA device"
    return None


def describe_device(name: str, attributes: Dict[int, int]) -> Dict:
    """Device description from its name and attribute values keyed by the
    ``cudaDeviceAttr`` numbers above.  ``peak_gbps`` is None when the clock
    or bus width is missing or zero."""
    clock = attributes.get(ATTR_MEMORY_CLOCK_RATE)
    width = attributes.get(ATTR_GLOBAL_MEMORY_BUS_WIDTH)
    peak = None
    if clock and width:
        peak = peak_bandwidth(clock, width) / 1e9
    return {
        "name": name,
        "sm_count": attributes.get(ATTR_MULTIPROCESSOR_COUNT),
        "memory_clock_khz": clock,
        "bus_width_bits": width,
        "peak_gbps": peak,
    }


def device_info(device_id: int = 0) -> Dict:
    """Description of CUDA device ``device_id`` (needs CuPy and a GPU)."""
    cupy = importlib.import_module("cupy")
    rt = cupy.cuda.runtime
    props = rt.getDeviceProperties(device_id)
    name = props.get("name", b"?")
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    attrs = {}
    for attr in (ATTR_MULTIPROCESSOR_COUNT, ATTR_MEMORY_CLOCK_RATE, ATTR_GLOBAL_MEMORY_BUS_WIDTH):
        try:
            attrs[attr] = int(rt.deviceGetAttribute(attr, device_id))
        except Exception:
            attrs[attr] = None
    info = describe_device(name, attrs)
    info["cuda_runtime"] = rt.runtimeGetVersion()
    info["driver"] = rt.driverGetVersion()
    return info


def times_from_benchmark(result) -> List[float]:
    """Per-call device seconds from a ``cupyx.profiler.benchmark`` result
    (``gpu_times`` has shape (devices, repeats); the first device is the one
    the benchmark ran on)."""
    t = np.asarray(result.gpu_times, dtype=np.float64)
    if t.ndim == 2:
        t = t[0]
    if t.ndim != 1 or t.size == 0:
        raise ValueError(f"unexpected gpu_times shape {np.shape(result.gpu_times)}")
    return [float(v) for v in t]


def cupy_timer(fn, repeats: int, warmup: int) -> List[float]:
    from cupyx.profiler import benchmark
    return times_from_benchmark(benchmark(fn, n_repeat=repeats, n_warmup=max(warmup, 1)))


class GpubnCudaProvider(GpubnProvider):
    """gpubn's cuda backend on CuPy arrays, timed with CUDA events."""

    def __init__(self):
        super().__init__("cuda")

    def unavailable_reason(self):
        reason = gpu_unavailable_reason()
        return reason or super().unavailable_reason()

    def timer(self, fn, repeats, warmup):
        return cupy_timer(fn, repeats, warmup)

    def versions(self):
        v = super().versions()
        try:
            v["cupy"] = importlib.import_module("cupy").__version__
        except Exception:
            pass
        return v


class TorchCudaProvider(TorchProvider):
    """PyTorch on the GPU with cuDNN enabled (its default: cuDNN's batch norm
    where PyTorch picks it; for a channels-last input in training, ATen asks
    for cuDNN's persistent mode, ``CUDNN_BATCHNORM_SPATIAL_PERSISTENT``, so
    the NHWC training rows of ``torch-cuda`` time it) or disabled
    (``torch.backends.cudnn.enabled = False``: PyTorch's native CUDA
    kernels).  The epilogue ops run PyTorch's unfused sequence under either
    flag (batch norm, in-place add, in-place ReLU).  The flag is set around every
    call, the forward that ``prepare`` runs for a backward included, so the
    backward autograd runs matches the forward."""

    def __init__(self, cudnn: bool):
        super().__init__("gpu")
        self.cudnn = bool(cudnn)
        self.name = "torch-cuda" if self.cudnn else "torch-cuda-native"
        self.note = ("cuDNN enabled (PyTorch's default; channels-last training: its "
                     "persistent mode)" if self.cudnn
                     else "torch.backends.cudnn.enabled = False (native kernels)")

    def _with_flag(self, fn):
        cudnn = importlib.import_module("torch").backends.cudnn
        want = self.cudnn

        def call():
            before = cudnn.enabled
            cudnn.enabled = want
            try:
                return fn()
            finally:
                cudnn.enabled = before
        return call

    def prepare(self, setup, op):
        # a backward's forward runs here, under the same flag as the calls
        fn = self._with_flag(lambda: super(TorchCudaProvider, self).prepare(setup, op))()
        return self._with_flag(fn)


def copy_bandwidth(nbytes: int = 1 << 29, repeats: int = 20) -> Dict:
    """Device-to-device copy bandwidth of the current device, measured with
    CuPy: ``nbytes`` (default 512 MiB, far above any L2) copied by
    ``cudaMemcpyAsync`` and by CuPy's elementwise copy kernel, CUDA-event
    medians.  GB/s counts the read and the write (``2 * nbytes / time``), as
    every GB/s of the benchmark counts bytes read plus bytes written;
    ``copy_gbps`` is the faster of the two."""
    cupy = importlib.import_module("cupy")
    n = nbytes // 4
    src = cupy.ones(n, dtype=cupy.float32)
    dst = cupy.zeros_like(src)
    stream = cupy.cuda.get_current_stream()

    def memcpy():
        dst.data.copy_from_device_async(src.data, n * 4, stream)

    def kernel():
        cupy.copyto(dst, src)

    out = {"copy_bytes": n * 4}
    for name, fn in (("memcpy_gbps", memcpy), ("copy_kernel_gbps", kernel)):
        t = float(np.median(cupy_timer(fn, repeats, 3)))
        out[name] = 2 * n * 4 / t / 1e9
    out["copy_gbps"] = max(out["memcpy_gbps"], out["copy_kernel_gbps"])
    src = dst = None                  # drop the buffers before freeing the pool
    cupy.get_default_memory_pool().free_all_blocks()
    return out


def add_copy_share(rows: List[Dict], copy_gbps: Optional[float]) -> None:
    """Give every measured GPU row ``copy_gbps`` and ``copy_share`` (its GB/s
    over the copy bandwidth measured in the same run)."""
    if not copy_gbps:
        return
    for r in rows:
        if r.get("device") == "gpu" and r.get("gbps"):
            r["copy_gbps"] = copy_gbps
            r["copy_share"] = r["gbps"] / copy_gbps


def gpu_providers():
    """The GPU line-up: PyTorch CUDA with cuDNN and with its native kernels
    (the peers: ratios are to the faster of the two) and gpubn's cuda
    backend."""
    return [TorchCudaProvider(cudnn=True), TorchCudaProvider(cudnn=False), GpubnCudaProvider()]

"""The GPU side: device description, peak bandwidth and CUDA-event timing.

gpubn's ``cuda`` backend is timed with ``cupyx.profiler.benchmark`` (CUDA
events around each call on the current stream: device time, launch
overheads included); PyTorch CUDA with ``torch.cuda.Event`` pairs.  Achieved
GB/s is the op's minimum bytes moved (:mod:`bench.metrics`) over the median
time, and its share of the device's theoretical peak,
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


def gpu_providers():
    """The GPU line-up: PyTorch CUDA (the peer) and gpubn's cuda backend."""
    return [TorchProvider("gpu"), GpubnCudaProvider()]

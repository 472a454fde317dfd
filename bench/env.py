"""What machine and which versions produced a set of results."""

from __future__ import annotations

import importlib
import os
import platform
from typing import Dict, Optional


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> Optional[str]:
    try:
        return importlib.import_module(module).__version__
    except Exception:
        return None


def _loadavg():
    """1-minute load average when the run started: other work on the machine
    skews timings (PyTorch's worker threads suffer most)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def allocator_env() -> Dict[str, str]:
    """The environment variables that change how the C allocator keeps or
    gives back freed memory (glibc's ``MALLOC_*_`` and ``GLIBC_TUNABLES``, a
    preloaded allocator): on the CPU, whether a fresh output faults in new
    pages on every call, and so the times, depend on them.  Workers inherit
    them."""
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD")}


def transparent_hugepages(path: str = "/sys/kernel/mm/transparent_hugepage/enabled"
                          ) -> Optional[str]:
    """Linux's transparent huge page mode (``always``, ``madvise`` or
    ``never``), or None where there is none.  Under ``madvise`` only memory
    asked for gets 2 MiB pages: NumPy asks for its arrays of 4 MiB and more,
    PyTorch does not for its tensors, whose page faults and TLB misses then
    weigh on its times."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def describe_allocator(env: Optional[Dict[str, str]]) -> str:
    """One line for a results header: the C allocator's settings."""
    if not env:
        return "the C library's defaults"
    return ", ".join(f"{k}={v}" for k, v in env.items())


def describe_memory(machine: Dict) -> str:
    """The results header's line on memory: the allocator's settings and the
    huge page mode of a :func:`machine_info` record."""
    return (f"allocator: {describe_allocator(machine.get('allocator_env'))}; "
            f"transparent huge pages: {machine.get('transparent_hugepages')}")


def machine_info(gpu: Optional[Dict] = None) -> Dict:
    """Machine, CPU and library versions; ``gpu`` (from
    :func:`bench.gpu.device_info`) is included when given."""
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "loadavg": _loadavg(),
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "torch": _version("torch"),
        "gpubn": _version("gpubn"),
        "cupy": _version("cupy"),
        "allocator_env": allocator_env(),
        "transparent_hugepages": transparent_hugepages(),
    }
    try:
        torch = importlib.import_module("torch")
        info["torch_threads"] = torch.get_num_threads()
    except Exception:
        info["torch_threads"] = None
    if gpu:
        info["gpu"] = gpu
    return info

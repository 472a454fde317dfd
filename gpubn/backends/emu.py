"""The ``emu`` backend: the CUDA kernels of ``kernels/`` run on the CPU by
``gpubn.emu`` (a SIMT emulator with memcheck, racecheck and traffic counts),
on NumPy arrays, with the very launch sequence the ``cuda`` backend uses
(``gpubn.backends.kernel_backend``).

Launches are configured for ``gpubn.launch.EMU_DEVICE`` (a 132-SM GPU) with a
smaller default ``Tuning`` than a GPU's (64-thread reduction blocks, channels
split after 2 values per thread) so that small test shapes already take the
multi-block, two-stage paths.  ``launch_log`` / ``clear_launch_log`` /
``recording`` report what each launch moved.
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np

from .. import kernels as catalog
from ..launch import EMU_DEVICE, DeviceAttributes, Tuning
from .kernel_backend import KernelBackend, debug_report

try:  # the emulator is part of the package; its C++ compiler may be missing
    from ..emu import clear_launch_log, launch_log, recording
except ImportError:  # pragma: no cover - only while the emulator is absent
    launch_log = clear_launch_log = recording = None

EMU_TUNING = Tuning(reduce_threads=64, map_threads=128, min_units_per_thread=2)


@functools.lru_cache(maxsize=None)
def _module(source: str, dtype_key: str):
    from ..emu import RawModule

    return RawModule(code=catalog.read_source(source), options=catalog.compile_options(),
                     name_expressions=catalog.name_expressions(source, dtype_key))


class EmuBackend(KernelBackend):
    name = "emu"
    xp = np

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        try:
            from .. import emu
        except ImportError as exc:
            return f"the emulator could not be imported ({exc})"
        probe = getattr(emu, "unavailable_reason", None)
        if probe is not None:
            return probe()
        try:
            from ..emu.compiler import find_compiler

            find_compiler()
        except Exception as exc:  # no C++ compiler
            return f"no C++ compiler for the emulator ({exc})"
        return None

    def default_tuning(self) -> Tuning:
        return EMU_TUNING

    def device_attributes(self) -> DeviceAttributes:
        return EMU_DEVICE

    def _get_function(self, source: str, dtype_key: str, name: str):
        module = _module(source, dtype_key)
        return module.get_function(name)

    def _address(self, a) -> int:
        return a.ctypes.data

    def _zeroed_counters(self, n: int):
        # fresh per launch: a launch aborted by a check cannot leave stale counts
        return np.zeros(n, dtype=np.uint32)


__all__ = ["EmuBackend", "EMU_TUNING", "launch_log", "clear_launch_log", "recording",
           "debug_report"]

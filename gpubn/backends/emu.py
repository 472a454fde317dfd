"""The ``emu`` backend: the CUDA kernels of ``kernels/`` run on the CPU by
``gpubn.emu`` (a SIMT emulator with memcheck, racecheck and traffic counts),
on NumPy arrays, with the very launch sequence the ``cuda`` backend uses
(``gpubn.backends.kernel_backend``), workspaces and their zeroing included.

Launches are configured for ``gpubn.launch.EMU_DEVICE`` (a 132-SM GPU) with a
smaller default ``Tuning`` than a GPU's (64-thread reduction blocks, channels
split after 2 values per thread) so that small test shapes already take the
multi-block, two-stage paths.  After every launch the arrival counters must be
zero again (the kernels' contract: the last block resets its counter); a
counter left behind raises ``gpubn.emu.KernelError``.  ``gpubn.emu.recording``
reports what each launch moved.
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np

from .. import kernels as catalog
from ..launch import EMU_DEVICE, DeviceAttributes, Tuning
from .kernel_backend import KernelBackend

EMU_TUNING = Tuning(reduce_threads=64, map_threads=128, min_units_per_thread=2)


@functools.lru_cache(maxsize=None)
def _module(source: str, dtype_key: str):
    from ..emu import RawModule

    return RawModule(code=catalog.read_source(source), options=catalog.compile_options(),
                     name_expressions=catalog.name_expressions(source, dtype_key),
                     enable_cooperative_groups=source in catalog.COOPERATIVE_SOURCES)


class ArrivalCounters(np.ndarray):
    """The arrival counters of one launch (a uint32 array), marked so that the
    backend can check after the launch that the kernel left them zero."""


class EmuBackend(KernelBackend):
    name = "emu"
    xp = np

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        from .. import emu

        return emu.unavailable_reason()

    def default_tuning(self) -> Tuning:
        return EMU_TUNING

    def device_attributes(self) -> DeviceAttributes:
        return EMU_DEVICE

    def _get_function(self, source: str, dtype_key: str, name: str):
        return _module(source, dtype_key).get_function(name)

    def _address(self, a) -> int:
        return a.ctypes.data

    def _launch_counters(self, n: int):
        return super()._launch_counters(n).view(ArrivalCounters)

    def _launch(self, cfg, dtype_key: str, args, shared_mem: int = 0) -> None:
        super()._launch(cfg, dtype_key, args, shared_mem)
        for a in args:
            if isinstance(a, ArrivalCounters) and a.any():
                from ..emu import KernelError

                bad = np.flatnonzero(a)
                raise KernelError(
                    f"kernel {cfg.kernel!r} left {bad.size} of {a.size} arrival counters non-zero "
                    f"(counter {bad[0]} = {a[bad[0]]}): the last block of a two-stage reduction "
                    f"must reset its counter, or the next launch reusing the workspace miscounts",
                    cfg.kernel, None)


__all__ = ["EmuBackend", "EMU_TUNING", "ArrivalCounters"]

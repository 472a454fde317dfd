"""Exceptions raised by the emu backend.  All derive from :class:`EmuError`."""

from __future__ import annotations


class EmuError(RuntimeError):
    """Base class of every error the emu backend raises about a kernel."""


class EmuCompileError(EmuError):
    """The source could not be compiled, or uses a construct emu refuses.

    ``log`` holds the compiler's output (empty for refused constructs).
    """

    def __init__(self, message: str, log: str = ""):
        super().__init__(message)
        self.log = log


class LaunchError(EmuError, ValueError):
    """The launch was refused before any thread ran, as the CUDA driver would
    refuse it: ``cuda_error`` is the CUDA error name (``CUDA_ERROR_INVALID_VALUE``,
    ``CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE``, ...), which the message starts with."""

    def __init__(self, message: str, cuda_error: str):
        super().__init__(f"{cuda_error}: {message}")
        self.cuda_error = cuda_error


class KernelError(EmuError):
    """A kernel did something invalid at run time.

    Attributes: ``kernel`` (name expression), ``block`` and ``thread``
    (``(x, y, z)`` tuples; ``thread`` is ``None`` when no single thread is at fault).
    """

    def __init__(self, message: str, kernel: str, block, thread=None):
        super().__init__(message)
        self.kernel = kernel
        self.block = block
        self.thread = thread


class MemcheckError(KernelError):
    """A load or store outside the launch's argument buffers, shared memory and
    the thread's own stack (or past the end of a buffer).

    Extra attributes: ``access`` (``"load"`` or ``"store"``), ``size`` (bytes),
    ``address``, ``buffer`` (argument index of the nearest argument buffer, or
    ``None``) and ``offset`` (the address minus that buffer's start; negative
    below it).
    """

    def __init__(self, message, kernel, block, thread, access, size, address, buffer, offset):
        super().__init__(message, kernel, block, thread)
        self.access = access
        self.size = size
        self.address = address
        self.buffer = buffer
        self.offset = offset


class RaceError(KernelError):
    """Two threads of a block accessed the same shared-memory byte, at least one
    of them writing, with no ``__syncthreads()`` (or, within a warp,
    ``__syncwarp()``) between them.

    Or (``memory == "global"``, an inter-block race) two blocks accessed a byte
    of an argument buffer, the earlier one storing it, with no release/acquire
    chain (fence, atomic; atomic, fence) between them.

    Extra attributes: ``other_thread`` and ``other_block`` (the earlier access),
    ``access`` and ``other_access`` (``"load"``/``"store"``), ``memory``
    (``"dynamic shared"``, ``"static shared"`` or ``"global"``), ``offset`` (byte
    offset in dynamic shared memory or in the argument buffer, or of the byte
    within the module for static shared memory), ``buffer`` (the argument index,
    global races) and ``variable`` (the static ``__shared__`` variable's name when
    it can be found, else ``None``).
    """

    def __init__(self, message, kernel, block, thread, other_thread, access, other_access, memory, offset,
                 variable=None, other_block=None, buffer=None):
        super().__init__(message, kernel, block, thread)
        self.other_thread = other_thread
        self.other_block = block if other_block is None else other_block
        self.buffer = buffer
        self.access = access
        self.other_access = other_access
        self.memory = memory
        self.offset = offset
        self.variable = variable


class DeadlockError(KernelError):
    """The threads of a block can make no progress: a barrier some threads never
    reach (they exited, or wait at another barrier or warp collective)."""


__all__ = ["EmuError", "EmuCompileError", "LaunchError", "KernelError", "MemcheckError", "RaceError", "DeadlockError"]

"""NVRTC through ctypes: compile CUDA C++ to PTX with no GPU and no driver.

CuPy's ``compile_using_nvrtc`` asks the driver for the current device, so it
cannot run on a machine without one.  This module talks to the NVRTC shared
library directly: the pip package ``nvidia-cuda-nvrtc`` (CUDA 13 layout
``nvidia/cu13/lib``, CUDA 12 layout ``nvidia/cuda_nvrtc/lib``), a CUDA
toolkit (``CUDA_PATH`` / ``CUDA_HOME``), or the system library path.  Used by
the compile test and available to anyone checking kernels offline.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

_NVRTC_SUCCESS = 0


class NvrtcNotFound(RuntimeError):
    """No NVRTC shared library could be loaded."""


class NvrtcError(RuntimeError):
    """An NVRTC call failed; ``log`` holds the compiler log when there is one."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(message + (f"\n{log}" if log else ""))
        self.log = log


def _candidates():
    env = os.environ.get("GPUBN_NVRTC")
    if env:
        yield env
    for entry in sys.path:
        if not entry or not os.path.isdir(os.path.join(entry, "nvidia")):
            continue
        for pattern in ("nvidia/cu*/lib/libnvrtc.so*", "nvidia/cuda_nvrtc/lib/libnvrtc.so*",
                        "nvidia/cu*/bin/nvrtc64_*.dll", "nvidia/cuda_nvrtc/bin/nvrtc64_*.dll"):
            for path in sorted(glob.glob(os.path.join(entry, pattern)), reverse=True):
                if "builtins" not in os.path.basename(path) and "alt" not in os.path.basename(path):
                    yield path
    for var in ("CUDA_PATH", "CUDA_HOME"):
        root = os.environ.get(var)
        if root:
            yield from sorted(glob.glob(os.path.join(root, "lib64", "libnvrtc.so*")), reverse=True)
    found = ctypes.util.find_library("nvrtc")
    if found:
        yield found
    yield "libnvrtc.so"


_LIB = None


def load_library():
    """The loaded NVRTC library (cached); raises ``NvrtcNotFound``."""
    global _LIB
    if _LIB is not None:
        return _LIB
    tried = []
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
            lib.nvrtcVersion  # noqa: B018 -- make sure it is NVRTC
        except (OSError, AttributeError):
            tried.append(path)
            continue
        _declare(lib)
        _LIB = lib
        return lib
    raise NvrtcNotFound(
        "the NVRTC library was not found (install the 'nvidia-cuda-nvrtc' package, or set "
        "GPUBN_NVRTC to the path of libnvrtc); tried: " + ", ".join(tried))


def _declare(lib):
    c_char_pp = ctypes.POINTER(ctypes.c_char_p)
    p = ctypes.c_void_p
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    lib.nvrtcGetErrorString.argtypes = [ctypes.c_int]
    lib.nvrtcVersion.argtypes = [ctypes.POINTER(ctypes.c_int)] * 2
    lib.nvrtcCreateProgram.argtypes = [ctypes.POINTER(p), ctypes.c_char_p, ctypes.c_char_p,
                                       ctypes.c_int, c_char_pp, c_char_pp]
    lib.nvrtcDestroyProgram.argtypes = [ctypes.POINTER(p)]
    lib.nvrtcAddNameExpression.argtypes = [p, ctypes.c_char_p]
    lib.nvrtcCompileProgram.argtypes = [p, ctypes.c_int, c_char_pp]
    lib.nvrtcGetProgramLogSize.argtypes = [p, ctypes.POINTER(ctypes.c_size_t)]
    lib.nvrtcGetProgramLog.argtypes = [p, ctypes.c_char_p]
    lib.nvrtcGetPTXSize.argtypes = [p, ctypes.POINTER(ctypes.c_size_t)]
    lib.nvrtcGetPTX.argtypes = [p, ctypes.c_char_p]
    lib.nvrtcGetCUBINSize.argtypes = [p, ctypes.POINTER(ctypes.c_size_t)]
    lib.nvrtcGetCUBIN.argtypes = [p, ctypes.c_char_p]
    lib.nvrtcGetLoweredName.argtypes = [p, ctypes.c_char_p, c_char_pp]
    for name in ("nvrtcVersion", "nvrtcCreateProgram", "nvrtcDestroyProgram",
                 "nvrtcAddNameExpression", "nvrtcCompileProgram", "nvrtcGetProgramLogSize",
                 "nvrtcGetProgramLog", "nvrtcGetPTXSize", "nvrtcGetPTX", "nvrtcGetLoweredName",
                 "nvrtcGetCUBINSize", "nvrtcGetCUBIN"):
        getattr(lib, name).restype = ctypes.c_int


def _check(lib, status: int, what: str):
    if status != _NVRTC_SUCCESS:
        raise NvrtcError(f"{what} failed: {lib.nvrtcGetErrorString(status).decode()}")


def version() -> Tuple[int, int]:
    lib = load_library()
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(lib, lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


@dataclass
class CompileResult:
    ptx: str                      # empty for a cubin compile
    log: str                      # empty when NVRTC had nothing to say
    lowered_names: Dict[str, str]  # name expression -> mangled kernel name
    cubin: bytes = b""            # with compile_to_cubin


def compile_to_ptx(source: str, name_expressions: Sequence[str] = (),
                   options: Sequence[str] = (), filename: str = "kernel.cu") -> CompileResult:
    """Compile ``source`` with NVRTC; raise ``NvrtcError`` (with the log) on failure."""
    return _compile(source, name_expressions, options, filename, cubin=False)


def compile_to_cubin(source: str, name_expressions: Sequence[str] = (),
                     options: Sequence[str] = (), filename: str = "kernel.cu") -> CompileResult:
    """Compile ``source`` to a cubin (``options`` must name a real
    architecture, ``--gpu-architecture=sm_XX``): machine code any driver of
    that architecture loads, whatever PTX version it understands."""
    return _compile(source, name_expressions, options, filename, cubin=True)


def _compile(source, name_expressions, options, filename, cubin: bool) -> CompileResult:
    lib = load_library()
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), filename.encode(),
                                       0, None, None), "nvrtcCreateProgram")
    try:
        for name in name_expressions:
            _check(lib, lib.nvrtcAddNameExpression(prog, name.encode()),
                   f"nvrtcAddNameExpression({name!r})")
        opts = [o.encode() for o in options]
        arr = (ctypes.c_char_p * len(opts))(*opts)
        status = lib.nvrtcCompileProgram(prog, len(opts), arr)
        log = _program_log(lib, prog)
        if status != _NVRTC_SUCCESS:
            raise NvrtcError(f"NVRTC could not compile {filename} "
                             f"({lib.nvrtcGetErrorString(status).decode()})", log)
        size = ctypes.c_size_t()
        if cubin:
            _check(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
            buf = ctypes.create_string_buffer(size.value)
            _check(lib, lib.nvrtcGetCUBIN(prog, buf), "nvrtcGetCUBIN")
        else:
            _check(lib, lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
            buf = ctypes.create_string_buffer(size.value)
            _check(lib, lib.nvrtcGetPTX(prog, buf), "nvrtcGetPTX")
        lowered = {}
        for name in name_expressions:
            out = ctypes.c_char_p()
            _check(lib, lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(out)),
                   f"nvrtcGetLoweredName({name!r})")
            lowered[name] = out.value.decode()
        if cubin:
            return CompileResult("", log, lowered, buf.raw[:size.value])
        return CompileResult(buf.value.decode(), log, lowered)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _program_log(lib, prog) -> str:
    size = ctypes.c_size_t()
    if lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)) != _NVRTC_SUCCESS or size.value <= 1:
        return ""
    buf = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, buf)
    return buf.value.decode(errors="replace").strip()


def unavailable_reason() -> Optional[str]:
    try:
        load_library()
    except NvrtcNotFound as exc:
        return str(exc)
    return None


__all__ = ["NvrtcError", "NvrtcNotFound", "CompileResult", "compile_to_ptx", "compile_to_cubin",
           "load_library",
           "unavailable_reason", "version"]

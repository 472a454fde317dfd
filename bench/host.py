"""Host-side yardsticks measured in the same run as the CPU suite.

* :func:`copy_bandwidth`: bytes per second of a large NumPy copy (read +
  write), the memory-bandwidth floor the CPU rows' ``peak_share`` is taken
  against (``bytes of the minimum passes / time`` over this).
* :func:`loop_copy_bandwidth`: the same copy as a compiled loop on the
  ``cpu`` backend's threads, walking memory in order as its loops do: the
  second yardstick of the CPU rows (``loop_share``).  glibc copies arrays
  this large with its own scheme (non-temporal stores, several pages read
  at once), which a loop over memory in order does not reach.
* :func:`yardsticks`: both, as the keyword arguments of a row.
* :func:`cpu_first_call`: what the ``cpu`` backend's first call costs in a
  new process, compiling (empty cache directory) and loading the compiled
  loops from the disk cache.
* :func:`torch_after_cpu`: PyTorch's time for one op alone and right after a
  ``cpu`` backend call in the same process (threads left spinning by the
  backend would slow it down).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, Optional

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 7,
                   copy: Callable = np.copyto) -> float:
    """Median bytes/s (read + write) of ``copy(dst, src)`` (NumPy's copy
    unless given) between two arrays of ``nbytes`` each, pages touched
    beforehand."""
    src = np.ones(nbytes // 8)
    dst = np.zeros_like(src)
    copy(dst, src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        copy(dst, src)
        times.append(time.perf_counter() - t0)
    return 2 * src.nbytes / float(np.median(times))


@functools.lru_cache(maxsize=None)
def _copy_loop() -> Callable:
    """``copy(dst, src)``: a parallel loop over blocks of the ``cpu``
    backend's size, on its threading layer and thread count (ImportError
    without Numba)."""
    from gpubn.backends import cpu      # its threading layer, before Numba starts threads
    import numba

    @numba.njit(parallel=True)
    def loop(dst, src, block):
        for b in numba.prange(-(-src.size // block)):
            for i in range(b * block, min(src.size, (b + 1) * block)):
                dst[i] = src[i]

    def copy(dst, src):
        numba.set_num_threads(cpu.num_threads())
        loop(dst, src, cpu._BLOCK)

    return copy


def loop_copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 7) -> Optional[float]:
    """:func:`copy_bandwidth` of the copy done by a compiled loop
    (:func:`_copy_loop`); None without Numba."""
    try:
        copy = _copy_loop()
    except ImportError:
        return None
    return copy_bandwidth(nbytes, repeats, copy)


def yardsticks(nbytes: int = 256 << 20, repeats: int = 7) -> Dict[str, Optional[float]]:
    """The CPU rows' two floors measured now: ``peak_bytes_per_s``
    (:func:`copy_bandwidth`) and ``loop_bytes_per_s``
    (:func:`loop_copy_bandwidth`)."""
    return {"peak_bytes_per_s": copy_bandwidth(nbytes, repeats),
            "loop_bytes_per_s": loop_copy_bandwidth(nbytes, repeats)}


# The bench's first call: 524K values, past the serial limit, so the
# threaded loops compile too.
FIRST_CALL_SHAPE = (16, 32, 32, 32)

_FIRST_CALL = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np, gpubn
t1 = time.perf_counter()
shape = tuple(json.loads(sys.argv[2]))
x = np.random.default_rng(0).standard_normal(shape).astype(sys.argv[1])
y, saved = gpubn.batch_norm_forward(x, backend="cpu")
gpubn.batch_norm_backward(x, saved)
t2 = time.perf_counter()
y, saved = gpubn.batch_norm_forward(x, backend="cpu")
gpubn.batch_norm_backward(x, saved)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_s": t2 - t1, "second_s": t3 - t2}))
"""


def _run_first_call(cache: str, dtype: str, shape) -> Dict[str, float]:
    env = dict(os.environ, GPUBN_CACHE_DIR=cache)
    env["PYTHONPATH"] = os.pathsep.join([_ROOT] + [v for v in [env.get("PYTHONPATH")] if v])
    out = subprocess.run([sys.executable, "-c", _FIRST_CALL, dtype, json.dumps(list(shape))],
                         env=env, cwd=_ROOT, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr else "failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_first_call(dtype: str = "float32",
                   shape=FIRST_CALL_SHAPE) -> Optional[Dict[str, float]]:
    """Seconds of the first batch-norm forward + backward of an input of
    ``shape`` on the ``cpu`` backend in a new process (which loops it
    compiles depends on the shape: small inputs run on the calling thread
    only): ``compile_s`` with an empty cache directory,
    ``cached_s`` with the one that run filled, ``steady_s`` a second call.
    None when the backend cannot run here."""
    try:
        from gpubn.backends import get_backend
        get_backend("cpu")
    except RuntimeError:
        return None
    with tempfile.TemporaryDirectory(prefix="gpubn-jit-") as cache:
        cold = _run_first_call(cache, dtype, shape)
        warm = _run_first_call(cache, dtype, shape)
    return {"compile_s": cold["first_s"], "cached_s": warm["first_s"],
            "steady_s": warm["second_s"], "import_s": warm["import_s"]}


def torch_after_cpu(shape=(32, 64, 56, 56), repeats: int = 9) -> Optional[Dict[str, float]]:
    """Median seconds of PyTorch's CPU batch-norm forward alone and right
    after a ``cpu`` backend forward, in this process, and the threading
    layer those forwards ran on."""
    try:
        import torch
        import gpubn
        from gpubn.backends import get_backend
        get_backend("cpu")
    except (ImportError, RuntimeError):
        return None
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    xt = torch.from_numpy(x)

    def torch_fwd():
        t0 = time.perf_counter()
        torch.nn.functional.batch_norm(xt, None, None, training=True)
        return time.perf_counter() - t0

    gpubn.batch_norm_forward(x, backend="cpu")
    torch_fwd()
    alone = [torch_fwd() for _ in range(repeats)]
    after = []
    for _ in range(repeats):
        gpubn.batch_norm_forward(x, backend="cpu")
        after.append(torch_fwd())
    import numba
    return {"alone_s": float(np.median(alone)), "after_cpu_s": float(np.median(after)),
            "threading_layer": numba.threading_layer()}

"""Checking options (module-wide defaults and a context manager) and the launch log."""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field, replace
from typing import Dict, List, NamedTuple, Optional, Tuple


@dataclass(frozen=True)
class Device:
    """The GPU whose limits emu enforces (default: H100 / H200, compute capability 9.0).

    ``registers_per_thread`` stands in for the register count ptxas would give a
    kernel, which emu cannot know (every function reports it as ``num_regs``);
    it enters only co-residency: the cooperative-launch check, and the launch
    plan of the read-once kernels, which sizes their grids from it.  Shared
    memory per block is at most ``default_shared_per_block`` (static +
    dynamic) unless the function opts in through
    ``Function.max_dynamic_shared_size_bytes``, and then at most
    ``max_shared_per_block``; each resident block also costs
    ``reserved_shared_per_block`` of the SM's ``shared_per_sm``.
    """

    name: str = "H100/H200 (sm_90)"
    sm_count: int = 132
    max_threads_per_block: int = 1024
    max_block: Tuple[int, int, int] = (1024, 1024, 64)
    max_grid: Tuple[int, int, int] = (2**31 - 1, 65535, 65535)
    default_shared_per_block: int = 48 * 1024
    max_shared_per_block: int = 227 * 1024
    shared_per_sm: int = 228 * 1024
    reserved_shared_per_block: int = 1024
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    registers_per_sm: int = 65536
    registers_per_thread: int = 64
    max_param_bytes: int = 32764


DEVICE = Device()


@dataclass(frozen=True)
class Options:
    """What each launch checks.

    memcheck: every load/store is checked against the argument buffers, shared
        memory and the thread's own stack.
    racecheck: shared-memory hazards between threads of a block are reported.
    initcheck: a load of shared memory that no thread of the block has written
        (not one byte of it) is reported (needs racecheck, which keeps the
        per-byte shadow state).
    seed: ``None`` starts blocks in order and interleaves the running ones
        round robin; an int shuffles the order in which the blocks of every
        launch start and picks the next running block at random (same seed,
        same schedule).
    global_racecheck: inter-block races in global memory are reported (needs
        racecheck, which keeps the shadow state; racecheck off turns off both).
        Off, they are not reported but their effect is modelled, as a GPU may
        show it: a load that races with another block's store returns, half of
        the time as drawn from the seed, the value the bytes held before that
        store.
    """

    memcheck: bool = True
    racecheck: bool = True
    initcheck: bool = True
    seed: Optional[int] = None
    global_racecheck: bool = True


def _env_seed() -> Optional[int]:
    raw = os.environ.get("GPUBN_EMU_SEED", "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"GPUBN_EMU_SEED must be an integer, got {raw!r}") from None


_lock = threading.Lock()
_defaults = Options(seed=_env_seed())
_local = threading.local()


def _check(kwargs) -> dict:
    out = {}
    for key, value in kwargs.items():
        if key in ("memcheck", "racecheck", "initcheck", "global_racecheck"):
            if not isinstance(value, bool):
                raise TypeError(f"{key} must be a bool, got {type(value).__name__}")
        elif key == "seed":
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"seed must be an int or None, got {type(value).__name__}")
            if value is not None and not 0 <= value < 2**63:
                raise ValueError(f"seed must be in [0, 2**63), got {value}")
        else:
            raise TypeError(f"unknown emu option {key!r} (known: memcheck, racecheck, initcheck, "
                            f"global_racecheck, seed)")
        out[key] = value
    return out


def get_options() -> Options:
    """The options in effect for launches from this thread."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else _defaults


def set_options(**kwargs) -> Options:
    """Change the module-wide defaults (``memcheck``, ``racecheck``, ``initcheck``,
    ``global_racecheck``, ``seed``);
    returns the previous defaults."""
    global _defaults
    checked = _check(kwargs)
    with _lock:
        previous = _defaults
        _defaults = replace(_defaults, **checked)
    return previous


@contextlib.contextmanager
def options(**kwargs):
    """Override options for launches made inside the ``with`` block (this thread)."""
    checked = _check(kwargs)
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(replace(get_options(), **checked))
    try:
        yield stack[-1]
    finally:
        stack.pop()


class Traffic(NamedTuple):
    """Bytes a launch loaded from and stored to one argument buffer."""

    loaded: int
    stored: int


@dataclass
class LaunchRecord:
    """One kernel launch: configuration and global-memory traffic.

    ``bytes_loaded``/``bytes_stored`` count every access to an argument buffer
    (atomics count as a load and a store); ``buffers`` maps argument index ->
    :class:`Traffic` for each array argument and ``sizes`` argument index ->
    the array's size in bytes (so traffic can be stated in passes over it).
    """

    kernel: str
    grid: Tuple[int, int, int]
    block: Tuple[int, int, int]
    shared_mem: int
    bytes_loaded: int
    bytes_stored: int
    buffers: Dict[int, Traffic] = field(default_factory=dict)
    label: Optional[str] = None
    sizes: Dict[int, int] = field(default_factory=dict)

    @property
    def bytes_moved(self) -> int:
        return self.bytes_loaded + self.bytes_stored


_log: List[LaunchRecord] = []
_recorders: List[List[LaunchRecord]] = []


def _record(rec: LaunchRecord) -> None:
    labels = getattr(_local, "labels", None)
    if labels:
        rec.label = labels[-1]
    with _lock:
        _log.append(rec)
        for r in _recorders:
            r.append(rec)


def launch_log() -> List[LaunchRecord]:
    """The launches since the last :func:`clear_launch_log` (a copy)."""
    with _lock:
        return list(_log)


def clear_launch_log() -> None:
    with _lock:
        _log.clear()


@contextlib.contextmanager
def recording():
    """Collect the launch records of a region: ``with recording() as log: ...``."""
    log: List[LaunchRecord] = []
    with _lock:
        _recorders.append(log)
    try:
        yield log
    finally:
        with _lock:
            _recorders.remove(log)


@contextlib.contextmanager
def label(name: str):
    """Tag the launch records made inside the block (this thread) with ``name``,
    e.g. the op that launched them."""
    if not isinstance(name, str):
        raise TypeError(f"label must be a str, got {type(name).__name__}")
    labels = getattr(_local, "labels", None)
    if labels is None:
        labels = _local.labels = []
    labels.append(name)
    try:
        yield
    finally:
        labels.pop()

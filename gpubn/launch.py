"""Every launch plan of the kernels in ``kernels/`` (batch norm, renorm,
layer norm), shared by the ``cuda`` and ``emu`` backends: block and grid
shapes, the number of blocks a channel's reduction is split over, vector
width, workspace sizes, shared memory, occupancy.

Everything is a pure function of the canonical shape ``(outer, C, inner)``
(``(rows, n)`` for layer norm), the storage dtype, whether the arrays are
16-byte aligned, the device's attributes (read once per device by the
backend), a ``Tuning`` and, for reductions, the compiled function's
occupancy (``occupancy``; by default the minimum the kernels declare).

Layouts: ``inner > 1`` is the channel-axis-1 layout (NCL, NCHW, ...: channel
c is ``outer`` runs of ``inner`` contiguous elements); ``inner == 1`` is
channels-last (NHWC, NC: channels contiguous).  Any other channel axis is one
of the two once the functional layer has built the canonical view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from . import _validation
from . import kernels as _catalog

# Must equal GPUBN_MAX_REDUCE_THREADS in kernels/gpubn_common.cuh: the size of
# the shared scratch the reductions are compiled with.
MAX_REDUCE_THREADS = 256
# GPUBN_MAX_MAP_THREADS / GPUBN_MAX_MAP_COLUMNS: shared per-channel constants
# of the elementwise kernels are sized for these.
MAX_MAP_THREADS = 256
MAX_MAP_COLUMNS = 64
# GPUBN_MAP_UNROLL: rows (vectors) an elementwise thread loads per step.
MAP_UNROLL = 4
WARP = 32
MAX_GRID_Y = 65535
# Static plus dynamic shared memory a block may use without opting in to more
# (cudaFuncAttributeMaxDynamicSharedMemorySize): 48 KiB on every GPU since
# compute capability 3.0.  Only the read-once kernels' staging opts in (up
# to DeviceAttributes.max_shared_per_block_optin); every other launch stays
# below it.
SHARED_MEMORY_LIMIT = 48 * 1024


# GPUBN_REDUCE_MIN_BLOCKS: blocks of MAX_REDUCE_THREADS each reduction kernel
# declares resident per SM in its __launch_bounds__ (ptxas caps its registers
# accordingly; the static checks reject the spills that would cost).
REDUCE_MIN_BLOCKS = 3


@dataclass(frozen=True)
class DeviceAttributes:
    """What the configuration needs to know about a device (the per-SM
    limits default to those of compute capability 8.0 - 9.0)."""

    sm_count: int
    max_threads_per_block: int = 1024
    max_grid_y: int = MAX_GRID_Y
    name: str = ""
    max_threads_per_sm: int = 2048
    registers_per_sm: int = 65536
    shared_per_sm: int = 228 * 1024
    reserved_shared_per_block: int = 1024
    max_blocks_per_sm: int = 32
    cooperative_launch: bool = True  # cudaDevAttrCooperativeLaunch
    # static + dynamic shared memory of one block once the function opts in
    # (cudaDevAttrMaxSharedMemoryPerBlockOptin): 227 KiB on sm_90, 163 KiB on sm_80
    max_shared_per_block_optin: int = 227 * 1024


# The emu backend has no device to ask; it configures launches as for a large
# current GPU (132 SMs, like an H100 SXM, with its per-SM limits), so the
# emulated launches have the grid shapes a real one would have.  Where a plan
# needs a compiled function's registers (the read-once kernels' occupancy),
# emu's functions report gpubn.emu's Device.registers_per_thread (64), the
# number its cooperative-launch check counts with too.
EMU_DEVICE = DeviceAttributes(sm_count=132, name="emu (132 SMs)")


@dataclass(frozen=True)
class Tuning:
    """Knobs of the configuration (defaults are the GPU's)."""

    reduce_threads: int = 256        # threads per reduction block (<= MAX_REDUCE_THREADS)
    map_threads: int = 256           # threads per elementwise block
    blocks_per_sm: Optional[int] = None  # reduction grids aim at sm_count * this many blocks
                                         # (None: the kernel's occupancy, one full wave)
    min_units_per_thread: int = 4    # split a channel only while each thread keeps this many
    max_splits: int = 1024           # upper bound on blocks per channel (partials workspace)
    map_blocks_per_sm: int = 32      # elementwise grids stop growing here (grid-stride loops)
    read_once: Optional[bool] = None  # training forward and backward: None picks the
                                      # read-once kernels when the tensor fits on chip,
                                      # False never, True always (an error where it does
                                      # not fit)

    def __post_init__(self):
        for name in ("reduce_threads", "map_threads"):
            v = getattr(self, name)
            top = MAX_REDUCE_THREADS if name == "reduce_threads" else MAX_MAP_THREADS
            if v < WARP or v & (v - 1) or v > top:
                raise ValueError(f"Tuning.{name} must be a power of two in [32, {top}], got {v}")
        for name in ("blocks_per_sm", "min_units_per_thread", "max_splits", "map_blocks_per_sm"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"Tuning.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Launch:
    """One kernel launch: the catalog kernel, its VEC and the launch shape."""

    kernel: str
    vec: int
    grid: Tuple[int, int, int]
    block: Tuple[int, int, int]
    splits: int = 1               # blocks per channel (reductions)
    partial_bytes: int = 0        # workspace for partial states (0: single stage)
    counters: int = 0             # uint32 arrival counters (0: single stage)
    staged: int = 0               # read-once: values per thread in dynamic shared memory
    shared_mem: int = 0           # dynamic shared memory per block, bytes


# sizeof of the reduction states in kernels/gpubn_common.cuh, per accumulation type
_STATE_BYTES = {
    ("stats", "float"): 24,   # Welford<float>: long long n; float hi, lo, m2, sum
    ("stats", "double"): 40,  # Welford<double>
    ("grad", "float"): 8,     # GradSums<float>: two floats
    ("grad", "double"): 16,   # GradSums<double>
}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_at_least(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def layout(shape3) -> str:
    """``'nchw'`` (inner > 1) or ``'nhwc'`` (inner == 1)."""
    return "nchw" if shape3[2] > 1 else "nhwc"


def vector_width(shape3, dtype, aligned: bool, kernel: str = None) -> int:
    """Elements per access: the widest vector (16 bytes, or a narrower one the
    catalog instantiates for ``kernel``) that divides the contiguous run
    (inner, or C for channels-last), when every tensor is 16-byte aligned."""
    key = _catalog.dtype_name(dtype)
    if kernel is None:
        widths = (1, _catalog.VECTOR_BYTES // _catalog.itemsize(key))
    else:
        widths = _catalog.vector_widths(kernel, key)
    run = shape3[2] if shape3[2] > 1 else shape3[1]
    if not aligned:
        return 1
    return max(w for w in widths if run % w == 0)


def occupancy(registers: int, static_shared: int, threads: int, dynamic_shared: int,
              dev: DeviceAttributes) -> int:
    """Blocks of ``threads`` threads one SM holds at once for a function using
    ``registers`` per thread and ``static_shared`` + ``dynamic_shared`` bytes
    per block: the least of the limits set by threads, registers (allocated
    per warp in units of 256), shared memory (plus what the system reserves
    per block) and blocks, as CUDA's occupancy calculator counts them."""
    warps = _cdiv(threads, WARP)
    by_threads = dev.max_threads_per_sm // (warps * WARP)
    per_warp = _cdiv(max(registers, 1) * WARP, 256) * 256
    by_registers = (dev.registers_per_sm // per_warp) // warps
    per_block = static_shared + dynamic_shared + dev.reserved_shared_per_block
    by_shared = dev.shared_per_sm // per_block
    return max(0, min(by_threads, by_registers, by_shared, dev.max_blocks_per_sm))


def _splits(work_units: int, threads: int, tiles: int, dev: DeviceAttributes,
            tuning: Tuning, blocks_per_sm: int) -> int:
    """Blocks per channel (tile): as many as one wave of the grid holds
    (never a partial second wave), fewer where threads would run dry."""
    wave = dev.sm_count * (tuning.blocks_per_sm or blocks_per_sm)
    target = max(1, wave // max(tiles, 1))
    by_work = _cdiv(work_units, threads * tuning.min_units_per_thread)
    return max(1, min(target, by_work, tuning.max_splits, dev.max_grid_y))


# most groups of one ghost batch norm launch (gridDim.z on every CUDA device)
MAX_GROUPS = _validation.MAX_GROUPS


def _check_groups(groups: int, outer: int) -> None:
    if not 1 <= groups <= MAX_GROUPS or outer % groups:
        raise ValueError(f"groups must be in [1, {MAX_GROUPS}] and divide the outer extent "
                         f"{outer}, got {groups}")


def reduce_launch(op: str, shape3, dtype, aligned: bool, dev: DeviceAttributes,
                  tuning: Tuning = Tuning(), blocks_per_sm: int = REDUCE_MIN_BLOCKS,
                  groups: int = 1) -> Launch:
    """Launch of a per-channel reduction: ``op`` is ``'stats'``
    (bn_stats_*) or ``'grad'`` (bn_backward_reduce_*).  ``blocks_per_sm``:
    the occupancy of the compiled function (``occupancy`` of its registers
    and shared memory where a device tells them; by default the minimum the
    kernels declare); the kernel, vector width and block do not depend on
    it, only the number of blocks per channel.

    ``groups`` (ghost batch norm): ``shape3``'s outer extent is that many
    consecutive independent batches, reduced in the same launch with the
    group as grid z; the workspace holds every group's partials and
    counters, and one wave holds the blocks of all groups."""
    outer, channels, inner = (int(s) for s in shape3)
    _check_groups(groups, outer)
    outer //= groups
    key = _catalog.dtype_name(dtype)
    acc = _catalog.CXX_TYPES[key][1]
    base = {"stats": "bn_stats", "grad": "bn_backward_reduce"}[op]
    state = _STATE_BYTES[(op, acc)]
    if layout(shape3) == "nchw":
        vec = vector_width(shape3, key, aligned, f"{base}_nchw")
        units = outer * (inner // vec)
        threads = min(tuning.reduce_threads, max(WARP, _pow2_at_least(units)))
        splits = _splits(units, threads, channels * groups, dev, tuning, blocks_per_sm)
        return Launch(f"{base}_nchw", vec, (channels, splits, groups), (threads, 1, 1), splits,
                      groups * channels * splits * state if splits > 1 else 0,
                      groups * channels if splits > 1 else 0)
    # threads along C, each reading `vec` adjacent channels with one load
    vec = vector_width(shape3, key, aligned, f"{base}_nhwc")
    return _column_reduce(f"{base}_nhwc", vec, outer, channels, state, dev, tuning,
                          blocks_per_sm, groups)


def _column_reduce(kernel: str, vec: int, rows: int, columns: int, state: int,
                   dev: DeviceAttributes, tuning: Tuning, blocks_per_sm: int,
                   groups: int = 1) -> Launch:
    """A reduction over the rows of each column of a (rows, columns) array
    (of each of ``groups`` such arrays, grid z):
    grid (tiles of columns, splits of the rows), blocks (bx, by) with bx
    threads along the columns (``vec`` columns each), partial states of
    ``state`` bytes per column and split, an arrival counter per tile."""
    bx = min(WARP, _pow2_at_least(columns // vec))
    by = max(1, min(tuning.reduce_threads // bx, _pow2_at_least(rows)))
    tiles = _cdiv(columns // vec, bx)
    splits = _splits(rows, by, tiles * groups, dev, tuning, blocks_per_sm)
    return Launch(kernel, vec, (tiles, splits, groups), (bx, by, 1), splits,
                  groups * columns * splits * state if splits > 1 else 0,
                  groups * tiles if splits > 1 else 0)


def _row_block(length: int, threads: int) -> int:
    """Threads along a run of ``length`` vector units: the widest block
    (<= threads) that wastes at most 1/8 of its lanes at the run's tail."""
    if length <= WARP:
        return _pow2_at_least(length)
    best, best_waste = WARP, 1.0
    width = WARP
    while width <= min(threads, _pow2_at_least(length)):
        waste = 1.0 - length / (_cdiv(length, width) * width)
        if waste <= 0.125:
            best, best_waste = width, waste
        elif best_waste > 0.125 and waste < best_waste:
            best, best_waste = width, waste
        width *= 2
    return best


def map_launch(op: str, shape3, dtype, aligned: bool, dev: DeviceAttributes,
               tuning: Tuning = Tuning(), groups: int = 1) -> Launch:
    """Launch of an elementwise pass: ``op`` is ``'apply'`` (bn_apply_*) or
    ``'dx'`` (bn_backward_dx_*); ``groups`` as in ``reduce_launch`` (grid z,
    the blocks of all groups within the same bound)."""
    outer, channels, inner = (int(s) for s in shape3)
    _check_groups(groups, outer)
    outer //= groups
    key = _catalog.dtype_name(dtype)
    base = {"apply": "bn_apply", "dx": "bn_backward_dx"}[op]
    vec = vector_width(shape3, key, aligned, f"{base}_{layout(shape3)}")
    threads = min(tuning.map_threads, dev.max_threads_per_block)
    max_blocks = dev.sm_count * tuning.map_blocks_per_sm
    # each thread takes MAP_UNROLL rows per step: that many loads in flight
    # (channel axis 1: y enumerates groups of MAP_UNROLL runs of one channel)
    if layout(shape3) == "nchw":
        rows, length = channels * _cdiv(outer, MAP_UNROLL), inner // vec
        bx = _row_block(length, threads)
    else:
        rows, length = _cdiv(outer, MAP_UNROLL), channels // vec
        bx = min(_pow2_at_least(length), MAX_MAP_COLUMNS, threads)
    by = max(1, threads // bx)
    gx = max(1, min(_cdiv(length, bx), max_blocks))
    gy = max(1, min(_cdiv(rows, by), dev.max_grid_y, max(1, max_blocks // (gx * groups))))
    return Launch(f"{base}_{layout(shape3)}", vec, (gx, gy, groups), (bx, by, 1))


def renorm_finish_launch(channels: int) -> Launch:
    """One thread per channel for ``bn_renorm_finish``."""
    threads = min(256, max(WARP, _pow2_at_least(channels)))
    return Launch("bn_renorm_finish", 1, (_cdiv(channels, threads), 1, 1), (threads, 1, 1))


# ---------------------------------------------------------------------------
# Layer norm (kernels/layer_norm.cu)
# ---------------------------------------------------------------------------
# Must equal GPUBN_LN_CACHE_UNITS in kernels/layer_norm.cu: vector units per
# thread the layer-norm row kernels keep in registers.
LN_CACHE_UNITS = 8


def ln_row_launch(op: str, rows: int, n: int, dtype_key: str, aligned: bool,
                  dev: DeviceAttributes, tuning: Tuning) -> Launch:
    """Launch of a layer-norm row kernel (``op``: ``'forward'`` or
    ``'backward_dx'``).  Rows of up to ``LN_CACHE_UNITS`` vector units per
    lane go one warp per row (``tuning.reduce_threads // 32`` rows per block);
    longer rows one block per row, of the fewest threads (up to
    ``reduce_threads``) that leave each at most ``LN_CACHE_UNITS`` units, so
    the kernels keep the row in registers and read it once whenever the row
    allows.  Grids stop growing at ``sm_count * map_blocks_per_sm`` blocks
    (the kernels stride over rows)."""
    vec = vector_width((rows, n, 1), dtype_key, aligned, f"ln_{op}_warp")
    units = n // vec
    max_blocks = dev.sm_count * tuning.map_blocks_per_sm
    if units <= LN_CACHE_UNITS * WARP:
        per_block = max(1, tuning.reduce_threads // WARP)
        grid = max(1, min(_cdiv(rows, per_block), max_blocks))
        return Launch(f"ln_{op}_warp", vec, (grid, 1, 1), (WARP, per_block, 1))
    threads = max(WARP, min(tuning.reduce_threads, _pow2_at_least(_cdiv(units, LN_CACHE_UNITS))))
    return Launch(f"ln_{op}_block", vec, (max(1, min(rows, max_blocks)), 1, 1), (threads, 1, 1))


def ln_wgrad_launch(rows: int, n: int, dtype, dev: DeviceAttributes, tuning: Tuning = Tuning(),
                    blocks_per_sm: int = REDUCE_MIN_BLOCKS) -> Launch:
    """Launch of ``ln_backward_wgrad`` (dweight / dbias: a column reduction
    over the rows, scalar accesses), with a workspace for its own partial
    state, (sum dy, sum dy * xhat) per column and split."""
    acc = _catalog.CXX_TYPES[_catalog.dtype_name(dtype)][1]
    return _column_reduce("ln_backward_wgrad", 1, rows, n, _STATE_BYTES[("grad", acc)], dev,
                          tuning, blocks_per_sm)


def _shared_array(nbytes: int) -> int:
    """Bytes a ``__shared__`` array takes in a kernel's static shared memory:
    ptxas starts every array on a 16-byte boundary."""
    return _cdiv(nbytes, 16) * 16


def ln_static_shared_bytes(kernel: str, dtype) -> int:
    """Static shared memory of a layer-norm row kernel, laid out as ptxas
    reports it: the ``*_block`` kernels hold one reduction state per warp
    (``block_reduce_1d``) and their per-row values; the ``*_warp`` kernels
    none.  The ``cuda`` backend asks the compiled function instead; this
    model serves ``emu`` (and is checked against ptxas in the tests)."""
    if kernel.endswith("_warp"):
        return 0
    acc = _catalog.CXX_TYPES[_catalog.dtype_name(dtype)][1]
    acc_bytes = 8 if acc == "double" else 4
    # (reduction state, per-row values: mean hi and lo, rstd / two row sums)
    state, values = {"ln_forward_block": (("stats", acc), 3),
                     "ln_backward_dx_block": (("grad", acc), 2)}[kernel]
    return _shared_array(WARP * _STATE_BYTES[state]) + _shared_array(values * acc_bytes)


def ln_stage_bytes(n: int, acc_itemsize: int, arrays: int, static_shared: int) -> int:
    """Dynamic shared memory for staging ``arrays`` per-column vectors (weight
    and / or bias, ``n`` values of ``acc_itemsize`` bytes each) in a
    layer-norm block whose function already uses ``static_shared`` bytes, or
    0 (the kernel then reads them from global memory) when there are none or
    static plus dynamic would pass ``SHARED_MEMORY_LIMIT``."""
    nbytes = arrays * n * acc_itemsize
    return nbytes if 0 < nbytes <= SHARED_MEMORY_LIMIT - static_shared else 0


__all__ = ["DeviceAttributes", "EMU_DEVICE", "Tuning", "Launch", "MAX_REDUCE_THREADS",
           "MAX_MAP_THREADS", "MAX_MAP_COLUMNS", "MAP_UNROLL", "MAX_GROUPS", "REDUCE_MIN_BLOCKS",
           "SHARED_MEMORY_LIMIT", "LN_CACHE_UNITS", "occupancy", "layout", "vector_width",
           "reduce_launch", "map_launch", "renorm_finish_launch", "ln_row_launch",
           "ln_wgrad_launch", "ln_static_shared_bytes", "ln_stage_bytes", "ONCE_ITEMS",
           "once_launch", "once_fits"]


# GPUBN_ONCE_ITEMS in kernels/bn_persistent.cu: elements each thread of a
# read-once kernel keeps in registers.
ONCE_ITEMS = 16

# Tensors a read-once kernel keeps on chip: the forward x, the backward the
# masked dy and x (the ReLU mask's y is consumed as it is loaded).
_ONCE_ARRAYS = {"forward": 1, "backward": 2}


def _once_geometry(shape3, dtype, op: str, staged: int, threads: Optional[int] = None) -> Launch:
    """The read-once launch keeping ``ONCE_ITEMS + staged`` values per thread
    in blocks of ``threads`` (default: the most that ``ONCE_ITEMS`` values
    each can use, up to ``MAX_REDUCE_THREADS``); see :func:`once_launch`."""
    outer, channels, inner = (int(s) for s in shape3)
    key = _catalog.dtype_name(dtype)
    state = _STATE_BYTES[({"forward": "stats", "backward": "grad"}[op],
                          _catalog.CXX_TYPES[key][1])]
    base = f"bn_{op}_once"
    items = ONCE_ITEMS + staged
    if layout(shape3) == "nchw":
        m = outer * inner
        if threads is None:
            threads = min(MAX_REDUCE_THREADS, max(WARP, _pow2_at_least(_cdiv(m, ONCE_ITEMS))))
        splits = _cdiv(m, threads * items)
        grid, block, kernel = (channels, splits, 1), (threads, 1, 1), f"{base}_nchw"
    else:
        bx = min(WARP, _pow2_at_least(channels))
        if threads is None:
            by = max(1, min(MAX_REDUCE_THREADS // bx, _pow2_at_least(_cdiv(outer, ONCE_ITEMS))))
        else:
            by = max(1, threads // bx)
        splits = _cdiv(outer, by * items)
        grid, block, kernel = (_cdiv(channels, bx), splits, 1), (bx, by, 1), f"{base}_nhwc"
    threads = block[0] * block[1]
    shared = staged * threads * _ONCE_ARRAYS[op] * _catalog.itemsize(key)
    return Launch(kernel, 1, grid, block, splits, channels * splits * state, 2, staged, shared)


def _least_staging(shape3, cfg: Launch, per_value: int, dev: DeviceAttributes, registers: int,
                   static_shared: int) -> Optional[int]:
    """The fewest values per thread to stage (0: registers only) for which
    the grid of ``cfg``'s block (its ``grid[0]`` blocks per split) is
    co-resident, each staged value taking ``per_value`` bytes of shared
    memory per thread; None where no count is."""
    threads = cfg.block[0] * cfg.block[1]
    if cfg.kernel.endswith("nchw"):   # a channel's values, a thread's `threads` apart
        values, step = int(shape3[0]) * int(shape3[2]), threads
    else:                             # a column tile's rows, a thread's `by` apart
        values, step = int(shape3[0]), cfg.block[1]
    per_item = threads * per_value
    most = (dev.max_shared_per_block_optin - static_shared) // per_item
    best = None
    # for each number of resident blocks per SM, the fewest staged values
    # that bring the splits down to what that many blocks hold; the least of
    # those that keep that occupancy is the least staging that fits
    for per_sm in range(occupancy(registers, static_shared, threads, 0, dev), 0, -1):
        splits = min(dev.sm_count * per_sm // cfg.grid[0], dev.max_grid_y)
        if splits < 1:
            break
        staged = max(0, _cdiv(values, step * splits) - ONCE_ITEMS)
        if staged > most or (best is not None and staged >= best):
            continue
        if occupancy(registers, static_shared, threads, staged * per_item, dev) >= per_sm:
            best = staged
    return best


def once_launch(shape3, dtype, op: str = "forward", dev: Optional[DeviceAttributes] = None,
                registers: int = 0, static_shared: int = 0) -> Launch:
    """The read-once training forward (``op='forward'``, bn_forward_once_*)
    or backward (``op='backward'``, bn_backward_once_*): a grid of blocks
    that together hold every element (of x; the backward also of dy), each
    thread ``ONCE_ITEMS`` values in registers plus ``staged`` in dynamic
    shared memory (``shared_mem`` bytes per block: ``staged`` values per
    thread of each kept tensor).  Channel axis 1: grid (C, S) of 1-D blocks,
    split s of a channel holding its values [s * chunk, (s + 1) * chunk).
    Channels last: grid (column tiles, S) of (bx, by) blocks, bx channels
    wide (coalesced rows), split s holding rows [s * by * items, ...).
    Workspace: a partial state (Welford triple / gradient sums) per channel
    and split, and the grid barrier's two counters.

    Without ``dev``: registers only, the widest block.  With ``dev`` and the
    compiled function's ``registers`` per thread and ``static_shared``
    bytes: the smallest per-thread capacity that makes the grid co-resident
    at the function's occupancy (``occupancy`` at the block's dynamic
    shared memory, at most ``dev.max_shared_per_block_optin`` static +
    dynamic per block), over the block sizes from the widest down to one
    warp (channel axis 1) or one row (channels last) -- narrower blocks are
    more of them per SM, which a grid with many channels needs; equal
    capacities keep the wider block.  Where nothing fits, the widest block
    staging the most a block may: :func:`once_fits` says why it cannot
    run."""
    plain = _once_geometry(shape3, dtype, op, 0)
    if dev is None:
        return plain
    per_value = _ONCE_ARRAYS[op] * _catalog.itemsize(_catalog.dtype_name(dtype))
    widest = plain.block[0] * plain.block[1]
    narrowest = WARP if plain.kernel.endswith("nchw") else plain.block[0]
    best = None   # (staged, threads)
    threads = widest
    while threads >= narrowest:
        staged = _least_staging(shape3, _once_geometry(shape3, dtype, op, 0, threads), per_value,
                                dev, registers, static_shared)
        if staged is not None and (best is None or staged < best[0]):
            best = (staged, threads)
        threads //= 2
    if best is None:
        best = (max(0, (dev.max_shared_per_block_optin - static_shared) // (widest * per_value)),
                widest)
    return _once_geometry(shape3, dtype, op, *best)


def once_fits(cfg: Launch, dev: DeviceAttributes, registers: int,
              static_shared: int) -> Tuple[bool, str]:
    """Whether the read-once launch ``cfg`` can run: the device supports
    cooperative launches, a block's static plus dynamic shared memory is
    within what a function may opt in to, and the grid is co-resident at the
    occupancy of a function with ``registers`` per thread and
    ``static_shared`` bytes.  Returns the answer and why, in words (for
    ``GPUBN_DEBUG_KERNELS``): the values per thread (registers + staged),
    the shared memory per block, the blocks and how many fit at once."""
    blocks = cfg.grid[0] * cfg.grid[1] * cfg.grid[2]
    threads = cfg.block[0] * cfg.block[1] * cfg.block[2]
    per_sm = occupancy(registers, static_shared, threads, cfg.shared_mem, dev)
    resident = dev.sm_count * per_sm
    capacity = (f"{blocks} blocks of {threads} threads x {ONCE_ITEMS} + {cfg.staged} values "
                f"(registers + staged; {static_shared} + {cfg.shared_mem} B shared per block)")
    if not dev.cooperative_launch:
        return False, f"{dev.name or 'the device'} has no cooperative launches"
    if static_shared + cfg.shared_mem > dev.max_shared_per_block_optin:
        return False, (f"the tensor needs {capacity}, more shared memory than a block may "
                       f"have ({dev.max_shared_per_block_optin} B)")
    if cfg.splits > dev.max_grid_y or blocks > resident:
        return False, (f"the tensor needs {capacity} on chip, {resident} fit at once "
                       f"({dev.sm_count} SMs x {per_sm})")
    return True, f"the tensor fits on chip: {capacity}, {resident} fit at once"

"""Launch configuration (gpubn.launch): pure functions of the shape, dtype,
alignment, device attributes and tuning -- no device or emulator needed."""

from __future__ import annotations

import functools

import pytest

from gpubn import kernels as catalog
from gpubn.launch import (LN_CACHE_UNITS, MAP_UNROLL, MAX_MAP_COLUMNS, MAX_MAP_THREADS,
                          MAX_REDUCE_THREADS, REDUCE_MIN_BLOCKS, SHARED_MEMORY_LIMIT,
                          DeviceAttributes, Tuning, ln_stage_bytes, ln_static_shared_bytes,
                          ln_wgrad_launch, map_launch, occupancy, reduce_launch, vector_width)

H100 = DeviceAttributes(sm_count=132)


def _header_define(name):
    text = open(f"{catalog.kernels_dir()}/gpubn_common.cuh").read()
    for line in text.splitlines():
        if line.startswith(f"#define {name} "):
            return int(line.split()[2])
    raise AssertionError(f"{name} not defined in gpubn_common.cuh")


def test_limits_match_the_kernel_header():
    assert _header_define("GPUBN_MAX_REDUCE_THREADS") == MAX_REDUCE_THREADS
    assert _header_define("GPUBN_MAX_MAP_THREADS") == MAX_MAP_THREADS
    assert _header_define("GPUBN_MAX_MAP_COLUMNS") == MAX_MAP_COLUMNS
    assert _header_define("GPUBN_MAP_UNROLL") == MAP_UNROLL
    assert _header_define("GPUBN_REDUCE_MIN_BLOCKS") == REDUCE_MIN_BLOCKS
    text = open(f"{catalog.kernels_dir()}/layer_norm.cu").read()
    assert f"#define GPUBN_LN_CACHE_UNITS {LN_CACHE_UNITS}\n" in text


@pytest.mark.parametrize("shape", [(32, 64, 3136), (100_000, 64, 1)], ids=["nchw", "nhwc"])
def test_few_channels_many_values_fill_the_gpu(shape):
    """C = 64 with N*H*W = 100k: one block per channel would use 64 of 132
    SMs; the statistics and backward reductions split each channel."""
    for op in ("stats", "grad"):
        cfg = reduce_launch(op, shape, "float32", True, H100)
        blocks = cfg.grid[0] * cfg.grid[1]
        assert cfg.splits > 1 and blocks >= 2 * H100.sm_count, cfg
        assert cfg.counters > 0 and cfg.partial_bytes > 0


def test_many_channels_use_one_block_each_and_no_workspace():
    cfg = reduce_launch("stats", (2, 4096, 64), "float32", True, H100)
    assert cfg.splits == 1 and cfg.grid == (4096, 1, 1)
    assert cfg.partial_bytes == 0 and cfg.counters == 0


def test_splits_stop_where_threads_would_run_dry():
    t = Tuning()
    cfg = reduce_launch("stats", (1, 2, 4096), "float32", True, H100, t)
    # 4096 floats = 1024 vectors: one 256-thread block with 4 vectors per thread
    assert cfg.splits == 1
    cfg = reduce_launch("stats", (1, 2, 4096 * 8), "float32", True, H100, t)
    assert cfg.splits == 8


def test_grid_limits_hold_for_huge_shapes():
    """64-bit sizes (more than 2**31 elements) configure within CUDA's grid limits."""
    shape = (2**20, 3, 2**12)  # 1.3e10 elements
    for op in ("stats", "grad"):
        cfg = reduce_launch(op, shape, "float16", True, H100)
        assert cfg.grid[1] <= 65535 and cfg.block[0] <= MAX_REDUCE_THREADS
    for op in ("apply", "dx"):
        cfg = map_launch(op, shape, "float16", True, H100)
        assert cfg.grid[1] <= 65535 and cfg.grid[0] < 2**31
        assert cfg.block[0] * cfg.block[1] <= MAX_MAP_THREADS
    cfg = map_launch("apply", (2**33, 16, 1), "float32", True, H100)
    assert cfg.grid[1] <= 65535 and cfg.block[0] <= MAX_MAP_COLUMNS


@pytest.mark.parametrize("dtype,width", [("float16", 8), ("bfloat16", 8), ("float32", 4),
                                         ("float64", 2)])
def test_vector_width(dtype, width):
    assert vector_width((2, 3, 64), dtype, True) == width      # 16-byte accesses
    assert vector_width((2, 3, 64), dtype, False) == 1         # misaligned: scalar
    assert vector_width((2, 3, 63), dtype, True) == 1          # run not a multiple
    assert vector_width((10, 8 * width, 1), dtype, True) == width  # channels-last: along C


@pytest.mark.parametrize("dtype,run,width", [("float16", 196, 4), ("float16", 98, 1),
                                             ("float32", 98, 2), ("float32", 196, 4),
                                             ("float64", 49, 1)])
def test_runs_use_8_byte_vectors_when_16_do_not_divide(dtype, run, width):
    for kernel in ("bn_stats_nchw", "bn_apply_nchw", "bn_backward_reduce_nchw",
                   "bn_backward_dx_nchw"):
        assert vector_width((4, 3, run), dtype, True, kernel) == width
        assert f"<{catalog.CXX_TYPES[dtype][0]}, " in catalog.name_expression(kernel, dtype, width)
    assert map_launch("apply", (4, 3, run), dtype, True, H100).vec == width


def test_channels_last_blocks_run_along_channels():
    cfg = reduce_launch("stats", (1000, 3, 1), "float32", True, H100)
    assert cfg.kernel == "bn_stats_nhwc" and cfg.block[0] == 4   # C = 3 -> 4 lanes per row
    cfg = reduce_launch("stats", (1000, 300, 1), "float32", True, H100)
    # 300 = 75 float4 vectors: each thread reads 4 adjacent channels, 3 tiles of 32 x 4
    assert cfg.vec == 4 and cfg.block[0] == 32 and cfg.grid[0] == 3
    cfg = reduce_launch("stats", (1000, 300, 1), "float32", False, H100)
    assert cfg.vec == 1 and cfg.grid[0] == 10                    # unaligned: 10 tiles of 32
    cfg = reduce_launch("stats", (1000, 12, 1), "float16", True, H100)
    assert cfg.vec == 4 and cfg.block[0] == 4                    # 12 halves: 8-byte vectors
    cfg = reduce_launch("grad", (1000, 300, 1), "float32", True, H100)
    assert cfg.kernel == "bn_backward_reduce_nhwc" and cfg.vec == 4 and cfg.grid[0] == 3
    cfg = reduce_launch("grad", (1000, 64, 1), "float16", True, H100)
    assert cfg.vec == 4                                           # at most 4 channels a thread


def test_elementwise_rows_waste_little():
    """3136 floats per run = 784 vectors: a block row of 128 threads leaves
    at most 1/8 of the lanes idle at the tail of a run."""
    cfg = map_launch("apply", (32, 64, 3136), "float32", True, H100)
    bx = cfg.block[0]
    used = 784 / (-(-784 // bx) * bx)
    assert used >= 0.875 and cfg.block[0] * cfg.block[1] == 256


def test_tuning_rejects_bad_values():
    with pytest.raises(ValueError, match="reduce_threads must be a power of two"):
        Tuning(reduce_threads=512)
    with pytest.raises(ValueError, match="map_threads"):
        Tuning(map_threads=48)
    with pytest.raises(ValueError, match="blocks_per_sm must be >= 1"):
        Tuning(blocks_per_sm=0)


# ------------------------------------------------ layer-norm shared memory --
@functools.lru_cache(maxsize=None)
def _ptxas_resources(source, names=None):
    """{name expression: (registers, static shared bytes, spill bytes)} that
    ptxas reports for ``names`` (default: every catalog instantiation of
    ``source``) on sm_90, or skip when NVRTC or ptxas (pip nvidia-cuda-nvcc)
    is missing."""
    import glob
    import os
    import re
    import subprocess
    import sys
    import tempfile

    from gpubn import _nvrtc

    if _nvrtc.unavailable_reason():
        pytest.skip(_nvrtc.unavailable_reason())
    found = [p for entry in sys.path if entry
             for p in glob.glob(os.path.join(entry, "nvidia", "cu*", "bin", "ptxas"))]
    if not found:
        pytest.skip("ptxas not found (pip install nvidia-cuda-nvcc)")
    names = names or catalog.all_name_expressions(source)
    result = _nvrtc.compile_to_ptx(catalog.read_source(source), names,
                                   catalog.compile_options() + ("--gpu-architecture=compute_90",),
                                   source)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(result.ptx)
        log = subprocess.run([found[0], "-arch=sm_90", "-v", ptx, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    out = {}
    for name in names:
        block = log.split(f"Compiling entry function '{result.lowered_names[name]}'", 1)[1]
        spill = int(re.search(r"(\d+) bytes spill stores", block).group(1))
        usage = re.search(r"Used (\d+) registers[^\n]*", block)
        smem = re.search(r"(\d+) bytes smem", usage.group(0))
        out[name] = (int(usage.group(1)), int(smem.group(1)) if smem else 0, spill)
    return out


_LN_KERNELS = ("ln_forward_warp", "ln_forward_block", "ln_backward_dx_warp",
               "ln_backward_dx_block")
_LN_DTYPES = ("float32", "float64")


def test_layer_norm_static_shared_model_matches_ptxas():
    """emu sizes the weight/bias staging with launch.ln_static_shared_bytes
    (the cuda backend asks the compiled function): the model is what ptxas
    lays out, byte for byte (scalar instantiations: the layout does not
    depend on the vector width, and they assemble quickly)."""
    names = {(k, d): catalog.name_expression(k, d, 1) for k in _LN_KERNELS for d in _LN_DTYPES}
    found = _ptxas_resources("layer_norm.cu", tuple(names.values()))
    for (kernel, dtype), name in names.items():
        assert ln_static_shared_bytes(kernel, dtype) == found[name][1], name


@pytest.mark.parametrize("dtype,static", [("float32", 784), ("float64", 1312)])
def test_layer_norm_staging_leaves_room_for_static_shared(dtype, static):
    """Forward with weight and bias stages 2 * n values next to the block
    kernel's static shared memory (784 B for float): float rows of 6047..6144
    used to request 48 KiB of dynamic memory on top of it, a launch failure
    on a GPU.  Every request stays within the limit, and the largest row that
    fits still stages."""
    assert ln_static_shared_bytes("ln_forward_block", dtype) == static
    size = 8 if dtype == "float64" else 4
    fits = (SHARED_MEMORY_LIMIT - static) // (2 * size)
    assert ln_stage_bytes(fits, size, 2, static) == 2 * fits * size
    assert ln_stage_bytes(fits + 1, size, 2, static) == 0
    for n in range(fits - 8, 6145):
        assert ln_stage_bytes(n, size, 2, static) + static <= SHARED_MEMORY_LIMIT
    # backward stages weight only: 12288 floats are exactly 48 KiB, too many
    back = ln_static_shared_bytes("ln_backward_dx_block", dtype)
    assert ln_stage_bytes(12288, size, 1, back) == 0
    fits = (SHARED_MEMORY_LIMIT - back) // size
    assert ln_stage_bytes(fits, size, 1, back) == fits * size
    assert ln_stage_bytes(fits + 1, size, 1, back) == 0
    assert ln_stage_bytes(100, size, 0, static) == 0


# ------------------------------------------------------------- occupancy --
def test_occupancy_counts_threads_registers_and_shared_memory():
    """256-thread blocks on compute capability 9.0: 2048 threads, 64K
    registers (per warp in units of 256), 228 KiB of shared memory (+1 KiB
    reserved per block) and 32 blocks per SM."""
    assert occupancy(32, 0, 256, 0, H100) == 8          # threads: 2048 / 256
    assert occupancy(64, 0, 256, 0, H100) == 4          # 65536 / (64 * 256)
    assert occupancy(80, 0, 256, 0, H100) == 3          # 2560 per warp: 25 warps
    assert occupancy(81, 0, 256, 0, H100) == 2          # 88 per thread after rounding
    assert occupancy(32, 100 * 1024, 256, 0, H100) == 2  # 2 x 101 KiB of 228
    assert occupancy(32, 0, 32, 0, H100) == 32          # blocks


@pytest.mark.parametrize("source", ["bn_stats.cu", "bn_backward.cu"])
def test_reduction_kernels_reach_the_declared_occupancy_without_spills(source):
    """What the grids of the reductions are sized from where no device can
    be asked (REDUCE_MIN_BLOCKS, each kernel's __launch_bounds__) holds for
    every instantiation as ptxas compiles it, with nothing spilled."""
    spilled = {}
    for name, (registers, shared, spill) in _ptxas_resources(source).items():
        if "reduce" in name or "stats" in name:
            if spill:
                spilled[name] = spill
            assert occupancy(registers, shared, MAX_REDUCE_THREADS, 0, H100) >= \
                REDUCE_MIN_BLOCKS, (name, registers, shared)
    assert spilled == KNOWN_SPILLS.get(source, {})


# Known defects, listed exactly (a change in either direction fails the test
# above): reduction instantiations that spill at the declared occupancy
# (sm_90 ptxas, bytes) by source.  None today: the backward reduction with
# the residual epilogue's ReLU mask walks fewer positions at once.
KNOWN_SPILLS = {}


@pytest.mark.parametrize("shape", [(32, 64, 3136), (32, 256, 3136), (100_000, 64, 1)],
                         ids=["nchw-64", "nchw-256", "nhwc"])
@pytest.mark.parametrize("blocks_per_sm", [2, REDUCE_MIN_BLOCKS, 4])
def test_reduction_grids_fill_one_wave(shape, blocks_per_sm):
    """Grids of at most one wave of the function's occupancy (never a
    partial second wave: 32x64x56x56 used to take 1.45 waves with a fixed 4
    blocks per SM), and less than one tile (column of blocks) short of it."""
    cfg = reduce_launch("stats", shape, "float32", True, H100, blocks_per_sm=blocks_per_sm)
    tiles, blocks = cfg.grid[0], cfg.grid[0] * cfg.grid[1]
    wave = H100.sm_count * blocks_per_sm
    assert blocks <= max(wave, tiles), (cfg, wave)
    assert blocks > wave - tiles, (cfg, wave)


def test_layer_norm_column_reduction_has_its_own_workspace():
    """dweight / dbias partials are sized for ln_backward_wgrad's state (two
    accumulators per column and split), not batch norm's."""
    cfg = ln_wgrad_launch(100_000, 768, "float32", H100)
    assert cfg.kernel == "ln_backward_wgrad" and cfg.vec == 1 and cfg.splits > 1
    assert cfg.partial_bytes == 768 * cfg.splits * 8 and cfg.counters == cfg.grid[0] == 24
    cfg64 = ln_wgrad_launch(100_000, 768, "float64", H100)
    assert cfg64.partial_bytes == 768 * cfg64.splits * 16

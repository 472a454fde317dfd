"""Launch configuration (gpubn.launch): pure functions of the shape, dtype,
alignment, device attributes and tuning -- no device or emulator needed."""

from __future__ import annotations

import pytest

from gpubn import kernels as catalog
from gpubn.launch import (MAX_MAP_COLUMNS, MAX_MAP_THREADS, MAX_REDUCE_THREADS, DeviceAttributes,
                          Tuning, map_launch, reduce_launch, vector_width)

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
    assert cfg.block[0] == 32 and cfg.grid[0] == 10              # 10 tiles of 32 channels


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

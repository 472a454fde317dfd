"""Launch configuration (gpubn.launch): pure functions of the shape, dtype,
alignment, device attributes and tuning -- no device or emulator needed."""

from __future__ import annotations

import pytest

from gpubn import kernels as catalog
from gpubn.launch import (MAX_MAP_COLUMNS, MAX_MAP_THREADS, MAX_REDUCE_THREADS,
                          SHARED_MEMORY_LIMIT, DeviceAttributes, Tuning, ln_stage_bytes,
                          ln_static_shared_bytes, map_launch, reduce_launch, vector_width)

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


# ------------------------------------------------ layer-norm shared memory --
def _ptxas_static_shared(kernel, dtype, vec):
    """Static shared memory ptxas reports for one instantiation (sm_90), or
    skip when NVRTC or ptxas (pip nvidia-cuda-nvcc) is missing."""
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
    name = catalog.name_expression(kernel, dtype, vec)
    source = catalog.KERNELS[kernel].source
    result = _nvrtc.compile_to_ptx(catalog.read_source(source), [name],
                                   catalog.compile_options() + ("--gpu-architecture=compute_90",),
                                   source)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(result.ptx)
        log = subprocess.run([found[0], "-arch=sm_90", "-v", ptx, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    entry = result.lowered_names[name]
    block = log.split(f"Compiling entry function '{entry}'", 1)[1]
    usage = re.search(r"Used \d+ registers[^\n]*", block).group(0)
    smem = re.search(r"(\d+) bytes smem", usage)
    return int(smem.group(1)) if smem else 0


@pytest.mark.parametrize("kernel", ["ln_forward_warp", "ln_forward_block",
                                    "ln_backward_dx_warp", "ln_backward_dx_block"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_layer_norm_static_shared_model_matches_ptxas(kernel, dtype):
    """emu sizes the weight/bias staging with launch.ln_static_shared_bytes
    (the cuda backend asks the compiled function): the model is what ptxas
    lays out, byte for byte."""
    vec = catalog.vector_widths(kernel, dtype)[-1]
    assert ln_static_shared_bytes(kernel, dtype) == _ptxas_static_shared(kernel, dtype, vec)


@pytest.mark.parametrize("dtype,static", [("float32", 784), ("float64", 1040)])
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

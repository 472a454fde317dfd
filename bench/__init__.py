"""gpubn's benchmark suite: ``python -m bench --help``.

Modules: :mod:`bench.suites` (shapes), :mod:`bench.inputs` (the one setup per
case all providers share), :mod:`bench.providers` (gpubn, PyTorch, the
textbook NumPy version in :mod:`bench.naive`), :mod:`bench.runner` (timing,
output checks, ratios), :mod:`bench.metrics` (bytes moved, GB/s, peak),
:mod:`bench.gpu` (CUDA-event timing, device peak), :mod:`bench.traffic` (emu
traffic and launch counts) and :mod:`bench.report` (tables, JSON lines,
charts).
"""

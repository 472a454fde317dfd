"""gpubn: batch normalization kernels for GPU array pipelines."""

__version__ = "0.1.0"

"""gpubn: batch normalization kernels for GPU array pipelines."""

__version__ = "0.1.0"

from .backends import available_backends, get_backend
from .functional import BatchNormSaved, batch_norm_backward, batch_norm_forward
from .layers import BatchNorm
from .preprocessing import MinMaxScaler, StandardScaler, Whitening

__all__ = [
    "BatchNorm",
    "BatchNormSaved",
    "available_backends",
    "batch_norm_backward",
    "batch_norm_forward",
    "get_backend",
    "StandardScaler",
    "MinMaxScaler",
    "Whitening",
]

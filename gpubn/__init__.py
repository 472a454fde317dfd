"""gpubn: batch normalization kernels for GPU array pipelines."""

__version__ = "0.1.0"

from . import emu
from .backends import available_backends
from .functional import BatchNormSaved, batch_norm_backward, batch_norm_forward
from .folding import fold_batch_norm
from .layers import BatchNorm
from .layer_norm import LayerNorm, LayerNormSaved, layer_norm_backward, layer_norm_forward
from .renorm import BatchRenorm, BatchRenormSaved, batch_renorm_backward, batch_renorm_forward
from .preprocessing import MinMaxScaler, NotFittedError, StandardScaler, Whitening
from .distributed import (MPIComm, NCCLComm, RemoteRankError, SyncBatchNorm,
                          sync_batch_norm_backward, sync_batch_norm_forward)

__all__ = [
    "BatchNorm",
    "BatchNormSaved",
    "available_backends",
    "fold_batch_norm",
    "batch_norm_backward",
    "batch_norm_forward",
    "StandardScaler",
    "MinMaxScaler",
    "Whitening",
    "NotFittedError",
    "BatchRenorm",
    "BatchRenormSaved",
    "batch_renorm_forward",
    "batch_renorm_backward",
    "LayerNorm",
    "LayerNormSaved",
    "layer_norm_forward",
    "layer_norm_backward",
    "MPIComm",
    "NCCLComm",
    "SyncBatchNorm",
    "RemoteRankError",
    "sync_batch_norm_forward",
    "sync_batch_norm_backward",
    "emu",
]

"""Textbook NumPy normalization, written the way tutorials present it.

This is the reference point "what most people write first": compute the mean,
the variance, normalize, scale and shift, each as its own full-size array;
the backward pass walks the computational graph one node at a time with the
chain rule.  Nothing here is optimized on purpose; the benchmark shows how far
it is from PyTorch and from gpubn's NumPy backend.

All functions take the array as stored and the channel axis (batch norm) or
normalize over the last dimension (layer norm); per-channel vectors are 1-D.
"""

from __future__ import annotations

import numpy as np


def _reduce_axes(x, axis):
    axis = axis % x.ndim
    axes = tuple(i for i in range(x.ndim) if i != axis)
    bshape = [1] * x.ndim
    bshape[axis] = x.shape[axis]
    return axes, tuple(bshape)


# -- batch norm -----------------------------------------------------------

def batch_norm_forward_train(x, gamma, beta, running_mean, running_var,
                             momentum=0.1, eps=1e-5, axis=1):
    axes, bshape = _reduce_axes(x, axis)
    m = x.size // x.shape[axis % x.ndim]

    mu = np.mean(x, axis=axes, keepdims=True)            # 1. batch mean
    xc = x - mu                                          # 2. centre
    sq = xc ** 2                                         # 3. square
    var = np.mean(sq, axis=axes, keepdims=True)          # 4. biased variance
    std = np.sqrt(var + eps)                             # 5. std
    istd = 1.0 / std                                     # 6. inverse std
    xhat = xc * istd                                     # 7. normalize
    scaled = gamma.reshape(bshape) * xhat                # 8. scale
    out = scaled + beta.reshape(bshape)                  # 9. shift

    running_mean[...] = (1 - momentum) * running_mean + momentum * mu.reshape(-1)
    running_var[...] = (1 - momentum) * running_var + momentum * var.reshape(-1) * m / (m - 1)

    cache = dict(xhat=xhat, xc=xc, std=std, istd=istd, var=var, gamma=gamma,
                 eps=eps, axes=axes, bshape=bshape, m=m)
    return out, cache


def batch_norm_forward_infer(x, gamma, beta, running_mean, running_var, eps=1e-5, axis=1):
    _, bshape = _reduce_axes(x, axis)
    xhat = (x - running_mean.reshape(bshape)) / np.sqrt(running_var.reshape(bshape) + eps)
    return gamma.reshape(bshape) * xhat + beta.reshape(bshape)


def batch_norm_backward(dout, cache):
    """Chain rule through steps 9..1 of the forward pass."""
    axes, bshape, m = cache["axes"], cache["bshape"], cache["m"]
    xhat, xc, std, istd, var = cache["xhat"], cache["xc"], cache["std"], cache["istd"], cache["var"]
    gamma, eps = cache["gamma"], cache["eps"]

    dbeta = np.sum(dout, axis=axes)                        # 9. shift
    dgamma = np.sum(dout * xhat, axis=axes)                # 8. scale
    dxhat = dout * gamma.reshape(bshape)
    distd = np.sum(dxhat * xc, axis=axes, keepdims=True)   # 7. normalize
    dxc_a = dxhat * istd
    dstd = -1.0 / (std ** 2) * distd                       # 6. inverse
    dvar = 0.5 / np.sqrt(var + eps) * dstd                 # 5. sqrt
    dsq = np.ones_like(dout) * dvar / m                    # 4. mean of squares
    dxc_b = 2 * xc * dsq                                   # 3. square
    dxc = dxc_a + dxc_b
    dmu = -np.sum(dxc, axis=axes, keepdims=True)           # 2. centre
    dx_b = np.ones_like(dout) * dmu / m                    # 1. mean
    dx = dxc + dx_b
    return dx, dgamma, dbeta


# -- batch renorm (Ioffe 2017, Algorithm 1) ------------------------------

def batch_renorm_forward_train(x, gamma, beta, running_mean, running_std, rmax, dmax,
                               momentum=0.01, eps=1e-5, axis=1):
    axes, bshape = _reduce_axes(x, axis)
    mu = np.mean(x, axis=axes, keepdims=True)
    xc = x - mu
    var = np.mean(xc ** 2, axis=axes, keepdims=True)
    std = np.sqrt(var + eps)
    r = np.clip(std / running_std.reshape(bshape), 1.0 / rmax, rmax)
    d = np.clip((mu - running_mean.reshape(bshape)) / running_std.reshape(bshape), -dmax, dmax)
    xhat = xc / std * r + d
    out = gamma.reshape(bshape) * xhat + beta.reshape(bshape)
    running_mean[...] = running_mean + momentum * (mu.reshape(-1) - running_mean)
    running_std[...] = running_std + momentum * (std.reshape(-1) - running_std)
    cache = dict(xhat=xhat, xc=xc, std=std, r=r, d=d, gamma=gamma, axes=axes,
                 bshape=bshape, m=x.size // x.shape[axis % x.ndim])
    return out, cache


def batch_renorm_backward(dout, cache):
    """r and d are constants for backprop (as in the paper)."""
    axes, bshape, m = cache["axes"], cache["bshape"], cache["m"]
    xhat, xc, std, r = cache["xhat"], cache["xc"], cache["std"], cache["r"]
    gamma = cache["gamma"]
    dbeta = np.sum(dout, axis=axes)
    dgamma = np.sum(dout * xhat, axis=axes)
    dxhat = dout * gamma.reshape(bshape) * r              # through xhat = xc/std*r + d
    dstd = np.sum(dxhat * xc * (-1.0 / std ** 2), axis=axes, keepdims=True)
    dvar = dstd * 0.5 / std
    dxc = dxhat / std + 2.0 * xc * dvar / m
    dmu = -np.sum(dxc, axis=axes, keepdims=True)
    dx = dxc + dmu / m
    return dx, dgamma, dbeta


# -- layer norm -----------------------------------------------------------

def layer_norm_forward(x, gamma, beta, eps=1e-5):
    h = x.shape[-1]
    mu = np.mean(x, axis=-1, keepdims=True)
    xc = x - mu
    var = np.mean(xc ** 2, axis=-1, keepdims=True)
    std = np.sqrt(var + eps)
    istd = 1.0 / std
    xhat = xc * istd
    out = gamma * xhat + beta
    cache = dict(xhat=xhat, xc=xc, std=std, istd=istd, var=var, gamma=gamma, eps=eps, h=h)
    return out, cache


def layer_norm_backward(dout, cache):
    xhat, xc, std, istd, var = cache["xhat"], cache["xc"], cache["std"], cache["istd"], cache["var"]
    gamma, eps, h = cache["gamma"], cache["eps"], cache["h"]
    rows = tuple(range(dout.ndim - 1))
    dbeta = np.sum(dout, axis=rows)
    dgamma = np.sum(dout * xhat, axis=rows)
    dxhat = dout * gamma
    distd = np.sum(dxhat * xc, axis=-1, keepdims=True)
    dxc_a = dxhat * istd
    dstd = -1.0 / (std ** 2) * distd
    dvar = 0.5 / np.sqrt(var + eps) * dstd
    dxc_b = 2 * xc * np.ones_like(dout) * dvar / h
    dxc = dxc_a + dxc_b
    dmu = -np.sum(dxc, axis=-1, keepdims=True)
    dx = dxc + np.ones_like(dout) * dmu / h
    return dx, dgamma, dbeta

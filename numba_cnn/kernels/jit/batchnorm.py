"""The jit backend's batch normalisation on the host side, one code path for the contract's batchnorm2d_forward /
_backward and the fused batchnorm2d_relu_forward / _backward (jit/__init__.py defines all four on these): the
batch statistics (norm.py's `_channel_stats`, float64), the running statistics' update, and the calls of norm.py's
`_batchnorm_apply` and `_batchnorm_backward` / `_batchnorm_relu_backward`. The plain and the fused op differ only in
the floor the output is clamped to as it is stored (-inf: none; 0: the ReLU) and in the backward kernel, the fused
one reading dy through the ReLU's select `0 if y <= 0 else dy` (y the fused forward's output). Inputs stored
channels-last are copied to NCHW first (nchw); the returned arrays come from reusable_output.
"""

import numpy as np

from numba_cnn.kernels.jit.buffers import nchw, reusable_output
from numba_cnn.kernels.jit.norm import _batchnorm_apply, _batchnorm_backward, _batchnorm_relu_backward, _channel_stats
from numba_cnn.kernels.jit.paths import note


def forward(op, x, gamma, beta, running_mean, running_var, momentum, eps, training, floor):
    """batchnorm2d_forward's result with y clamped below at `floor` as it is stored (a select that keeps NaN;
    -inf clamps nothing), the call noted as `op` -> (y, mean, inv_std)."""
    x = nchw(x)
    n, c, h, w = x.shape
    note(op, "float64 channel statistics" if training else "running statistics", 0)
    x3 = x.reshape(n, c, h * w)
    if training:
        mean, var = np.empty(c), np.empty(c)
        _channel_stats(x3, mean, var)
        running_mean[...] = momentum * running_mean.astype(np.float64) + (1 - momentum) * mean
        running_var[...] = momentum * running_var.astype(np.float64) + (1 - momentum) * var
    else:
        mean, var = running_mean.astype(np.float64), running_var.astype(np.float64)
    inv_std = 1.0 / np.sqrt(var + eps)
    y = reusable_output(x.shape, x.dtype)
    _batchnorm_apply(x3, mean, inv_std * gamma.astype(np.float64), beta.astype(np.float64), float(floor),
                     y.reshape(n, c, h * w))
    return y, mean.astype(x.dtype), inv_std.astype(x.dtype)


def backward(op, dy, y, x, gamma, mean, inv_std):
    """batchnorm2d_backward's result for the gradient `0 if y <= 0 else dy` (y None: dy as it is), the select made
    as the kernel reads dy; the call noted as `op` -> (dx, dgamma, dbeta)."""
    dy, x = nchw(dy), nchw(x)
    n, c, h, w = x.shape
    note(op, "float64 channel sums", 0)
    dx = reusable_output(x.shape, x.dtype)
    dgamma, dbeta = np.empty(c, x.dtype), np.empty(c, x.dtype)
    kernel, y = (_batchnorm_backward, dy) if y is None else (_batchnorm_relu_backward, nchw(y))  # the plain: y unread
    planes = (n, c, h * w)
    kernel(dy.reshape(planes), y.reshape(planes), x.reshape(planes), gamma, mean, inv_std, dx.reshape(planes),
           dgamma, dbeta)
    return dx, dgamma, dbeta

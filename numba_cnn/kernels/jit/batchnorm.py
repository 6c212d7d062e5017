"""The jit backend's batch normalisation on the host side, one code path for the contract's batchnorm2d_forward /
_backward and the fused batchnorm2d_relu_* and batchnorm2d_relu_maxpool2d_* ops (jit/__init__.py defines them all
on these): the batch statistics (norm.py's `_channel_stats`, or `_channel_stats_last` for channels-last x;
float64), the running statistics' update, and the calls of norm.py's `_batchnorm_apply` (with the pool:
`_batchnorm_apply_pool_last`) and `_batchnorm_backward` / `_batchnorm_relu_backward`. The plain and the fused op
differ only in the floor the output is clamped to as it is stored (-inf: none; 0: the ReLU), the pool, and the
backward kernel, the fused one reading dy through the ReLU's select `0 if y <= 0 else dy` (y the fused forward's
output). An x stored
channels-last (a convolution's output) takes norm.py's channels-last kernels and gives channels-last results
(NCHW views), its dy and y read channels-last too (nhwc: a copy only if they are not); NCHW x takes the NCHW
kernels. The returned arrays come from reusable_output.
"""

import numpy as np

from numba_cnn.kernels.contract import is_channels_last
from numba_cnn.kernels.jit.buffers import nchw, nhwc, reusable_output, scratch
from numba_cnn.kernels.jit import pooling as _pooling
from numba_cnn.kernels.jit.layers import relu_backward
from numba_cnn.kernels.jit.norm import (_batchnorm_apply, _batchnorm_apply_last, _batchnorm_apply_pool_last,
                                        _batchnorm_backward, _batchnorm_relu_backward, _channel_stats,
                                        _channel_stats_last, _channel_stats_two_pass, batchnorm_backward_last)
from numba_cnn.kernels.jit.paths import note

# fixed chunks of pixels whose float64 sums the channels-last kernels add in order (bits independent of threads)
PIXEL_CHUNKS = 16


def forward(op, x, gamma, beta, running_mean, running_var, momentum, eps, training, floor, pool=False):
    """batchnorm2d_forward's result with y clamped below at `floor` as it is stored (a select that keeps NaN;
    -inf clamps nothing), the call noted as `op` -> (y, mean, inv_std). With pool, the 2x2 max-pool of that y
    instead -> (pooled, argmax, mean, inv_std), the same bits as maxpool2d_forward of y: a channels-last x pooled as
    its values are made (y never stored), an NCHW one composed."""
    channels_last = is_channels_last(x)
    if pool and not channels_last:
        y, mean, inv_std = forward(op, x, gamma, beta, running_mean, running_var, momentum, eps, training, floor)
        return (*_pooling.max_forward(y, (2, 2)), mean, inv_std)
    x = nhwc(x) if channels_last else nchw(x)
    n, c = x.shape[0], x.shape[3] if channels_last else x.shape[1]
    note(op, ("float64 channel statistics" if training else "running statistics") + ", channels last" * channels_last
         + ", 2x2 max-pooled as made" * pool, 0)
    x2 = x.reshape(-1, c) if channels_last else x.reshape(n, c, -1)
    if training:
        mean, var = np.empty(c), np.empty(c)
        if channels_last:
            chunks = min(PIXEL_CHUNKS, len(x2))
            _channel_stats_last(x2, scratch("batchnorm.partial", (chunks, 3, c), np.float64), mean, var)
            if not (np.isfinite(mean).all() and np.isfinite(var).all()):  # inf - inf in the shifted sums
                _channel_stats_two_pass(x2, scratch("batchnorm.partial_exact", (chunks, c), np.float64), mean, var)
        else:
            _channel_stats(x2, mean, var)
        running_mean[...] = momentum * running_mean.astype(np.float64) + (1 - momentum) * mean
        running_var[...] = momentum * running_var.astype(np.float64) + (1 - momentum) * var
    else:
        mean, var = running_mean.astype(np.float64), running_var.astype(np.float64)
    inv_std = 1.0 / np.sqrt(var + eps)
    scale, shift = inv_std * gamma.astype(np.float64), beta.astype(np.float64)
    if pool:
        pooled = reusable_output((n, x.shape[1] // 2, x.shape[2] // 2, c), x.dtype)
        argmax = reusable_output(pooled.shape, np.uint8)
        _batchnorm_apply_pool_last(x, mean, scale, shift, float(floor), pooled, argmax)
        return (pooled.transpose(0, 3, 1, 2), argmax.transpose(0, 3, 1, 2), mean.astype(x.dtype),
                inv_std.astype(x.dtype))
    y = reusable_output(x.shape, x.dtype)
    apply = _batchnorm_apply_last if channels_last else _batchnorm_apply
    apply(x2, mean, scale, shift, float(floor), y.reshape(x2.shape))
    return (y.transpose(0, 3, 1, 2) if channels_last else y), mean.astype(x.dtype), inv_std.astype(x.dtype)


def backward(op, dy, y, x, gamma, mean, inv_std, argmax=None):
    """batchnorm2d_backward's result for the gradient `0 if y <= 0 else dy` (y None: dy as it is), the select made
    as the kernel reads dy; with argmax, dy, y and argmax are those of the 2x2 max-pool after the fused op, and a
    channels-last x takes the kernel that routes the pool's gradient to its winners as it reads it (an NCHW x: the
    pool's backward first); the call noted as `op` -> (dx, dgamma, dbeta)."""
    channels_last = is_channels_last(x)
    pooled = argmax is not None
    if pooled and not channels_last:
        routed = _pooling.max_backward(relu_backward(dy, y), argmax, x.shape, (2, 2))
        return backward(op, routed, None, x, gamma, mean, inv_std)

    def layout(a):  # read before the op returns: copies, where one is needed, from the output arena
        return (nhwc if channels_last else nchw)(a, reusable=True)

    dy, x = layout(dy), layout(x)
    n, c = x.shape[0], x.shape[3] if channels_last else x.shape[1]
    note(op, "float64 channel sums" + ", channels last" * channels_last + ", the pool's gradient routed" * pooled, 0)
    # over a donated dy where it has x's shape (not pooled): the kernels' last pass reads each element of dy
    # before it writes that of dx
    dx = reusable_output(x.shape, x.dtype, None if pooled else dy)
    dgamma, dbeta = np.empty(c, x.dtype), np.empty(c, x.dtype)
    relu = y is not None
    y = layout(y) if relu else dy  # the plain kernels do not read y
    if channels_last:
        pixels = (-1, c)
        partial = scratch("batchnorm.partial_grad", (min(PIXEL_CHUNKS, len(x.reshape(pixels))), 2, c), np.float64)
        won = layout(argmax).reshape(pixels) if pooled else np.zeros((1, c), np.uint8)
        batchnorm_backward_last(dy.reshape(pixels), y.reshape(pixels), won, x.reshape(pixels), x.shape[1],
                                x.shape[2], gamma, mean, inv_std, partial, dx.reshape(pixels), dgamma, dbeta, relu,
                                pooled)
        return dx.transpose(0, 3, 1, 2), dgamma, dbeta
    kernel = _batchnorm_relu_backward if relu else _batchnorm_backward
    planes = (n, c, -1)
    kernel(dy.reshape(planes), y.reshape(planes), x.reshape(planes), gamma, mean, inv_std, dx.reshape(planes),
           dgamma, dbeta)
    return dx, dgamma, dbeta

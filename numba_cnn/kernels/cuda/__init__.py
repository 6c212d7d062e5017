"""cuda backend: the contract as numba-cuda kernels on device arrays (a GPU, or Numba's simulator).

kernels.py   the eight contract ops, each launcher beside its kernels (how each maps threads is in its header):
             convolutions with any stride and padding (bounds tests against the padding, never a padded copy; the
             input gradient a gather, so without atomics), max and average pooling over any kh x kw window, batch
             normalisation (a block per channel for the statistics and their gradients, a thread per element for
             the rest).
layers.py    ReLU, dense, dropout, softmax cross-entropy and Adam on device arrays (the functions of
             numba_cnn/layers.py).
runtime.py   the import-time check for numba-cuda and a device, the launch configuration, host <-> device copies,
             the shared-memory block sum.

Importing this package raises BackendUnavailable when numba-cuda or a device (or the simulator) is missing.
"""

from numba_cnn.kernels.contract import BackendInfo
from numba_cnn.kernels.cuda import layers  # noqa: F401  (the backend's layers, see BackendInfo.on_device)
from numba_cnn.kernels.cuda.kernels import (avgpool2d_backward, avgpool2d_forward, batchnorm2d_backward,
                                            batchnorm2d_forward, conv2d_backward, conv2d_forward, maxpool2d_backward,
                                            maxpool2d_forward)
from numba_cnn.kernels.cuda.runtime import synchronize, to_device, to_host

INFO = BackendInfo(summary="numba-cuda kernels on device arrays, a thread per output element", on_device=True)

__all__ = ["INFO", "conv2d_forward", "conv2d_backward", "maxpool2d_forward", "maxpool2d_backward",
           "avgpool2d_forward", "avgpool2d_backward", "batchnorm2d_forward", "batchnorm2d_backward", "layers",
           "to_device", "to_host", "synchronize"]

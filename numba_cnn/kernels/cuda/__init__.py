"""cuda backend: the contract as numba-cuda kernels on device arrays (a GPU, or Numba's simulator).

kernels.py      the eight contract ops, each launcher beside its kernels (how each maps threads is in its header):
                convolutions with any stride and padding (bounds tests against the padding, never a padded copy;
                the input gradient a gather, so without atomics), max and average pooling over any kh x kw window,
                batch normalisation (a block per channel for the statistics and their gradients, a thread per
                element for the rest).
tiled.py        the convolution's tiled kernels, used by kernels.py's launchers on a GPU (runtime.CONV_KERNELS):
                an implicit matrix product with shared-memory tiles and 4 x 4 register tiles (forward, weight
                gradient split in fixed chunks), the input gradient with 8 channels' weights staged per block.
memory.py       the caching pool behind numba-cuda's memory-manager interface (NUMBA_CNN_CUDA_POOL=0: numba-cuda's).
layers.py       ReLU, dense, dropout, softmax cross-entropy and Adam on device arrays (the functions of
                numba_cnn/kernels/layers.py).
dropout_rng.py  dropout's generator states on the device: made from a seed, snapshotted, restored (the functions of
                numba_cnn/kernels/dropout_rng.py).
runtime.py      the import-time check for numba-cuda and a device, the launch configuration, the array runtime
                (host <-> device copies, zeroed arrays, batch gathering, pixel scaling: the functions of
                numba_cnn/kernels/host.py), the shared-memory block sum.

Importing this package raises BackendUnavailable when numba-cuda or a device (or the simulator) is missing.
"""

from numba_cnn.kernels.contract import BackendInfo
from numba_cnn.kernels.cuda import layers  # noqa: F401  (the backend's layers, see BackendInfo.on_device)
from numba_cnn.kernels.cuda.kernels import (avgpool2d_backward, avgpool2d_forward, batchnorm2d_backward,
                                            batchnorm2d_forward, conv2d_backward, conv2d_forward, maxpool2d_backward,
                                            maxpool2d_forward)
from numba_cnn.kernels.cuda.dropout_rng import dropout_rng_state, make_dropout_rng, restore_dropout_rng
from numba_cnn.kernels.cuda.runtime import (as_float_images, device_event, synchronize, take_rows, to_device, to_host,
                                            zeros_like)

INFO = BackendInfo(summary="numba-cuda kernels on device arrays: tiled convolutions, elsewhere a thread per output",
                   on_device=True)

__all__ = ["INFO", "conv2d_forward", "conv2d_backward", "maxpool2d_forward", "maxpool2d_backward",
           "avgpool2d_forward", "avgpool2d_backward", "batchnorm2d_forward", "batchnorm2d_backward", "layers",
           "to_device", "to_host", "synchronize", "device_event", "zeros_like", "take_rows", "as_float_images",
           "make_dropout_rng", "dropout_rng_state", "restore_dropout_rng"]

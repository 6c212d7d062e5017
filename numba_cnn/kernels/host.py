"""The host backends' array runtime (naive, im2col, jit, the oracle): moving arrays to and from the backend, a zeroed
array like another, and the two array steps of feeding a batch, gathering its rows and scaling its pixels.

cuda/runtime.py has the same functions for device arrays; Backend takes one set or the other (the names are
contract.ARRAY_FUNCTIONS). load_mnist scales through as_float_images too, so a data set and a batch are scaled by
the same arithmetic.
"""

import numpy as np

# A host backend's arrays are already where its ops run: moving one in only makes it C-contiguous, and there is
# nothing to wait for, since a host backend's calls return when their work is done.
to_device = np.ascontiguousarray
to_host = np.asarray
synchronize = None
device_event = None  # no device timeline: layers are timed on the host clock


def zeros_like(a):
    return np.zeros_like(a)


def take_rows(data, idx):
    """data[N, ...], idx[B] int -> data[idx] as a new contiguous array (one mini-batch)."""
    return data[idx]


def as_float_images(images):
    """Images as the network takes them: raw uint8 pixels become float32 in [0, 1] (pixel / 255; load_mnist
    scales through here too); float images pass through. The trainer keeps the set in uint8, a quarter of
    the memory, and converts one batch at a time."""
    if images.dtype != np.uint8:
        return images
    scaled = images.astype(np.float32)
    scaled /= np.float32(255)  # in place: scaling the whole set must not hold a second float copy
    return scaled

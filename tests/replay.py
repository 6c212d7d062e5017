"""The float64 oracle's model replaying the dropout mask a backend under test drew."""

from numba_cnn.kernels import layers as numpy_layers


class GivenDropout:
    """numpy layers with dropout_forward applying a given mask: the oracle replays the mask a backend drew (the
    cuda backend draws its own random stream)."""

    def __init__(self, mask):
        self.mask = mask

    def __getattr__(self, name):
        return getattr(numpy_layers, name)

    def dropout_forward(self, x, rate, rng):
        return x * self.mask, self.mask

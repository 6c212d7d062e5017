"""numba_cnn: the classic MNIST CNN trained from scratch with hand-written kernels, several ways side by side."""

from numba_cnn.kernels import BACKENDS, get_backend
from numba_cnn.model import Model

__version__ = "0.1.0"


def load_mnist(*args, **kwargs):
    """See numba_cnn.data.load_mnist (imported on first use: it pulls in urllib and gzip)."""
    from numba_cnn.data import load_mnist as _load

    return _load(*args, **kwargs)


__all__ = ["BACKENDS", "Model", "get_backend", "load_mnist", "__version__"]

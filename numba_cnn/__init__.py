"""numba_cnn: the classic MNIST CNN trained from scratch with hand-written kernels, several ways side by side."""

from numba_cnn.data import load_mnist
from numba_cnn.kernels import BACKENDS, get_backend
from numba_cnn.model import Model

__version__ = "0.1.0"

__all__ = ["BACKENDS", "Model", "get_backend", "load_mnist", "__version__"]

"""The layer kinds, one module each, registered in KINDS: adding a kind is one module plus one line here."""

from numba_cnn.network.layers.base import DescriptionError, Layer
from numba_cnn.network.layers.batchnorm import BatchNorm2D
from numba_cnn.network.layers.conv2d import Conv2D
from numba_cnn.network.layers.dense import Dense
from numba_cnn.network.layers.pool import AvgPool2D, GlobalAvgPool2D, MaxPool2D
from numba_cnn.network.layers.shape import Dropout, Flatten, ReLU

KINDS = {}


def register(kind):
    """Add a layer kind (a Layer subclass) under its `kind` name and aliases; returns it (usable as a decorator)."""
    for name in (kind.kind,) + kind.aliases:
        KINDS[name] = kind
    return kind


def unregister(kind):
    for name in (kind.kind,) + kind.aliases:
        KINDS.pop(name, None)


for _kind in (Conv2D, ReLU, MaxPool2D, AvgPool2D, GlobalAvgPool2D, BatchNorm2D, Flatten, Dropout, Dense):
    register(_kind)

__all__ = ["KINDS", "AvgPool2D", "BatchNorm2D", "Conv2D", "Dense", "DescriptionError", "Dropout", "Flatten",
           "GlobalAvgPool2D", "Layer", "MaxPool2D", "ReLU", "register", "unregister"]

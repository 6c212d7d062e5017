"""The networks numba_cnn knows by name (`train --model NAME`). Each is a list of layer objects; the input shape
comes from the data set, so every preset runs on grey 28x28 and colour 32x32 images alike.
"""

from numba_cnn.network.layers import (AvgPool2D, BatchNorm2D, Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU)


def mnist_cnn(num_classes=10):
    """Keras's MNIST convnet example, the project's first network: 34,826 parameters on MNIST. The names are
    the ones its checkpoints have always used."""
    return [Conv2D(32, 3, activation="relu", name="conv1"), MaxPool2D(2, name="pool1"),
            Conv2D(64, 3, activation="relu", name="conv2"), MaxPool2D(2, name="pool2"),
            Flatten(name="flatten"), Dropout(0.5, name="dropout"),
            Dense(num_classes, activation="softmax", name="dense")]


def lenet5(num_classes=10):
    """LeCun et al. (1998)'s LeNet-5 with ReLU for its squashing functions: 5x5 convolutions of 6 and 16 filters,
    each followed by 2x2 average pooling (the paper's subsampling), then 120, 84 and num_classes units. The first
    convolution pads 'same' so a 28x28 image reaches the second as the paper's 32x32 input would."""
    return [Conv2D(6, 5, padding="same", activation="relu"), AvgPool2D(2),
            Conv2D(16, 5, activation="relu"), AvgPool2D(2), Flatten(),
            Dense(120, activation="relu"), Dense(84, activation="relu"),
            Dense(num_classes, activation="softmax")]


def vgg_small(num_classes=10):
    """A VGG-style network for 3x32x32 images: two blocks of two 3x3 'same' convolutions and a 2x2 max-pool
    (32 then 64 filters), then a 128-unit hidden layer with dropout."""
    return [Conv2D(32, 3, padding="same", activation="relu"), Conv2D(32, 3, padding="same", activation="relu"),
            MaxPool2D(2),
            Conv2D(64, 3, padding="same", activation="relu"), Conv2D(64, 3, padding="same", activation="relu"),
            MaxPool2D(2),
            Flatten(), Dense(128, activation="relu"), Dropout(0.5), Dense(num_classes, activation="softmax")]


def vgg_small_bn(num_classes=10):
    """vgg-small with BatchNorm between each convolution and its ReLU (the convolutions then need no bias of their
    own, but keep one here, as Keras's default does)."""
    layers = []
    for filters in (32, 32, "pool", 64, 64, "pool"):
        if filters == "pool":
            layers.append(MaxPool2D(2))
        else:
            layers += [Conv2D(filters, 3, padding="same"), BatchNorm2D(), ReLU()]
    return layers + [Flatten(), Dense(128, activation="relu"), Dropout(0.5),
                     Dense(num_classes, activation="softmax")]


PRESETS = {"mnist-cnn": mnist_cnn, "lenet5": lenet5, "vgg-small": vgg_small, "vgg-small-bn": vgg_small_bn}
# The data each preset is made for, (C, H, W): what the bench feeds a preset when no data set is named.
PRESET_INPUT_SHAPES = {"mnist-cnn": (1, 28, 28), "lenet5": (1, 28, 28), "vgg-small": (3, 32, 32),
                       "vgg-small-bn": (3, 32, 32)}
DEFAULT_PRESET = "mnist-cnn"

"""Which network the bench runs: `--model` (a preset's name or a JSON description, mnist-cnn by default) built for
an input shape, and the FLOPs its layers count.

The input shape is the first of: `--input-shape C,H,W`; the shape `--dataset` declares; the description's own
`input_shape`; the preset's usual data (presets.PRESET_INPUT_SHAPES: 3x32x32 for the VGG-style presets, MNIST's 1x28x28
for the rest and for a description that states none).
"""

from numba_cnn.errors import NumbaCNNError
from numba_cnn.model import DEFAULT_INPUT_SHAPE
from numba_cnn.network import DEFAULT_PRESET, from_dict, resolve_description
from numba_cnn.network.presets import PRESET_INPUT_SHAPES

DEFAULT_NUM_CLASSES = 10

FLOP_FORMULA = ("2 FLOPs per multiply-add of each layer's dense count (Layer.macs: convolution K*C*R*S*P*Q per "
                "image, Dense D*M, BatchNorm 2*C*H*W; pooling, ReLU, Flatten and Dropout none), times the batch. "
                "Backward: twice the forward (the input and the weight gradients), once for the first layer with "
                "parameters, which computes no input gradient; bias gradients and the like are not counted. "
                "Dense counts: work a kernel skips (zeros) is counted all the same. sgemm peak: 2*n^3 per n x n "
                "matmul.")


def parse_input_shape(text):
    """`--input-shape C,H,W` -> (C, H, W) of positive ints."""
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise NumbaCNNError(f"--input-shape must be C,H,W (three positive integers, e.g. 3,32,32), got {text!r}")
    return shape


def default_input_shape(model):
    """The shape of the data a preset is meant for; MNIST's for mnist-cnn, lenet5 and description files."""
    return PRESET_INPUT_SHAPES.get(DEFAULT_PRESET if model is None else model, DEFAULT_INPUT_SHAPE)


def bench_network(model=None, input_shape=None, dataset=None):
    """--model, --input-shape and --dataset as given (each may be None) -> the Network the bench runs (module
    docstring: which input shape). The data set's class count, where it declares one, sets the output's size."""
    num_classes = None
    if dataset is not None:
        from numba_cnn.data import get_dataset

        declared = get_dataset(dataset)
        num_classes = declared.num_classes or None
        input_shape = input_shape or declared.shape
    doc, _ = resolve_description(model, num_classes or DEFAULT_NUM_CLASSES)
    if input_shape is None and "input_shape" not in doc:
        input_shape = default_input_shape(model)
    return from_dict(doc, input_shape, num_classes)


def first_trained_layer(network):
    """Index of the first layer with parameters (len(layers) when none has): training runs no backward before it
    and computes no input gradient there."""
    return next((i for i, (layer, shape) in enumerate(zip(network.layers, network.shapes))
                 if layer.param_shapes(shape)), len(network.layers))


def layers_flops(network, indices, direction, need_dx=True):
    """FLOP_FORMULA for one image through the layers `indices` (in order), forward ("fwd") or backward ("bwd");
    need_dx=False: the first of them computes no input gradient."""
    flops = 0
    for position, i in enumerate(indices):
        macs = network.layers[i].macs(network.shapes[i])
        if direction == "bwd":
            macs *= 1 if position == 0 and not need_dx else 2
        flops += 2 * macs
    return flops


def flops_per_image(network):
    """-> (training FLOPs, inference FLOPs) of one image by FLOP_FORMULA: a training step runs every layer forward
    and, from the first layer with parameters on, backward."""
    first = first_trained_layer(network)
    forward = layers_flops(network, range(len(network.layers)), "fwd")
    backward = layers_flops(network, range(first, len(network.layers)), "bwd", need_dx=False)
    return forward + backward, forward

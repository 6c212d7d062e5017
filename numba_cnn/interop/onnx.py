"""A Network and its state as an ONNX model, written node by node from the description with the onnx package's
helper API (make_node, make_graph, make_model); an optional extra: pip install -e ".[export]".

The graph, opset 17 (IR version 8, so that runtimes from ONNX 1.12 on read it):
  input  "images":        float32 (N, C, H, W), the run's layout, pixels already scaled as training scaled them
                          (uint8 / 255: numba_cnn.kernels.host.as_float_images)
  output "logits":        float32 (N, classes), what numba_cnn's Model.forward returns
  output "probabilities": float32 (N, classes), Softmax of the logits over the classes
Each layer adds its inference pass (Layer.onnx_nodes): Conv with the layer's pads, Relu, MaxPool / AveragePool
(kernel_shape = strides = pool_size), GlobalAveragePool then Flatten, BatchNormalization on the running statistics,
Flatten, Gemm for Dense (w is (in, out): no transpose); Dropout adds nothing. The weights are initializers named
"<layer>.<key>", as in a checkpoint; the metadata holds the network's description and what the export adds (the
class names, the preprocessing).
"""

import json

import numpy as np

from numba_cnn.atomic import atomic_write
from numba_cnn.interop.common import network_and_state, require

OPSET = 17
IR_VERSION = 8  # the IR that came with opset 17
INPUT, LOGITS, PROBABILITIES = "images", "logits", "probabilities"


class OnnxGraph:
    """The nodes and initializers of a graph being written; Layer.onnx_nodes adds to it through node() and
    weight(). `layer` is the name of the layer being written, the prefix of its nodes' names."""

    def __init__(self, helper, numpy_helper):
        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.initializers, self.layer = [], [], ""

    def node(self, op, inputs, **attributes):
        """A node `op` reading the tensors named `inputs`, with ONNX attributes -> the name of its output."""
        output = f"{self.layer}/{op}_{len(self.nodes)}"
        self.nodes.append(self.helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def weight(self, layer, key, p):
        """p[key] (float32) as the initializer "<layer>.<key>" -> its name."""
        name = f"{layer.name}.{key}"
        self.initializers.append(self.numpy_helper.from_array(np.asarray(p[key], dtype=np.float32), name))
        return name

    def rename_output(self, old, new):
        """The tensor `old`, written by the last node that writes it, renamed `new` for every node reading it."""
        for node in self.nodes:
            node.output[:] = [new if name == old else name for name in node.output]
            node.input[:] = [new if name == old else name for name in node.input]


def to_onnx(model, state=None, metadata=None):
    """A numba_cnn Model, or a Network and its state -> an onnx.ModelProto (checked by onnx.checker) computing
    logits and probabilities from images as the module docstring says. metadata: {key: text} added to the model's
    metadata_props."""
    onnx = require("onnx")
    from onnx import TensorProto, helper, numpy_helper

    network, state = network_and_state(model, state)
    graph = OnnxGraph(helper, numpy_helper)
    x = INPUT
    for layer, shape in zip(network.layers, network.shapes):
        graph.layer = layer.name
        x = layer.onnx_nodes(graph, x, shape, layer.arrays(state, shape))
    if x == INPUT:  # a network that adds no node (Dropout alone) still outputs through one
        x = graph.node("Identity", [x])
    graph.rename_output(x, LOGITS)
    graph.nodes.append(helper.make_node("Softmax", [LOGITS], [PROBABILITIES], name=PROBABILITIES, axis=1))
    classes = network.output_shape[0]
    onnx_graph = helper.make_graph(
        graph.nodes, network.name or "numba_cnn",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", *network.input_shape])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", classes]) for name in (LOGITS, PROBABILITIES)],
        initializer=graph.initializers)
    proto = helper.make_model(onnx_graph, producer_name="numba_cnn", ir_version=IR_VERSION,
                              opset_imports=[helper.make_opsetid("", OPSET)])
    helper.set_model_props(proto, {"numba_cnn.network": json.dumps(network.to_dict()), **(metadata or {})})
    onnx.checker.check_model(proto, full_check=True)
    return proto


def save_onnx(proto, path):
    """The ModelProto at `path`, whole or not at all."""
    atomic_write(path, lambda f: f.write(proto.SerializeToString()))

"""A numba_cnn network and its weights as the same model in other frameworks, and back: torch.py (PyTorch's
nn.Sequential, and a state_dict file with its description), keras.py (a keras.Sequential, channels-last, and the
.keras file) and onnx.py (an ONNX graph written from the description). The mapping of each layer kind lives in its
module (Layer.torch_modules / keras_layers / onnx_nodes, the weight conversions, and from_torch_modules /
from_keras_layers, which read a foreign model's parts back); these modules walk the network and apply it.
files.py is what `export` and `train --init-from` do with files. Used by `bench --compare` too, whose baselines
start from numba_cnn's own initial weights. torch, keras and onnx are imported inside the functions only: numba_cnn
itself never needs them.
"""

from numba_cnn.interop.common import InteropError
from numba_cnn.interop.keras import from_keras, to_keras
from numba_cnn.interop.onnx import to_onnx
from numba_cnn.interop.torch import from_torch, to_torch

__all__ = ["InteropError", "from_keras", "from_torch", "to_keras", "to_onnx", "to_torch"]

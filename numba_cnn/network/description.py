"""A network as data: the layers in order, as a list of layer objects or as a JSON document, and the shapes that
follow from the input's (C, H, W).

The JSON document (docs/networks.md has the full list of kinds and settings):
    {"name": "small-cnn",
     "layers": [{"kind": "Conv2D", "filters": 32, "kernel_size": 3, "activation": "relu"},
                {"kind": "MaxPool2D", "pool_size": 2},
                {"kind": "Flatten"},
                {"kind": "Dense", "units": 10, "activation": "softmax"}]}
"input_shape": [C, H, W] is optional (the data set gives it; when present the two must agree). A document is read
with json.loads and checked key by key: it is data, never code. Every problem is a DescriptionError naming the
layer ("layer 3 (conv2, Conv2D): ...") and is raised before any array is made.
"""

import dataclasses
import json
import math
import re
from pathlib import Path

from numba_cnn.network.layers import KINDS, DescriptionError, Layer

FORMAT = "numba_cnn.network"
NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
MAX_LAYERS = 256
MAX_PARAMETERS = 100_000_000  # a small-CNN package: beyond this an init alone would take gigabytes
MAX_VALUES_PER_IMAGE = 50_000_000  # any one layer's output, per image
NAME_PREFIX = {"Conv2D": "conv", "MaxPool2D": "pool", "AvgPool2D": "avgpool", "GlobalAvgPool2D": "gap",
               "BatchNorm2D": "bn", "ReLU": "relu", "Flatten": "flatten", "Dropout": "dropout", "Dense": "dense"}
DOCUMENT_KEYS = ("format", "name", "input_shape", "layers")


@dataclasses.dataclass(frozen=True)
class Network:
    """Layers (each named) and the shape entering each: shapes[i] is layer i's input, shapes[-1] the output."""

    layers: tuple
    shapes: tuple
    name: str | None = None

    @property
    def input_shape(self):
        return self.shapes[0]

    @property
    def output_shape(self):
        return self.shapes[-1]

    def param_shapes(self):
        """{"layer.param": shape} of the trained parameters, in the order the layers run."""
        return {f"{layer.name}.{key}": shape for layer, shape in zip(self.layers, self.shapes)
                for key, shape in layer.param_shapes(shape).items()}

    def buffer_shapes(self):
        """{"layer.buffer": shape} of the saved, untrained state (BatchNorm's running statistics)."""
        return {f"{layer.name}.{key}": shape for layer, shape in zip(self.layers, self.shapes)
                for key, shape in layer.buffer_shapes(shape).items()}

    def num_params(self):
        return sum(math.prod(shape) for shape in self.param_shapes().values())

    def to_dict(self):
        """The JSON-ready description, input shape included: what runs and checkpoints store."""
        doc = {"format": FORMAT, "input_shape": list(self.input_shape),
               "layers": [layer.to_dict() for layer in self.layers]}
        return {"name": self.name, **doc} if self.name else doc

    def first_difference(self, other):
        """None when `other` describes the same network, else a line naming the first layer that differs."""
        if tuple(self.input_shape) != tuple(other.input_shape):
            return f"the input shapes differ: {list(self.input_shape)} against {list(other.input_shape)}"
        for i, (mine, theirs) in enumerate(zip(self.layers, other.layers), 1):
            if mine.to_dict() != theirs.to_dict():
                return f"layer {i} differs: {_entry(mine)} against {_entry(theirs)}"
        if len(self.layers) != len(other.layers):
            longer = self if len(self.layers) > len(other.layers) else other
            i = min(len(self.layers), len(other.layers)) + 1
            return f"layer {i} differs: {_entry(longer.layers[i - 1])} in one network, absent in the other"
        return None


def _entry(layer):
    return json.dumps(layer.to_dict(), separators=(", ", ": "))


def build(layers, input_shape, name=None, num_classes=None):
    """Layer objects (or description entries) + the input's (C, H, W) -> a Network with every shape worked out and
    every layer named; num_classes, when given, must be the network's output size."""
    input_shape = _check_input_shape(input_shape)
    layers = [parse_layer(entry, i) if not isinstance(entry, Layer) else entry
              for i, entry in enumerate(_check_layer_list(layers), 1)]
    layers = _named(layers)
    shapes = [input_shape]
    params = 0
    for i, layer in enumerate(layers, 1):
        try:
            out = tuple(layer.output_shape(shapes[-1]))
            params += sum(math.prod(s) for s in layer.param_shapes(shapes[-1]).values())
        except DescriptionError as exc:
            raise DescriptionError(f"layer {i} ({layer.name}, {layer.kind}): {exc}") from None
        if min(out) < 1:
            raise DescriptionError(f"layer {i} ({layer.name}, {layer.kind}) would shrink its {list(shapes[-1])} input "
                                   f"to {list(out)}: below 1x1")
        if math.prod(out) > MAX_VALUES_PER_IMAGE:
            raise DescriptionError(f"layer {i} ({layer.name}, {layer.kind}) would output {math.prod(out):,} values "
                                   f"per image; numba_cnn is for small networks (at most {MAX_VALUES_PER_IMAGE:,})")
        if params > MAX_PARAMETERS:
            raise DescriptionError(f"layer {i} ({layer.name}, {layer.kind}) brings the network to {params:,} "
                                   f"parameters; numba_cnn is for small networks (at most {MAX_PARAMETERS:,})")
        if getattr(layer, "activation", None) == "softmax" and i != len(layers):
            raise DescriptionError(f"layer {i} ({layer.name}, {layer.kind}): activation 'softmax' is allowed on the "
                                   f"last layer only (the loss applies it)")
        shapes.append(out)
    if len(shapes[-1]) != 1:
        raise DescriptionError(f"the network must end with a flat output (one score per class), but its last "
                               f"layer gives shape {list(shapes[-1])}: end with Flatten or GlobalAvgPool2D, then "
                               f"Dense")
    if num_classes is not None and shapes[-1][0] != num_classes:
        raise DescriptionError(f"the network ends with {shapes[-1][0]} outputs (layer {len(layers)}, "
                               f"{layers[-1].name}) but the data set has {num_classes} classes")
    return Network(tuple(layers), tuple(shapes), name)


def _check_input_shape(shape):
    if (not isinstance(shape, (list, tuple)) or len(shape) not in (1, 3)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
        raise DescriptionError(f"input_shape must be [C, H, W] (or [D]) of positive integers, got {shape!r}")
    return tuple(shape)


def _check_layer_list(layers):
    if not isinstance(layers, (list, tuple)) or not layers:
        raise DescriptionError(f"'layers' must be a non-empty list of layers, got {_short(layers)}")
    if len(layers) > MAX_LAYERS:
        raise DescriptionError(f"the description has {len(layers)} layers; at most {MAX_LAYERS} are supported")
    return layers


def parse_layer(entry, index):
    """One description entry {"kind": ..., settings...} -> its Layer object; a DescriptionError naming the layer."""
    if not isinstance(entry, dict):
        raise DescriptionError(f"layer {index}: each layer must be an object with a 'kind', got {_short(entry)}")
    kind_name = entry.get("kind")
    label = f"layer {index} ({entry['name']}, {kind_name})" if isinstance(entry.get("name"), str) else \
        f"layer {index} ({kind_name})"
    if not isinstance(kind_name, str) or kind_name not in KINDS:
        known = ", ".join(sorted({kind.kind for kind in KINDS.values()}))
        raise DescriptionError(f"layer {index}: unknown kind {_short(kind_name)}; the kinds are {known}")
    kind = KINDS[kind_name]
    settings = {key: value for key, value in entry.items() if key != "kind"}
    allowed = [f.name for f in dataclasses.fields(kind)]
    unknown = [key for key in settings if key not in allowed]
    if unknown:
        raise DescriptionError(f"{label}: unknown setting {unknown[0]!r}; {kind.kind} takes "
                               f"{', '.join(allowed)}")
    if "name" in settings:
        name = settings["name"]
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise DescriptionError(f"{label}: name must be a letter then up to 63 letters, digits, '_' or '-', "
                                   f"got {_short(name)}")
    try:
        return kind(**settings)
    except DescriptionError as exc:
        raise DescriptionError(f"{label}: {exc}") from None


def _named(layers):
    """Every layer with a name: its own, else its kind's prefix and a count (conv1, conv2, pool1, ...)."""
    taken = [layer.name for layer in layers if layer.name]
    duplicates = {name for name in taken if taken.count(name) > 1}
    if duplicates:
        raise DescriptionError(f"layer name {sorted(duplicates)[0]!r} is used more than once")
    counts, named = {}, []
    for layer in layers:
        if layer.name is None:
            prefix = NAME_PREFIX.get(layer.kind, layer.kind.lower())
            while True:
                counts[prefix] = counts.get(prefix, 0) + 1
                candidate = f"{prefix}{counts[prefix]}"
                if candidate not in taken:
                    break
            taken.append(candidate)
            layer = dataclasses.replace(layer, name=candidate)
        named.append(layer)
    return named


def from_dict(doc, input_shape=None, num_classes=None):
    """A description document (parsed JSON) -> Network. input_shape: the data's (C, H, W); when the document also
    states one they must agree."""
    if not isinstance(doc, dict):
        raise DescriptionError(f"a network description is a JSON object with a 'layers' list, got {_short(doc)}")
    unknown = [key for key in doc if key not in DOCUMENT_KEYS]
    if unknown:
        raise DescriptionError(f"unknown key {unknown[0]!r} in the description; it takes {', '.join(DOCUMENT_KEYS)}")
    if "format" in doc and doc["format"] != FORMAT:
        raise DescriptionError(f"'format' must be {FORMAT!r}, got {_short(doc['format'])}")
    if "layers" not in doc:
        raise DescriptionError("the description has no 'layers' list")
    name = doc.get("name")
    if name is not None and (not isinstance(name, str) or not NAME_PATTERN.match(name)):
        raise DescriptionError(f"'name' must be a letter then up to 63 letters, digits, '_' or '-', got {_short(name)}")
    stated = doc.get("input_shape")
    if stated is not None:
        stated = _check_input_shape(stated)
        if input_shape is not None and tuple(input_shape) != stated:
            raise DescriptionError(f"the network expects input of shape {list(stated)} but the data has "
                                   f"{list(input_shape)}")
    shape = stated if stated is not None else input_shape
    if shape is None:
        raise DescriptionError("the description states no input_shape and no data set gives one")
    return build(doc["layers"], shape, name=name, num_classes=num_classes)


def read_json(path):
    """A description file -> its parsed document; a DescriptionError naming the file for anything unreadable."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DescriptionError(f"cannot read network description {path}: {getattr(exc, 'strerror', None) or exc}") \
            from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise DescriptionError(f"{path} is not JSON: {exc}") from None


def _short(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

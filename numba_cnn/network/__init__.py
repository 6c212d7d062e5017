"""Networks as data: layer kinds (layers/), descriptions and their shapes (description.py), presets (presets.py)
and the fusion pass (plan.py). `resolve_description` turns what the user names (a preset or a JSON file) into a
description document."""

from pathlib import Path

from numba_cnn.network.description import FORMAT, Network, build, from_dict, read_json  # noqa: F401
from numba_cnn.network.layers import KINDS, DescriptionError, Layer  # noqa: F401
from numba_cnn.network.presets import DEFAULT_PRESET, PRESETS


def preset_document(name, num_classes=10):
    layers = PRESETS[name](num_classes)
    return {"format": FORMAT, "name": name, "layers": [layer.to_dict() for layer in layers]}


def resolve_description(model, num_classes=10):
    """`--model` as typed: a preset's name or the path of a JSON description -> (document, where it came from)."""
    model = DEFAULT_PRESET if model is None else model
    if model in PRESETS:
        return preset_document(model, num_classes), f"preset {model}"
    if model.endswith(".json") or Path(model).exists():
        return read_json(model), str(model)
    raise DescriptionError(f"--model {model!r} is neither a preset ({', '.join(PRESETS)}) nor a .json file")

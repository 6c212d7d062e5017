"""What `python -m numba_cnn export` writes and what `train --init-from` reads.

export: a checkpoint (or run folder) -> one of FORMATS at --out:
  onnx   the ONNX model (interop/onnx.py), any name (.onnx by custom)
  torch  the state_dict (tensors only) at --out (.pt), the network's description beside it (<name>.json)
  keras  the .keras file (the name must end in .keras: Keras reads no other)
Every file appears whole or not at all (numba_cnn.atomic); a file already there is replaced only with force.

--init-from: a numba_cnn checkpoint or run folder, a state_dict with its description beside it (.pt, .pth), or a
.keras file -> (network, state), checked against the network asked for, if any. Nothing is unpickled beyond
tensors (torch.load(weights_only=True)) and Keras loads in safe mode.
"""

import json
from pathlib import Path

from numba_cnn import checkpoint as ckpt
from numba_cnn.interop.common import InteropError, adopt, require
from numba_cnn.predict import run_preprocessing

FORMATS = ("onnx", "torch", "keras")
TORCH_SUFFIXES = (".pt", ".pth")


def export_paths(format, out):
    """The files an export to `out` writes, checked for their names."""
    out = Path(out)
    if format not in FORMATS:
        raise InteropError(f"unknown format {format!r}: choose {', '.join(FORMATS[:-1])} or {FORMATS[-1]}")
    if format == "keras" and out.suffix != ".keras":
        raise InteropError(f"--out {out}: a Keras model file's name must end in .keras")
    if format == "torch":
        from numba_cnn.interop.torch import description_path

        if out.suffix == ".json":
            raise InteropError(f"--out {out}: the state_dict's name must not end in .json: its description is "
                               f"written beside it as <name>.json")
        return [out, description_path(out)]
    return [out]


def export(checkpoint, format, out, force=False):
    """Write the checkpoint's network and weights as `format` to `out` -> (the paths written, a line saying what
    the files take and give). InteropError (one line) for an unknown format, a file in the way (without force), a
    missing extra or an unwritable path; nothing is left half-written."""
    paths = export_paths(format, out)
    require(format)  # the package each format needs has the format's name
    params, _, meta, network = ckpt.load_checkpoint(ckpt.checkpoint_path(checkpoint))
    for target in paths:
        if target.is_dir():
            raise InteropError(f"--out {target} is a folder; give a file name")
        if target.exists() and not force:
            raise InteropError(f"{target} exists; pass --force to replace it")
        if not target.parent.is_dir():
            why = "is not a folder" if target.parent.exists() else "does not exist"
            raise InteropError(f"cannot write {target}: {target.parent} {why}")
    try:
        return paths, WRITERS[format](network, params, run_preprocessing(meta, network), paths[0])
    except OSError as exc:
        raise InteropError(f"cannot write {out}: {exc.strerror or exc}") from None


def _input(shape):
    return f"(N, {', '.join(map(str, shape))}) float32, pixels / 255"


def _write_onnx(network, params, preprocessing, path):
    from numba_cnn.interop.onnx import INPUT, LOGITS, OPSET, PROBABILITIES, save_onnx, to_onnx

    metadata = {"class_names": json.dumps(list(preprocessing.class_names)),
                "preprocessing": f"{INPUT}: uint8 pixels as {_input(network.input_shape)}"}
    save_onnx(to_onnx(network, params, metadata), path)
    return f"ONNX opset {OPSET}: input '{INPUT}' {_input(network.input_shape)}; outputs '{LOGITS}', '{PROBABILITIES}'"


def _write_torch(network, params, preprocessing, path):
    from numba_cnn.interop.torch import save_torch

    save_torch(network, params, path)
    return f"PyTorch state_dict and network description: input {_input(network.input_shape)}; output logits"


def _write_keras(network, params, preprocessing, path):
    from numba_cnn.interop.keras import channels_last, save_keras

    save_keras(network, params, path)
    output = "probabilities" if getattr(network.layers[-1], "activation", None) == "softmax" else "logits"
    return f"Keras model: channels-last input {_input(channels_last(network.input_shape))}; output {output}"


WRITERS = {"onnx": _write_onnx, "torch": _write_torch, "keras": _write_keras}


def read_weights(path, network=None):
    """The weights in `path` for `train --init-from` -> (network, state keyed by its layer names). With `network`
    (the one --model asks for), the file's must compute the same function; an InteropError names the first layer
    that differs."""
    path = Path(path)
    if not path.exists():
        raise InteropError(f"--init-from {path} does not exist")
    if path.is_dir() or path.suffix == ".npz":
        checkpoint = ckpt.checkpoint_path(path)
        params, _, _, held = ckpt.load_checkpoint(checkpoint)
        return (held, params) if network is None else (network, adopt(held, params, network, str(checkpoint)))
    if path.suffix == ".keras":
        from numba_cnn.interop.keras import load_keras

        return load_keras(path, network)
    if path.suffix in TORCH_SUFFIXES:
        from numba_cnn.interop.torch import load_torch

        return load_torch(path, network)
    raise InteropError(f"--init-from {path}: expected a numba_cnn checkpoint (.npz) or run folder, a PyTorch "
                       f"state_dict ({', '.join(TORCH_SUFFIXES)}) with its description (.json) beside it, or a "
                       f".keras file")

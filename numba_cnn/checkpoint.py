"""Checkpoints and run files, written so that a kill at any moment leaves the previous version intact.

A checkpoint is one .npz: `param.<name>` for every parameter and buffer (BatchNorm's running statistics),
`adam.<key>` for the optimizer (both moments per parameter and the step count), and `meta`, a JSON string holding
the format version, the network's description, run config, epoch and step, both RNG states and the metrics so far.
It loads with allow_pickle=False: no code runs when a file is opened, and the description is checked as any
description file is. Version 1 checkpoints, written before networks were data, hold the mnist-cnn network.
"""

import json
import zipfile
from pathlib import Path

import numpy as np

from numba_cnn.atomic import atomic_write
from numba_cnn.errors import CheckpointError
from numba_cnn.network import DescriptionError, from_dict

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
META_KEYS = ("config", "epoch", "step", "order_rng_epoch_start", "dropout_rng", "history")


def save_checkpoint(path, params, adam_state, meta):
    """params: {name: host array}; adam_state: Adam.state_dict(); meta: JSON-serialisable dict."""
    arrays = {f"param.{name}": value for name, value in params.items()}
    arrays.update({f"adam.{key}": value for key, value in adam_state.items()})
    arrays["meta"] = np.array(json.dumps(dict(meta, format_version=FORMAT_VERSION)))
    atomic_write(path, lambda f: np.savez(f, **arrays))


CHECKPOINT_NAME = "checkpoint.npz"  # in a run folder


def checkpoint_path(path):
    """A checkpoint file as given, or the checkpoint inside a run folder."""
    path = Path(path)
    if path.is_dir():
        inside = path / CHECKPOINT_NAME
        if not inside.is_file():
            raise CheckpointError(f"{path} is a folder without a {CHECKPOINT_NAME}: not a finished run folder")
        return inside
    return path


def load_checkpoint(path):
    """-> (params, adam_state, meta, network): params holds parameters and buffers by name, network the Network the
    checkpoint's description builds. Raises CheckpointError naming the file for anything missing or wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {key: z[key] for key in z.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, RecursionError) as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict) or meta.get("format_version") not in READABLE_VERSIONS:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"checkpoint {path} has format version {version!r}; this numba_cnn reads versions "
                              f"{', '.join(map(str, READABLE_VERSIONS))}")
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: not a numba_cnn training checkpoint")
    network = checkpoint_network(meta, path)
    params = {key[len("param."):]: value for key, value in arrays.items() if key.startswith("param.")}
    adam_state = {key[len("adam."):]: value for key, value in arrays.items() if key.startswith("adam.")}
    param_shapes = network.param_shapes()
    wanted = {**param_shapes, **network.buffer_shapes()}
    if meta["format_version"] == 1:
        wanted = param_shapes  # no buffers then
    if set(params) != set(wanted):
        raise CheckpointError(f"checkpoint {path} holds arrays {sorted(params)}, not its network's {sorted(wanted)}")
    for name, shape in wanted.items():
        if params[name].shape != tuple(shape) or params[name].dtype.kind != "f":
            raise CheckpointError(f"checkpoint {path} is damaged: {name} has shape {params[name].shape} and dtype "
                                  f"{params[name].dtype}, its network needs float {tuple(shape)}")
    expected_adam = {"iterations"} | {f"{moment}.{name}" for moment in "mv" for name in param_shapes}
    if set(adam_state) != expected_adam or any(adam_state[f"{moment}.{name}"].shape != tuple(shape)
                                               for moment in "mv" for name, shape in param_shapes.items()):
        raise CheckpointError(f"checkpoint {path} lacks a complete optimizer state for its network")
    return params, adam_state, meta, network


def checkpoint_network(meta, path):
    """The Network a checkpoint's meta describes (version 1: mnist-cnn on MNIST's shape)."""
    from numba_cnn.model import default_network

    if meta.get("format_version") == 1:
        return default_network()
    try:
        return from_dict(meta.get("network"))
    except DescriptionError as exc:
        raise CheckpointError(f"checkpoint {path} holds an unusable network description: {exc}") from None

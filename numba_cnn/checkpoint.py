"""Checkpoints and run files, written so that a kill at any moment leaves the previous version intact.

A checkpoint is one .npz: `param.<name>` for every parameter, `adam.<key>` for the optimizer (both moments per
parameter and the step count), and `meta`, a JSON string holding the format version, run config, epoch and step,
both RNG states and the metrics so far. It loads with allow_pickle=False: no code runs when a file is opened.
"""

import json
import zipfile
from pathlib import Path

import numpy as np

from numba_cnn.atomic import atomic_write
from numba_cnn.errors import CheckpointError
from numba_cnn.model import PARAM_SHAPES

FORMAT_VERSION = 1
META_KEYS = ("config", "epoch", "step", "order_rng_epoch_start", "dropout_rng", "history")


def save_checkpoint(path, params, adam_state, meta):
    """params: {name: host array}; adam_state: Adam.state_dict(); meta: JSON-serialisable dict."""
    arrays = {f"param.{name}": value for name, value in params.items()}
    arrays.update({f"adam.{key}": value for key, value in adam_state.items()})
    arrays["meta"] = np.array(json.dumps(dict(meta, format_version=FORMAT_VERSION)))
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_checkpoint(path):
    """-> (params, adam_state, meta). Raises CheckpointError naming the file for anything missing or wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {key: z[key] for key in z.files}
        meta = json.loads(str(arrays.pop("meta")))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {exc})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {meta.get('format_version')!r}; "
                              f"this numba_cnn reads version {FORMAT_VERSION}")
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: not a numba_cnn training checkpoint")
    params = {key[len("param."):]: value for key, value in arrays.items() if key.startswith("param.")}
    adam_state = {key[len("adam."):]: value for key, value in arrays.items() if key.startswith("adam.")}
    if set(params) != set(PARAM_SHAPES):
        raise CheckpointError(f"checkpoint {path} holds parameters {sorted(params)}, not this model's "
                              f"{sorted(PARAM_SHAPES)}")
    for name, shape in PARAM_SHAPES.items():
        if params[name].shape != shape:
            raise CheckpointError(f"checkpoint {path} is from a different model: {name} has shape "
                                  f"{params[name].shape}, this model needs {shape}")
    expected_adam = {"iterations"} | {f"{moment}.{name}" for moment in "mv" for name in PARAM_SHAPES}
    if set(adam_state) != expected_adam or any(adam_state[f"{moment}.{name}"].shape != shape
                                               for moment in "mv" for name, shape in PARAM_SHAPES.items()):
        raise CheckpointError(f"checkpoint {path} lacks a complete optimizer state for this model")
    return params, adam_state, meta

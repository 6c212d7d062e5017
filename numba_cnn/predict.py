"""python -m numba_cnn predict: a trained network's verdict on image files, PNG or JPEG, grey or RGB.

Each image goes through what training did to its data set's images, read from the run's record (the checkpoint's
config "data": the images' shape (C, H, W) and the class names): its uint8 pixels, in (C, H, W) order, scaled to
float32 by numba_cnn.kernels.host.as_float_images (pixel / 255), the one function training and `evaluate` scale with. An
image of another size or channel count is refused with what the network expects, unless resize is asked for: then
it is stretched to the network's height and width (Pillow, bilinear) and converted to grey (Pillow's ITU-R 601-2
luma) or to RGB (the grey value in each channel), whichever the network takes.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from numba_cnn.data import DATASETS
from numba_cnn.data.folder import describe_image, read_image
from numba_cnn.errors import CheckpointError, NumbaCNNError

FORMATS = ("PNG", "JPEG")
TOP = 3  # classes shown per image
BATCH = 256


class ImageError(NumbaCNNError):
    """An image file that is missing, unreadable, or does not fit the network; the message names the file."""


@dataclass(frozen=True)
class Preprocessing:
    """What a run's network takes: uint8 images of `shape` (C, H, W), C 1 (grey) or 3 (RGB), scaled by
    as_float_images; label k is class_names[k]."""

    shape: tuple
    class_names: tuple

    def describe(self):
        return f"{describe_image(self.shape)} images ({'x'.join(map(str, self.shape))}), pixels / 255"


def run_preprocessing(meta, network):
    """The Preprocessing of the run a checkpoint's `meta` records, for its `network`: the recorded shape and class
    names; a record from before they were kept gives the network's input shape and its data set's class names
    (numbers where the data set names none)."""
    record = meta["config"].get("data") or {}
    shape = tuple(record.get("shape") or network.input_shape)
    if shape != tuple(network.input_shape):
        raise CheckpointError(f"the checkpoint's run read images of shape {list(shape)} but its network takes "
                              f"{list(network.input_shape)}")
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise CheckpointError(f"the checkpoint's network takes input of shape {list(shape)}, not grey or RGB "
                              f"images (C, H, W) with C 1 or 3")
    known = DATASETS.get(record.get("dataset"))
    names = record.get("class_names") or (known.class_names if known else ())
    classes = network.output_shape[0]
    if len(names) != classes:
        names = [str(k) for k in range(classes)]
    return Preprocessing(shape, tuple(names))


def load_image(file, preprocessing, resize=False):
    """One image file -> (uint8 pixels of preprocessing.shape, what it was before --resize ("56x56 RGB") or None)."""
    if not Path(file).is_file():
        raise ImageError(f"{file}: no such file")
    pixels = read_image(file, FORMATS)
    shape = preprocessing.shape
    if pixels.shape == shape:
        return pixels, None
    if not resize:
        raise ImageError(f"{file}: {describe_image(pixels.shape)}, but the network takes {preprocessing.describe()};"
                         f" pass --resize to stretch and convert it")
    from PIL import Image

    image = Image.fromarray(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0))
    image = image.convert("L" if shape[0] == 1 else "RGB").resize((shape[2], shape[1]), Image.Resampling.BILINEAR)
    fitted = np.asarray(image)
    return (fitted[np.newaxis] if fitted.ndim == 2 else fitted.transpose(2, 0, 1)), describe_image(pixels.shape)


def logits(model, images, batch_size=BATCH):
    """uint8 or float images (N, C, H, W) -> numba_cnn's logits (N, classes) on the host, scaled as training
    scaled them (as_float_images)."""
    backend = model.backend
    return np.concatenate([np.asarray(backend.to_host(model.forward(backend.as_float_images(
        backend.to_device(images[i:i + batch_size]))))) for i in range(0, len(images), batch_size)])


def softmax(z):
    """Probabilities from logits, row by row, in float64."""
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def classify(model, files, preprocessing, resize=False):
    """-> one dict per file: "image", "class" (the predicted class's name), "label" (its number), "top" (the TOP
    likeliest classes, each {"class", "label", "probability"}) and, where resized, "resized_from". Every file is
    read and checked before the network runs; the first problem is an ImageError naming the file."""
    loaded = [load_image(file, preprocessing, resize) for file in files]
    scores = logits(model, np.stack([pixels for pixels, _ in loaded]))
    probabilities = softmax(scores)
    results = []
    for file, (_, resized), row, p in zip(files, loaded, scores, probabilities):
        order = np.argsort(-row, kind="stable")[:TOP]  # ties: the lower label first, as argmax takes it
        top = [{"class": preprocessing.class_names[k], "label": int(k), "probability": float(p[k])} for k in order]
        result = {"image": str(file), "class": top[0]["class"], "label": top[0]["label"], "top": top}
        if resized:
            result["resized_from"] = resized
        results.append(result)
    return results


def format_results(results):
    """The results as a table: a row per image, its predicted class, then the TOP likeliest with probabilities."""
    rows = [(r["image"], r["class"], "   ".join(f"{t['class']}: {100 * t['probability']:.2f}%" for t in r["top"])
             + (f"   (resized from {r['resized_from']})" if "resized_from" in r else "")) for r in results]
    header = ("image", "class", f"top {TOP}")
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(2)]
    return "\n".join(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}".rstrip() for a, b, c in [header] + rows)


def format_json(results):
    return json.dumps(results, indent=2)

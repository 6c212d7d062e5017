"""A data set as a folder of PNG images per class: DIR/train/<class>/*.png and DIR/test/<class>/*.png.

The class names are the sorted subfolder names of train/ (hidden ones skipped), and test/ must have the same ones;
a class's label is its place in that order. Every image is one size and all are grey or all colour: 8-bit grey
(and 1-bit, read as grey) gives C=1, RGB (and palette images, read as RGB) C=3. Images with an alpha channel are
refused rather than flattened: what transparent pixels should look like is the user's decision, not ours. PNGs are
decoded by Pillow (imported only here, when a folder is read), restricted to its PNG decoder.
"""

import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np

from numba_cnn.errors import DataError

SPLITS = ("train", "test")
MAX_CLASSES = 256  # labels are uint8
MAX_PIXELS = 4096 * 4096  # per image; this is for small CNNs, and the check comes before decoding
GREY_MODES = ("L", "1")
COLOUR_MODES = ("RGB", "P")
ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")

# What Pillow can raise on a damaged file (its UnidentifiedImageError is an OSError, and SyntaxError its "broken PNG
# file"); read_image adds Pillow's DecompressionBombError.
_PNG_ERRORS = (OSError, ValueError, SyntaxError, EOFError, zlib.error, struct.error)


def read_image_folder(path):
    """The folder at path -> (x_train, y_train, x_test, y_test, class_names, sha256): images uint8 (N, C, H, W),
    labels uint8 (N,), the class names in label order, and {"train": ..., "test": ...}, each the SHA-256 of that
    split's decoded images and labels (split_sha256). DataError naming the file or folder for anything off."""
    path = Path(path)
    class_names = _class_names(path)
    read = {split: [(file, label, read_image(file)) for label, name in enumerate(class_names)
                    for file in _png_files(path / split / name)] for split in SPLITS}
    first_file, _, first_image = read["train"][0]
    for file, _, image in read["train"] + read["test"]:
        if image.shape != first_image.shape:
            raise DataError(f"{file}: {describe_image(image.shape)}, but the first image, {first_file}, is "
                            f"{describe_image(first_image.shape)}: all images must be one size, and all grey or all "
                            f"RGB")
    arrays, sha256 = [], {}
    for split in SPLITS:
        images = np.stack([image for _, _, image in read[split]])
        labels = np.array([label for _, label, _ in read[split]], dtype=np.uint8)
        arrays += [images, labels]
        sha256[split] = split_sha256(images, labels)
    return (*arrays, class_names, sha256)


def _png_files(folder):
    """The *.png files of one class folder, sorted; a DataError when there are none."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png" and p.is_file())
    if not files:
        raise DataError(f"{folder}: no PNG images (*.png) in this class folder")
    return files


def split_sha256(images, labels):
    """The SHA-256 of one split's decoded images (N, C, H, W) and labels (N,), their shape included."""
    digest = hashlib.sha256(repr(images.shape).encode())
    digest.update(np.ascontiguousarray(images))
    digest.update(np.ascontiguousarray(labels))
    return digest.hexdigest()


def _class_names(path):
    """The sorted class folder names of path/train, checked against those of path/test."""
    found = {}
    for split in SPLITS:
        folder = path / split
        if not folder.is_dir():
            raise DataError(f"{path}: no {split}/ folder; expected {path}/train/<class>/*.png and "
                            f"{path}/test/<class>/*.png")
        found[split] = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = found["train"]
    if not names:
        raise DataError(f"{path / 'train'}: no class folders; expected {path}/train/<class>/*.png")
    if len(names) > MAX_CLASSES:
        raise DataError(f"{path / 'train'}: {len(names)} class folders, more than {MAX_CLASSES}")
    if found["test"] != names:
        missing = [n for n in names if n not in found["test"]]
        extra = [n for n in found["test"] if n not in names]
        what = "; ".join(part for part in (f"missing {', '.join(missing)}" if missing else "",
                                           f"not in train/: {', '.join(extra)}" if extra else "") if part)
        raise DataError(f"{path / 'test'}: its class folders differ from those of train/ ({what})")
    return tuple(names)


def read_image(file, formats=("PNG",)):
    """One image in one of Pillow's `formats` (a folder reads PNG only; `predict` PNG and JPEG) -> uint8 (C, H, W),
    C 1 for grey or 3 for RGB."""
    from PIL import Image

    try:
        with Image.open(file, formats=list(formats)) as image:
            if image.width * image.height > MAX_PIXELS:
                raise DataError(f"{file}: {image.width}x{image.height} pixels, more than this loader takes "
                                f"({MAX_PIXELS}); resize the images first")
            mode = image.mode
            if mode in ALPHA_MODES or (mode == "P" and "transparency" in image.info):
                raise DataError(f"{file}: has an alpha channel (mode {mode}); save the images as grey or RGB "
                                "without transparency")
            if mode not in GREY_MODES + COLOUR_MODES:
                raise DataError(f"{file}: pixel mode {mode}; expected 8-bit grey or RGB")
            pixels = np.asarray(image.convert("L" if mode in GREY_MODES else "RGB"))
    except DataError:
        raise
    except (*_PNG_ERRORS, Image.DecompressionBombError) as exc:
        raise DataError(f"{file}: cannot read as a {' or '.join(formats)} image ({type(exc).__name__}: {exc})") \
            from None
    return pixels[np.newaxis] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def describe_image(shape):
    """(C, H, W) -> "WxH grey" or "WxH RGB", as messages name an image's size."""
    channels, height, width = shape
    return f"{width}x{height} {'grey' if channels == 1 else 'RGB'}"

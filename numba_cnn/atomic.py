"""Writing files so that a kill at any moment leaves the previous version (or nothing) behind, never half a file."""

import json
import os
import tempfile
from pathlib import Path


def atomic_write(path, write):
    """Call write(binary_file) on a temporary file beside `path`, flush and fsync it, then rename it over `path`.
    Readers see the old file or the new one; if write raises (or the process is interrupted), the temporary file
    is removed and `path` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the mode a plain open() would
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_json(path, obj):
    """obj as indented JSON, atomically; numpy scalars are written as numbers."""
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, default=float) + "\n").encode("utf-8")))


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder):
    """Make the rename itself durable; some platforms cannot open a folder for that, so best effort."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

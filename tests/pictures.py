"""What every test of a picture checks: the file is a whole PNG of a sensible size."""

import struct
import zlib

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_width=400, min_height=300, max_side=6000, min_bytes=10_000):
    """`path` is a PNG (signature, an IHDR chunk whose CRC matches, an IEND chunk at the end) between the given
    sizes in pixels and of at least min_bytes (a chart is tens of kB; a blank figure a few); -> (width, height)."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13, f"{path}: no IHDR chunk first"
    header = data[16:29]
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(b"IHDR" + header), f"{path}: IHDR CRC mismatch"
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82", f"{path} is cut short (no IEND chunk at the end)"
    width, height = struct.unpack(">II", header[:8])
    assert min_width <= width <= max_side and min_height <= height <= max_side, (path, width, height)
    assert len(data) >= min_bytes, f"{path} is only {len(data)} bytes: an empty figure?"
    return width, height

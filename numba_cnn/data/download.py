"""A checked, atomic download: streamed into a temporary file, checked against its SHA-256, renamed into place."""

import hashlib
import http.client
import time
import urllib.error
import urllib.request
from pathlib import Path

from numba_cnn.atomic import atomic_write
from numba_cnn.errors import DataError

DOWNLOAD_TIMEOUT_S = 30  # per connect / per read
DOWNLOAD_DEADLINE_S = 1800  # whole transfer (CIFAR-10's 170 MB at 100 kB/s); a trickling server must not hang forever
DOWNLOAD_MAX_BYTES = 200 * 2**20  # the largest real file is CIFAR-10's archive, 170 MB; refuse to fill the disk
CHUNK = 1 << 20




def download_file(url, dest, *, sha256=None, timeout=DOWNLOAD_TIMEOUT_S):
    """Fetch url into dest atomically: streamed into a temporary file beside dest, checked against sha256 (if
    given), flushed and fsynced, then renamed over dest. On any failure no file (final or temporary) is left."""
    dest = Path(dest)

    def fetch_and_check(out):
        digest = _stream_to(url, out, timeout)
        if sha256 is not None and digest != sha256.lower():
            raise DataError(f"{url}: SHA-256 mismatch: got {digest}, expected {sha256} (nothing saved)")

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(dest, fetch_and_check)
    except OSError as exc:  # a local write error: disk full, permissions
        raise DataError(f"{dest}: cannot save the download ({exc})") from None


def _stream_to(url, out, timeout):
    """Copy the body at url into the open file out; returns its SHA-256 hex digest. Network errors -> DataError;
    write errors on out are left as OSError for the caller."""
    digest = hashlib.sha256()
    deadline = time.monotonic() + DOWNLOAD_DEADLINE_S
    received = 0
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as exc:
        raise DataError(f"{url}: HTTP error {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise DataError(f"{url}: cannot connect ({exc.reason})") from None
    except (OSError, http.client.HTTPException) as exc:
        raise DataError(f"{url}: cannot connect ({type(exc).__name__}: {exc})") from None
    except ValueError as exc:  # a malformed URL
        raise DataError(f"{url}: bad URL ({exc})") from None
    with response:
        while True:
            try:
                chunk = response.read(CHUNK)
            except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, a body cut short
                raise DataError(f"{url}: download failed after {received} bytes "
                                f"({type(exc).__name__}: {exc})") from None
            if not chunk:
                break
            received += len(chunk)
            if received > DOWNLOAD_MAX_BYTES:
                raise DataError(f"{url}: more than {DOWNLOAD_MAX_BYTES} bytes, too large for a data set file")
            if time.monotonic() > deadline:
                raise DataError(f"{url}: download took longer than {DOWNLOAD_DEADLINE_S} s")
            digest.update(chunk)
            out.write(chunk)
        # read(n) just returns b"" when the connection drops early, so the declared length is checked here.
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) != received:
            raise DataError(f"{url}: download cut short: received {received} of {declared} bytes")
    return digest.hexdigest()

"""Threads, memory and the machine: how many threads Numba and BLAS get, how malloc keeps freed memory, what the
run record says about the machine, and the sgemm peak the bench measures kernels against.

BLAS threads follow the backend's BackendInfo.blas_threads: "one" for a backend whose own threads do the heavy
work (jit), as many as the compute threads otherwise.
"""

import ctypes
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from numba_cnn.errors import NumbaCNNError, check_int_flag

SGEMM_SIZE = 2048
SGEMM_REPEATS = 3
STREAM_MIB = 64  # per array; the three arrays of the add are several times a typical L3, so it measures memory
STREAM_METHOD = ("STREAM's add c = a + b over float32 arrays of {mib} MiB each, split between {threads} thread(s); "
                 "GB/s counts the bytes read and written (12 per element), not the write-allocate reads")


# glibc's malloc hands the free top of its heap back to the system once more than M_TRIM_THRESHOLD bytes lie
# there, and its default threshold moves with the sizes freed. A training step frees and makes again a few megabytes
# of batch-sized arrays (dropout's y and mask, the dense layer's dx, the scaled batch): when the heap was trimmed
# between steps each came back as fresh pages, hundreds of page faults a step in `train`, a sizeable share of a jit
# epoch. Keeping up to HEAP_KEPT_BYTES free, and serving allocations below MMAP_MIN_BYTES from the heap, makes a
# step fault-free; memory the process once held stays held for reuse.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (glibc malloc.h)
HEAP_KEPT_BYTES = 256 << 20
MMAP_MIN_BYTES = 32 << 20


def keep_freed_heap():
    """Set glibc's malloc to keep freed memory for reuse (see above) -> True where it could (glibc); elsewhere it
    does nothing and returns False."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): their allocators manage this themselves
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_MIN_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, HEAP_KEPT_BYTES))


def default_threads():
    """All CPUs this process may run on, capped by the threads Numba started with."""
    import numba

    return min(usable_cpus(), numba.config.NUMBA_NUM_THREADS)


def usable_cpus():
    """The CPUs this process may run on (its affinity), without importing Numba."""
    return len(os.sched_getaffinity(0))


def set_threads(threads, backend=None):
    """Numba's thread count (`threads`, default all) and BLAS's (the same, or one where `backend`'s info says so)
    for the whole run; returns what the run record should say about them."""
    import numba

    if check_int_flag("threads", threads, optional=True) is not None:
        if threads > numba.config.NUMBA_NUM_THREADS:
            raise NumbaCNNError(f"--threads {threads} exceeds the {numba.config.NUMBA_NUM_THREADS} threads Numba "
                                f"started with (set NUMBA_NUM_THREADS to allow more)")
        numba.set_num_threads(threads)
    blas_threads = 1 if backend is not None and backend.info.blas_threads == "one" else threads
    return {"numba_threads": numba.get_num_threads(), "blas": set_blas_threads(blas_threads)}


def set_blas_threads(threads):
    """BLAS's thread count alone (None: leave it), without importing Numba -> what each BLAS library now has.
    A framework's process in `bench --compare` sets only this: Numba's import would add its memory to the
    framework's peak, and starting Numba's OpenMP thread pool slows PyTorch's training steps (docs/results.md)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    if threads is not None:
        threadpool_limits(threads, user_api="blas")
    return [{"library": i.get("internal_api"), "threads": i.get("num_threads")} for i in threadpool_info()
            if i.get("user_api") == "blas"]


def threading_layer():
    import numba

    try:
        return numba.threading_layer()
    except ValueError:  # no parallel kernel has run in this process
        return None


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_record():
    import numba

    return {"python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__,
            "machine": platform.machine(), "processor": cpu_name(), "cpus": os.cpu_count()}


def machine_description(threads_record):
    """machine_record plus usable CPUs, load, thread settings and BLAS libraries, for the bench's JSON records."""
    import threadpoolctl

    record = machine_record()
    record["usable_cpus"] = usable_cpus()
    record["load_average_1_5_15min"] = os.getloadavg()  # other work on the box, which skews every timing
    record["numba_threading_layer"] = threading_layer() or "none started (no parallel kernel ran)"
    record["threads"] = threads_record
    record["blas"] = [{key: info.get(key) for key in ("internal_api", "version", "num_threads", "architecture",
                                                       "threading_layer")}
                      for info in threadpoolctl.threadpool_info() if info.get("user_api") == "blas"]
    record["threadpoolctl"] = threadpoolctl.__version__
    return record


def sgemm_gflops(n=SGEMM_SIZE, repeats=SGEMM_REPEATS, seed=0):
    """GFLOP/s of an n x n x n float32 matmul through numpy's BLAS, one figure per repeat after a warm-up call:
    the machine's practical float32 peak, measured beside the kernels it is compared with."""
    rng = np.random.default_rng(seed)
    a = rng.random((n, n), dtype=np.float32)
    b = rng.random((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    np.matmul(a, b, out=out)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.matmul(a, b, out=out)
        rates.append(2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    return rates


def stream_gbs(threads=1, mib=STREAM_MIB, repeats=SGEMM_REPEATS):
    """GB/s of a streaming add (STREAM_METHOD) over arrays far larger than the last-level cache, one figure per
    repeat after a warm-up pass: the memory bandwidth a kernel that streams its data can hope for. numpy releases
    the GIL in the add, so `threads` Python threads each take a slice."""
    n = mib * 2 ** 20 // 4
    a, b, c = np.full(n, 1.0, np.float32), np.full(n, 2.0, np.float32), np.empty(n, np.float32)
    bounds = np.linspace(0, n, threads + 1).astype(int)
    slices = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]

    def add(part):
        np.add(a[part], b[part], out=c[part])

    rates = []
    with ThreadPoolExecutor(threads) as pool:
        for repeat in range(repeats + 1):
            start = time.perf_counter()
            list(pool.map(add, slices))
            if repeat:  # the first pass is the warm-up: page faults, thread start
                rates.append(3 * 4 * n / (time.perf_counter() - start) / 1e9)
    return rates

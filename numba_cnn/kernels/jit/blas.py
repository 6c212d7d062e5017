"""numpy's own OpenBLAS, called from compiled code: the address of its CBLAS sgemm and dgemm, for kernels that run
one BLAS product on each of Numba's threads (`_numba_ext.call_gemm`).

The jit backend holds BLAS to one thread beside Numba's (runtime.set_threads: two thread pools spinning on two cores
slow both), so a large matmul from numpy runs on one core. A kernel can instead hand independent products to
Numba's threads, each running BLAS's single-threaded code on its own thread: the dense layer's backward, whose two
products (dx and dw) are the same size. Found only for an OpenBLAS (the one numpy's wheels bundle; threadpoolctl
names its file) whose CBLAS symbols are known and which runs one thread; otherwise `gemm_address` gives None and
the caller keeps numpy's matmul.
"""

import ctypes

import numpy as np

# symbol names tried, in order (gemm, thread count, build configuration): numpy's wheels bundle scipy-openblas's
# ILP64 build, whose symbols carry a prefix and a 64_ suffix; a system OpenBLAS has the plain names. Whether the
# integers are 64-bit is read from the build's configuration string either way
_SYMBOLS = (("scipy_cblas_{}gemm64_", "scipy_openblas_get_num_threads64_", "scipy_openblas_get_config64_"),
            ("cblas_{}gemm64_", "openblas_get_num_threads64_", "openblas_get_config64_"),
            ("cblas_{}gemm", "openblas_get_num_threads", "openblas_get_config"))
_found = []


def _numpy_openblas():
    """(sgemm address, dgemm address, get_num_threads as a ctypes function, whether the ints are 64-bit) of the
    OpenBLAS numpy uses, or None."""
    from threadpoolctl import threadpool_info

    numpy_libs = [info["filepath"] for info in threadpool_info()
                  if info.get("internal_api") == "openblas" and "numpy" in info.get("filepath", "")]
    for path in numpy_libs:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for gemm_name, threads_name, config_name in _SYMBOLS:
            try:
                sgemm, dgemm = (getattr(library, gemm_name.format(t)) for t in "sd")
                get_num_threads, get_config = getattr(library, threads_name), getattr(library, config_name)
            except AttributeError:
                continue
            get_num_threads.restype, get_num_threads.argtypes = ctypes.c_int, []
            get_config.restype, get_config.argtypes = ctypes.c_char_p, []
            wide = b"USE64BITINT" in (get_config() or b"")
            as_address = lambda f: ctypes.cast(f, ctypes.c_void_p).value
            return as_address(sgemm), as_address(dgemm), get_num_threads, wide
    return None


def gemm_address(dtype):
    """(address of CBLAS ?gemm for dtype, whether its integers are 64-bit) from numpy's OpenBLAS while it runs one
    thread, else None."""
    if not _found:
        _found.append(_numpy_openblas())
    found = _found[0]
    if found is None or dtype not in (np.float32, np.float64) or found[2]() != 1:
        return None
    return (found[0] if dtype == np.float32 else found[1]), found[3]

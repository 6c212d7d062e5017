"""Device memory that is reused, not returned to the driver: a caching pool behind numba-cuda's memory-manager
plugin interface (EMM), installed on a GPU when the cuda backend is imported.

Why: numba-cuda's own manager calls cuMemAlloc for every device array and, when ten frees are pending, cuMemFree,
which waits for the whole device. A training step makes a few dozen arrays of the same shapes every time, so the
default manager stalls the host on the device several times a step and leaves the device idle while the host
allocates. The pool keeps each freed block in a free list of its rounded size and hands it to the next request of
that size: after the first step, a step allocates nothing from the driver and frees nothing to it.

Reuse is safe because every kernel and copy of this backend runs on the one default stream: a block comes back to
the pool only when the last array using it is gone on the host, and whatever kernel is given it next is queued
behind every kernel that used it before.

`NUMBA_CNN_CUDA_POOL=0` keeps numba-cuda's own manager (to measure the difference). The simulator has no memory
manager to replace: there the pool is not installed.
"""

import threading
import weakref
from collections import defaultdict

ROUNDING = 512  # bytes: requests are rounded up to this, the driver's own alignment for an allocation


def rounded_size(size):
    """The block size a request of `size` bytes takes from the pool (at least ROUNDING)."""
    return max(ROUNDING, -(-int(size) // ROUNDING) * ROUNDING)


class BlockPool:
    """Free device blocks by rounded size, with the driver calls given: allocate(size) -> pointer, free(pointer).
    Counts what went to the driver, so a test (or bench) can see the reuse."""

    def __init__(self, allocate, free):
        self._allocate, self._free = allocate, free
        self._free_blocks = defaultdict(list)  # rounded size -> pointers ready for reuse
        self._lock = threading.Lock()  # finalizers may run on any thread that drops the last reference
        self.driver_allocations = 0
        self.reused = 0
        self.held_bytes = 0  # everything taken from the driver and not given back to it, in use or free

    def take(self, size):
        """-> (pointer, rounded size): a free block of the rounded size, else a new one from the driver. When the
        driver is out of memory, the free blocks go back to it and the allocation is tried once more."""
        size = rounded_size(size)
        with self._lock:
            blocks = self._free_blocks.get(size)
            if blocks:
                self.reused += 1
                return blocks.pop(), size
        try:
            pointer = self._allocate(size)
        except MemoryError:
            self.release_free()
            pointer = self._allocate(size)
        with self._lock:
            self.driver_allocations += 1
            self.held_bytes += size
        return pointer, size

    def give_back(self, pointer, size):
        with self._lock:
            self._free_blocks[size].append(pointer)

    def free_bytes(self):
        with self._lock:
            return sum(size * len(blocks) for size, blocks in self._free_blocks.items())

    def release_free(self):
        """Return every free block to the driver (blocks in use stay)."""
        with self._lock:
            blocks = [(size, p) for size, pointers in self._free_blocks.items() for p in pointers]
            self._free_blocks.clear()
            self.held_bytes -= sum(size for size, _ in blocks)
        for _, pointer in blocks:
            self._free(pointer)


def make_memory_manager(cuda):
    """numba-cuda's EMM plugin class for a BlockPool over cuMemAlloc/cuMemFree (built here, not at import, because
    the simulator has none of these classes)."""
    from numba.cuda.cudadrv import driver as cuda_driver

    out_of_memory = cuda_driver.binding.CUresult.CUDA_ERROR_OUT_OF_MEMORY

    def allocate(size):
        try:
            return cuda_driver.driver.cuMemAlloc(size)
        except cuda_driver.CudaAPIError as exc:
            if exc.code == out_of_memory:
                raise MemoryError(f"cuMemAlloc of {size} bytes: out of device memory") from None
            raise

    class PooledMemoryManager(cuda.GetIpcHandleMixin, cuda.HostOnlyCUDAMemoryManager):
        pool = BlockPool(allocate, lambda pointer: cuda_driver.driver.cuMemFree(pointer))

        def initialize(self):
            pass

        def memalloc(self, size):
            pointer, block = self.pool.take(size)
            pool = self.pool
            return cuda.MemoryPointer(weakref.proxy(self.context), pointer, size,
                                      finalizer=lambda: pool.give_back(pointer, block))

        def get_memory_info(self):
            free, total = cuda_driver.driver.cuMemGetInfo()
            return cuda.MemoryInfo(free=free, total=total)

        def reset(self):
            super().reset()
            self.pool.release_free()

        @property
        def interface_version(self):
            return 1

    return PooledMemoryManager

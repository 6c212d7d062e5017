"""The cuda backend's host-side machinery that needs no GPU to check: the caching block pool behind its memory
manager (numba_cnn/kernels/cuda/memory.py) and the layer timer's device-event clock (numba_cnn/timing.py)."""

import time

import pytest

from numba_cnn.kernels import BackendUnavailable
from numba_cnn.timing import LayerTimer


@pytest.fixture(scope="module")
def memory():
    """numba_cnn/kernels/cuda/memory.py (the cuda package checks for numba-cuda and a device or the simulator)."""
    try:
        from numba_cnn.kernels.cuda import memory
    except BackendUnavailable as exc:
        pytest.skip(f"cuda backend unavailable: {exc}")
    return memory


class FakeDriver:
    """cuMemAlloc/cuMemFree stand-ins: distinct addresses, a record of the live ones, an optional capacity."""

    def __init__(self, capacity=None):
        self.next_address, self.live, self.capacity = 4096, {}, capacity

    def allocate(self, size):
        if self.capacity is not None and sum(self.live.values()) + size > self.capacity:
            raise MemoryError("fake device full")
        address, self.next_address = self.next_address, self.next_address + size
        self.live[address] = size
        return address

    def free(self, address):
        del self.live[address]


def test_rounded_size(memory):
    rounding = memory.ROUNDING
    assert memory.rounded_size(1) == rounding and memory.rounded_size(rounding) == rounding
    assert memory.rounded_size(rounding + 1) == 2 * rounding
    assert memory.rounded_size(0) == rounding


def test_pool_reuses_a_freed_block_of_the_same_rounded_size_only(memory):
    driver = FakeDriver()
    pool = memory.BlockPool(driver.allocate, driver.free)
    a, size_a = pool.take(1000)
    b, _ = pool.take(5000)
    assert a != b and pool.driver_allocations == 2
    pool.give_back(a, size_a)
    c, _ = pool.take(400)  # another size, rounded to a different block: not a's
    assert c not in (a, b) and pool.driver_allocations == 3
    d, _ = pool.take(1020)  # rounds to a's size: a comes back, the driver is not asked
    assert d == a and pool.reused == 1 and pool.driver_allocations == 3
    e, _ = pool.take(1000)  # a is in use again: a new block
    assert e not in (a, b, c)


def test_steps_of_the_same_shapes_stop_allocating_after_the_first(memory):
    driver = FakeDriver()
    pool = memory.BlockPool(driver.allocate, driver.free)
    sizes = [4 * 128 * 32 * 26 * 26, 4 * 128 * 10, 4 * 128, 4 * 128 * 10]
    for step in range(5):
        taken = [pool.take(s) for s in sizes]  # a step's arrays, alive together
        assert len({p for p, _ in taken}) == len(sizes)  # never one block twice at once
        for pointer, size in taken:
            pool.give_back(pointer, size)
        if step == 0:
            first = pool.driver_allocations
    assert pool.driver_allocations == first == len(sizes)
    assert pool.reused == 4 * len(sizes)


def test_pool_returns_free_blocks_to_the_driver_when_it_runs_out(memory):
    rounding = memory.ROUNDING
    driver = FakeDriver(capacity=4 * rounding)
    pool = memory.BlockPool(driver.allocate, driver.free)
    a, size_a = pool.take(2 * rounding)
    b, size_b = pool.take(rounding)
    pool.give_back(a, size_a)
    pool.give_back(b, size_b)
    c, _ = pool.take(3 * rounding)  # only fits once the free blocks are released
    assert set(driver.live) == {c} and pool.free_bytes() == 0
    assert pool.held_bytes == 3 * rounding
    with pytest.raises(MemoryError):
        pool.take(2 * rounding)  # still too big with nothing free: the driver's error comes through


class FakeEvent:
    """numba-cuda's event interface on the host clock: record, synchronize, elapsed_time (ms)."""

    made = 0

    def __init__(self):
        FakeEvent.made += 1
        self.at = None
        self.synchronized = 0

    def record(self, stream=0):
        self.at = time.perf_counter()

    def synchronize(self):
        self.synchronized += 1

    def elapsed_time(self, end):
        return 1000.0 * (end.at - self.at)


def test_event_clock_reads_sections_later_in_batches_and_reuses_its_events():
    FakeEvent.made = 0
    syncs = []
    timer = LayerTimer(sync=lambda: syncs.append(1), device_event=FakeEvent)
    timer.SETTLE_EVERY = 4
    for _ in range(3):
        with timer.section("conv1", "forward"):
            time.sleep(0.002)
        with timer.section("dense", "backward"):
            pass
    assert not syncs  # with events, the device is never waited for between sections
    assert timer.calls == {("conv1", "forward"): 2, ("dense", "backward"): 2}  # settled at 4, two still pending
    assert FakeEvent.made == 8  # the first four sections' events; the last two sections reused them
    rows = timer.table(epoch_seconds=1.0)
    assert timer.calls == {("conv1", "forward"): 3, ("dense", "backward"): 3}
    conv1, dense = rows
    assert conv1["layer"] == "conv1" and conv1["forward_ms"] >= 2.0 and conv1["calls"] == 3
    assert dense["backward_ms"] < conv1["forward_ms"]
    assert FakeEvent.made == 8


def test_host_clock_waits_for_the_device_around_each_section_without_events():
    syncs = []
    timer = LayerTimer(sync=lambda: syncs.append(1))
    with timer.section("conv1", "forward"):
        pass
    assert len(syncs) == 2 and timer.calls == {("conv1", "forward"): 1}

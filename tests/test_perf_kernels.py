"""tools/perf_kernels.py without perf itself (which a CI machine may lack or forbid): the functions Numba compiled,
a parallel loop's body included, mapped at their addresses with their code copied; `perf script` lines read into
samples per address and process; samples placed in the stretches of a function's code."""

import sys
from pathlib import Path

import numpy as np
from numba import njit, prange

TOOLS = Path(__file__).resolve().parent.parent / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))
import perf_kernels  # noqa: E402


@njit(parallel=True)
def _summed(a):
    total = 0.0
    for i in prange(a.shape[0]):
        total += a[i]
    return total


def test_compiled_functions_are_mapped_with_their_code(tmp_path):
    assert _summed(np.ones(64)) == 64.0
    functions = perf_kernels.compiled_functions([_summed])
    names = list(functions.values())
    assert any("_summed" in name for name in names), names
    assert any("parfor" in name for name in names), names  # the loop's body, compiled in a library of its own
    entries = perf_kernels.write_perf_map(functions, tmp_path / "perf-1.map", tmp_path / "code")
    lines = (tmp_path / "perf-1.map").read_text().splitlines()
    assert len(lines) == len(entries) == len(functions)
    for (address, size, name), line, following in zip(entries, lines, entries[1:] + [None]):
        assert line == f"{address:x} {size:x} {name}"
        assert 0 < size <= perf_kernels.MAX_FUNCTION_BYTES
        if following is not None:
            assert address + size <= following[0]  # sorted, no overlap
        assert (tmp_path / "code" / f"{address:x}.bin").stat().st_size == size


def test_perf_script_lines_give_samples_per_address_and_process():
    text = "\n".join(["  101 7f0000001000 kernel_a", "  101 7f0000001000 kernel_a", "  101 7f0000001040 kernel_a",
                      "  202 ffffffff81000000 [unknown]", "", "malformed"])
    counts, symbols, pids = perf_kernels.samples_by_address(text)
    assert counts == {0x7f0000001000: 2, 0x7f0000001040: 1, 0xffffffff81000000: 1}
    assert symbols[0x7f0000001040] == "kernel_a" and pids == {"101": 3, "202": 1}


def test_samples_fall_in_the_stretches_of_a_function():
    start = 0x1000
    rows = [(start + 4 * i, "vaddps %ymm0,%ymm1,%ymm2" if i < 64 else "vmovss (%rax),%xmm0") for i in range(128)]
    counts = {start + 8: 3, start + 300: 1, start + 2048: 5}  # the last one outside the function's 512 bytes
    regions = perf_kernels.hottest_regions(counts, start, rows, 512)
    assert [(offset, share) for offset, share, _ in regions] == [(0, 0.75), (256, 0.25)]
    assert regions[0][2] == {"vaddps": 64} and regions[1][2] == {"vmovss": 64}


def test_the_function_annotated_is_the_hottest_whose_name_holds_the_text():
    mapped = [(50, 0x1000, 64, "winograd_task", "a.bin"), (20, 0x2000, 64, "one_channel_pool", "b.bin"),
              (30, 0x3000, 64, "one_channel_pool_backward", "c.bin")]
    assert perf_kernels.function_to_annotate(mapped)[3] == "winograd_task"
    assert perf_kernels.function_to_annotate(mapped, "one_channel")[3] == "one_channel_pool_backward"
    assert perf_kernels.function_to_annotate(mapped, "listed") is None

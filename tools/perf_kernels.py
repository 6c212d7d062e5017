"""An instruction-level profile of numba_cnn's compiled kernels with Linux perf.

perf samples the code Numba compiled at run time, but cannot name it: no file on disk holds it. `run` executes a
command in this process and, when it exits, writes what perf needs and what this tool annotates with: the map
file perf reads for code it finds no binary for (`/tmp/perf-<pid>.map`: address, size and name of every function
Numba compiled for numba_cnn, the bodies of the parallel loops included) and a copy of each function's machine
code (`/tmp/perf-kernels-<pid>/`). `report` then names the hottest functions and, for the hottest of them,
disassembles its code (objdump) and shows where in it the samples fell.

    perf record -e cpu-clock -o perf.data python tools/perf_kernels.py run -m numba_cnn bench --kernels jit \\
        --model vgg-small-bn --layers conv2
    python tools/perf_kernels.py report perf.data

`run` compiles the kernels in its process (NUMBA_CNN_CACHE=0: code loaded from the disk cache keeps no list of its
functions), so its first calls take the compile time. Only the process `run` starts is mapped (`bench --compare` runs its contenders in processes of their own). A
function's size in the map is the distance to the next mapped function, so a sample in code Numba compiled for
itself between two of them counts for the first. `cpu-clock` is a software event: it needs no hardware counters
(virtual machines often have none), and it says where the time went, not why (no cache misses or stalls).
"""

import argparse
import atexit
import collections
import ctypes
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

MAX_FUNCTION_BYTES = 1 << 20  # the last function's size, and a cap on any gap between two


def compiled_functions(dispatchers):
    """{address: name} of every function compiled for the given Numba dispatchers, the libraries they link (where
    a parallel loop's body is compiled) included."""
    found, seen = {}, set()

    def visit(library):
        if id(library) in seen:
            return
        seen.add(id(library))
        module = getattr(library, "_final_module", None)
        for function in module.functions if module is not None else ():
            if function.is_declaration:
                continue
            try:
                address = library.get_pointer_to_function(function.name)
            except Exception:  # not finalized in this library: another one holds its code
                continue
            if address:
                found[address] = function.name
        for linked in getattr(library, "_linking_libraries", ()):
            visit(linked)

    for dispatcher in dispatchers:
        for result in dispatcher.overloads.values():
            visit(result.library)
    return found


def numba_cnn_dispatchers():
    """The compiled functions (Numba dispatchers) that numba_cnn's loaded modules hold, the tasks of its parts
    kernels included."""
    found = {}
    for name, module in list(sys.modules.items()):
        if name == "numba_cnn" or name.startswith("numba_cnn."):
            for value in list(vars(module).values()):
                # a parts kernel (numba_cnn.kernels._numba_ext.parts_kernel) is a Python function over its task
                for candidate in (value, getattr(value, "task", None)):
                    if hasattr(candidate, "overloads") and hasattr(candidate, "py_func"):
                        found[id(candidate)] = candidate
    return list(found.values())


def _memory_mappings():
    """[(start, end)] of this process's memory mappings (/proc/self/maps)."""
    return [tuple(int(a, 16) for a in line.split()[0].split("-"))
            for line in Path("/proc/self/maps").read_text().splitlines()]


def write_perf_map(functions, path, code_dir=None):
    """Append `functions` ({address: name}) to the map file `path`, each sized to the next one's address (at most
    to the end of its memory mapping), and copy each one's machine code into code_dir as <address in hex>.bin;
    -> [(address, size, name)]."""
    addresses, mappings = sorted(functions), _memory_mappings()
    path, entries = Path(path), []
    if code_dir is not None:
        Path(code_dir).mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        for i, address in enumerate(addresses):
            mapped_end = next((end for start, end in mappings if start <= address < end), address)
            size = min(addresses[i + 1] - address if i + 1 < len(addresses) else MAX_FUNCTION_BYTES,
                       MAX_FUNCTION_BYTES, mapped_end - address)
            if size <= 0:
                continue
            out.write(f"{address:x} {size:x} {functions[address]}\n")
            entries.append((address, size, functions[address]))
            if code_dir is not None:
                (Path(code_dir) / f"{address:x}.bin").write_bytes(ctypes.string_at(address, size))
    return entries


def run(argv):
    """Run `-m module args...` or `script args...` here; at exit, map what numba_cnn compiled."""
    def map_at_exit():
        path, code_dir = Path(f"/tmp/perf-{os.getpid()}.map"), Path(f"/tmp/perf-kernels-{os.getpid()}")
        functions = compiled_functions(numba_cnn_dispatchers())
        write_perf_map(functions, path, code_dir)
        print(f"perf_kernels: {len(functions)} compiled functions in {path}, their code in {code_dir}",
              file=sys.stderr)

    # the kernels compiled in this process: code loaded from Numba's disk cache keeps no LLVM module to list its
    # functions (the parallel loops' bodies among them) by name
    os.environ["NUMBA_CNN_CACHE"] = "0"
    atexit.register(map_at_exit)
    if argv[:1] == ["-m"] and len(argv) > 1:
        sys.argv = [argv[1]] + argv[2:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv:
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")
    else:
        raise SystemExit("perf_kernels run: give `-m module [args]` or `script.py [args]`")


def samples_by_address(perf_script_text):
    """({address: samples}, {address: symbol}, {pid: samples}) from `perf script -F pid,ip,sym` output (recorded
    without call graphs: one line per sample)."""
    counts, symbols, pids = collections.Counter(), {}, collections.Counter()
    for line in perf_script_text.splitlines():
        parts = line.split(None, 2)
        if len(parts) < 2:
            continue
        pids[parts[0]] += 1
        address = int(parts[1], 16)
        counts[address] += 1
        symbols[address] = parts[2] if len(parts) > 2 else "[unknown]"
    return counts, symbols, pids


def disassemble(code_file, start):
    """[(address, instruction)] of a dumped function (objdump, x86-64)."""
    text = subprocess.run(["objdump", "-D", "-b", "binary", "-m", "i386:x86-64", f"--adjust-vma={start:#x}",
                           str(code_file)], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in text.splitlines():
        match = re.match(r"\s*([0-9a-f]+):\s+(?:[0-9a-f]{2} )+\s*(.*)", line)
        if match:
            rows.append((int(match.group(1), 16), match.group(2).strip()))
    return rows


def hottest_regions(counts, start, rows, size, regions=12, width=256):
    """[(offset, share of the function's samples, {instruction: count})] of its `regions` hottest `width`-byte
    stretches, rows its disassembly [(address, instruction)]."""
    inside = {a: n for a, n in counts.items() if start <= a < start + size}
    total = sum(inside.values())
    region = collections.Counter()
    for address, n in inside.items():
        region[(address - start) // width] += n
    found = []
    for index, n in region.most_common(regions):
        mix = collections.Counter(text.split()[0] for address, text in rows
                                  if index * width <= address - start < (index + 1) * width and text)
        found.append((index * width, n / total, mix))
    return found


def function_to_annotate(mapped, function=None):
    """Of mapped [(samples, address, size, name, code file)], the one with the most samples whose name holds
    `function` (any name if None) -> that tuple, or None."""
    return max((m for m in mapped if function is None or function in m[3]), default=None)


def report(perf_data, top=12, regions=12, function=None):
    text = subprocess.run(["perf", "script", "-i", str(perf_data), "-F", "pid,ip,sym"], capture_output=True,
                          text=True, check=True).stdout
    counts, symbols, pids = samples_by_address(text)
    total = sum(counts.values())
    by_symbol = collections.Counter()
    for address, n in counts.items():
        by_symbol[symbols[address]] += n
    print(f"{total} samples")
    for name, n in by_symbol.most_common(top):
        print(f"{100 * n / total:6.1f}%  {name[:110]}")
    mapped = []  # (samples, address, size, name, code file) of each function `run` mapped in a sampled process
    for pid in pids:
        map_file, code_dir = Path(f"/tmp/perf-{pid}.map"), Path(f"/tmp/perf-kernels-{pid}")
        for line in map_file.read_text().splitlines() if map_file.is_file() else ():
            address, size, name = line.split(" ", 2)
            address, size = int(address, 16), int(size, 16)
            samples = sum(n for a, n in counts.items() if address <= a < address + size)
            mapped.append((samples, address, size, name, code_dir / f"{address:x}.bin"))
    best = function_to_annotate(mapped, function)
    if best is None or not best[0] or not best[4].is_file() or not shutil.which("objdump"):
        print("no function mapped by `run` holds a sample (or no objdump): nothing to annotate")
        return
    samples, start, size, name, code_file = best
    print(f"\nthe hottest mapped function{'' if function is None else f' named *{function}*'}, {name[:90]}: "
          f"{samples} samples ({100 * samples / total:.1f}%); by 256-byte stretch of its code, its share of them "
          f"and the instructions there:")
    for offset, share, mix in hottest_regions(counts, start, disassemble(code_file, start), size, regions):
        print(f"  +{offset:#07x} {100 * share:5.1f}%  " + ", ".join(f"{op} {k}" for op, k in mix.most_common(6)))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        return run(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run `-m module args` or `script args` under perf, mapping numba_cnn's kernels")
    rep = sub.add_parser("report", help="the hottest functions and, in the hottest one, its hottest code")
    rep.add_argument("perf_data", type=Path)
    rep.add_argument("--top", type=int, default=12)
    rep.add_argument("--function", help="annotate the hottest mapped function whose name holds this text")
    args = parser.parse_args(argv)
    report(args.perf_data, top=args.top, function=args.function)


if __name__ == "__main__":
    main()

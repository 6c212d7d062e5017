"""The jit backend's extensions of numba and llvmlite, in one place: the compile options (`jit`), running a task in
parallel (`run_parts`), what the compiled code targets (`TARGET_FEATURES`, `VECTOR_BITS`, `VECTOR_REGISTERS`), the
register tile (`stack_tile`), the constant-size block copy (`copy_block`) and BLAS's gemm called by its address
(`call_gemm`).

Target. Numba compiles for the host CPU unless NUMBA_CPU_NAME / NUMBA_CPU_FEATURES say otherwise; the feature
string read here is the one numba hands LLVM's target machine (its codegen's `_tm_features`, i.e.
NUMBA_CPU_FEATURES when set, else the host's), so tile shapes follow the instruction set the kernels are compiled
for, not the CPU vendor: avx512f gives 512-bit vectors and 32 vector registers, AVX/AVX2 256 bits and 16.

Register tile. `stack_tile(size, dtype)` is, interpreted, a plain heap array; compiled, a 1-D array over an
`alloca` of `size` (a compile-time constant) elements. Once LLVM unrolls a tile loop the indices are constants and
SROA promotes the alloca to vector registers; a np.empty tile stays in memory (several times slower). It is
memory-safe: the overload is inlined ("always") into the kernel that calls it, and `cgutils.alloca_once` places the
alloca in that function's entry block, so the storage lives in the kernel's own stack frame, is allocated once per
call (not per loop iteration: the stack cannot grow in a loop) and dies when the kernel returns; the array struct
carries no meminfo, so numba's reference counting never frees it, and it never escapes (the kernels only index it).
NUMBA_CNN_STACK_TILES=0 makes `stack_tile` a np.empty in compiled code too (same results, slower): a switch to rule
the intrinsic out when chasing a bug. The choice is a closure variable of every tile kernel (`tile_allocator()`),
so it is part of numba's cache key and the two variants never share a cache entry.

Cache. `jit` compiles with numba's disk cache (`cache=True`: `__pycache__` beside the source or, when that is not
writable, numba's user cache directory; NUMBA_CACHE_DIR overrides both); NUMBA_CNN_CACHE=0 turns it off, and with no
usable cache location the kernels compile uncached, with a warning. Loading a kernel from the cache skips what numba
does first there, `target_context.refresh()`: it imports and registers every lowering numba has (numpy's linear
algebra, typed containers, random generators: hundreds of modules; docs/numba.md says what they cost), which only a
compile uses, and numba's compiler runs it itself before every compile. A load needs only the runtime's symbols
(`rtsys.initialize`), which the loaded machine code links against (`_LoadingWithoutRefresh`).

Tasks. `run_parts(task, n, *args)` runs task(i, *args) for i < n in a prange, calling the task's compiled code by its
address (`_run_task_in_parts`), so that a long serial body compiles once, on its own, and not again inside every prange
that calls it (docs/numba.md, "What a kernel costs to compile"). `parts_kernel` makes a kernel of such a task; most
of the backend's kernels are written so, as a prange loop compiles several times slower (the exceptions, whose
register tile LLVM kept in registers only in a prange's body, are listed there).

Vector width. The same codegen sets the function attribute "prefer-vector-width"=<VECTOR_BITS> on the function
holding the tile: LLVM's tuning for Intel AVX-512 cores otherwise prefers 256-bit vectors, which halves the tile a
register file holds. On AVX2 targets it is 256, what LLVM would use anyway.
"""

import os
import warnings

import numpy as np
from llvmlite import ir
from numba import get_num_threads, njit, prange, types
from numba._dispatcher import compute_fingerprint
from numba.core import cgutils, config
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic, overload
from numba.np.arrayobj import make_array, populate_array

try:
    from numba.core.runtime import rtsys as _rtsys
except ImportError:  # another numba: its own cache loads, with the refresh
    _rtsys = None

# contract + reassoc give FMAs and vectorised reductions; no nnan/ninf, so NaN checks (v != v) stay valid.
FASTMATH = {"contract", "reassoc", "nsz", "arcp"}
CACHE = os.environ.get("NUMBA_CNN_CACHE", "1") != "0"
STACK_TILES = os.environ.get("NUMBA_CNN_STACK_TILES", "1") != "0"


def _target_features():
    """The feature string numba's codegen gives LLVM's target machine (honours NUMBA_CPU_NAME/NUMBA_CPU_FEATURES)."""
    try:
        from numba.core.registry import cpu_target

        features = cpu_target.target_context.codegen()._tm_features
        if isinstance(features, str):
            return features
    except Exception:  # a numba without that private attribute: rebuild what it does
        pass
    if config.CPU_FEATURES is not None:
        return config.CPU_FEATURES
    from llvmlite import binding

    return binding.get_host_cpu_features().flatten()


def _enabled(features):
    return {f[1:] for f in features.split(",") if f.startswith("+")}


TARGET_FEATURES = frozenset(_enabled(_target_features()))
AVX512 = "avx512f" in TARGET_FEATURES
VECTOR_BITS = 512 if AVX512 else 256 if "avx" in TARGET_FEATURES else 128
VECTOR_REGISTERS = 32 if AVX512 else 16
# The register file the tile shapes are sized for: the target's, unless NUMBA_CNN_TILE_BITS=256|512 says otherwise.
# The override exists for tests: an AVX2 host runs the AVX-512 tiles' code path (same kernels, other constants;
# spilled, so slow, but the results must be right) though it cannot execute 512-bit instructions.
_TILE_BITS = os.environ.get("NUMBA_CNN_TILE_BITS", "")
TILE_BITS = int(_TILE_BITS) if _TILE_BITS in ("256", "512") else VECTOR_BITS
TILE_REGISTERS = 32 if TILE_BITS >= 512 else 16 if _TILE_BITS else VECTOR_REGISTERS


def jit(fn=None, *, parallel=True):
    """njit with the backend's options (`@jit`; `@jit(parallel=False)` for a kernel with no prange, which then
    compiles in about half the time); without a usable cache location, fall back to no disk cache. A function must
    not close over a jit function: numba keys its disk cache on a pickle of the closure, and pickles a jit function
    with an id drawn afresh in every process, so the entry would never be found again (a task made beside its
    kernel is called through run_parts instead)."""
    if fn is None:
        return lambda f: jit(f, parallel=parallel)
    if any(_is_jit_function(cell.cell_contents) for cell in fn.__closure__ or ()):
        raise TypeError(f"{fn.__qualname__} closes over a jit function: numba's disk cache could not find it again "
                        "in the next process; call the function through run_parts")
    options = dict(parallel=parallel, fastmath=FASTMATH, error_model="numpy")
    if CACHE:
        try:
            dispatcher = njit(cache=True, **options)(fn)
        except RuntimeError as err:  # "cannot cache function ...: no locator available"
            warnings.warn(f"numba_cnn jit kernels compile without a disk cache: {err}", RuntimeWarning)
        else:
            if _LoadingWithoutRefresh.fits(dispatcher._cache):
                dispatcher._cache = _LoadingWithoutRefresh(dispatcher._cache)
            return dispatcher
    return njit(cache=False, **options)(fn)


class _LoadingWithoutRefresh:
    """A kernel's numba disk cache whose loads skip the target context's refresh (the module docstring says why);
    everything else is the wrapped cache's, which `numbas_own` hands to the precompile (cold_compile.py says why its
    loads refresh). Where numba's private cache API differs from the one this calls, the kernel keeps numba's own
    cache (`fits`)."""

    def __init__(self, cache):
        self._cache = cache

    @property
    def numbas_own(self):
        return self._cache

    @staticmethod
    def fits(cache):
        return _rtsys is not None and all(hasattr(cache, name) for name in
                                          ("_load_overload", "_guard_against_spurious_io_errors"))

    def __getattr__(self, name):
        return getattr(self._cache, name)

    def load_overload(self, sig, target_context):
        _rtsys.initialize(target_context)  # the runtime's functions, which loaded code calls by name
        with self._cache._guard_against_spurious_io_errors():
            return self._cache._load_overload(sig, target_context)
        return None  # numba's guard swallowed an error of the cache's files: compile


def _is_jit_function(value):
    from numba.core.dispatcher import Dispatcher

    return isinstance(value, Dispatcher)


_I32, _I64, _BYTE_POINTER = ir.IntType(32), ir.IntType(64), ir.IntType(8).as_pointer()
_ENTRY_TYPE = ir.FunctionType(_I32, [_I64, _BYTE_POINTER])  # entry(part, slot) -> 0, or 1 if the task failed


@intrinsic
def _call_entry(typingctx, entry, part, slot):
    """entry(part, slot) for the address of an entry that `_run_task_in_parts` made: 0, or 1 where the task
    reported an error."""
    if not all(t == types.int64 for t in (entry, part, slot)):
        return None

    def codegen(context, builder, signature, values):
        function = builder.inttoptr(values[0], _ENTRY_TYPE.as_pointer())
        return builder.call(function, [values[1], builder.inttoptr(values[2], _BYTE_POINTER)])

    return types.int32(entry, part, slot), codegen


_CBLAS_ROW_MAJOR = 101


@intrinsic
def call_gemm(typingctx, address, wide_ints, trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc):
    """c = op(a) @ op(b) by the CBLAS ?gemm at `address` (jit/blas.py finds it), row-major, alpha 1 and beta 0:
    op(a) m x k, op(b) k x n, c m x n, trans_a / trans_b CBLAS's 111 (as stored) or 112 (transposed), lda, ldb, ldc
    the rows' strides in elements; its integers 64-bit where wide_ints (an ILP64 build), else 32-bit. a, b and c
    are arrays of one float dtype, which picks sgemm's or dgemm's types. Called by address, as a task is (run_parts),
    so the compiled code holds no library address and caches like any other."""
    arrays, ints = (a, b, c), (trans_a, trans_b, m, n, k, lda, ldb, ldc)
    if not (isinstance(address, types.Integer) and isinstance(wide_ints, types.Boolean)
            and all(isinstance(t, types.Array) and t.dtype == a.dtype for t in arrays)
            and a.dtype in (types.float32, types.float64) and all(isinstance(t, types.Integer) for t in ints)):
        return None

    def codegen(context, builder, signature, values):
        real = context.get_value_type(a.dtype)
        pointers = [make_array(t)(context, builder, v).data for t, v in zip(arrays, (values[7], values[9], values[11]))]

        def as_int(value, int_type):
            width = value.type.width
            return value if width == int_type.width else (builder.trunc if width > int_type.width else builder.sext)(
                value, int_type)

        trans = [as_int(values[i], _I32) for i in (2, 3)]
        sizes = [values[i] for i in (4, 5, 6, 8, 10, 12)]  # m, n, k, lda, ldb, ldc
        one, zero = ir.Constant(real, 1.0), ir.Constant(real, 0.0)
        with builder.if_else(values[1]) as (wide, narrow):
            for block, int_type in ((wide, _I64), (narrow, _I32)):
                with block:
                    m_, n_, k_, lda_, ldb_, ldc_ = [as_int(v, int_type) for v in sizes]
                    gemm_type = ir.FunctionType(ir.VoidType(), [_I32, _I32, _I32, int_type, int_type, int_type, real,
                                                                pointers[0].type, int_type, pointers[1].type, int_type,
                                                                real, pointers[2].type, int_type])
                    builder.call(builder.inttoptr(values[0], gemm_type.as_pointer()),
                                 [ir.Constant(_I32, _CBLAS_ROW_MAJOR), *trans, m_, n_, k_, one, pointers[0], lda_,
                                  pointers[1], ldb_, zero, pointers[2], ldc_])
        return context.get_dummy_value()

    return types.none(address, wide_ints, trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc), codegen


@jit
def _parts_in_parallel(entry, n_parts, slot):
    """The parallel half of run_parts: entry(i, slot) for each part i < n_parts, entry and slot the addresses that
    `_run_task_in_parts` hands over; its arguments are three integers, so it compiles once for every task."""
    failed = 0
    for i in prange(n_parts):
        # int64, as the entry takes it: the prange hands its index over unsigned
        failed += _call_entry(entry, np.int64(i), slot)
    if failed:
        raise RuntimeError("a task run by run_parts reported an error")


@intrinsic
def _run_task_in_parts(typingctx, launcher, task, n_parts, args):
    """Run the compiled function at address `task` (from native_address) for each part < n_parts with part and the
    members of the tuple args, in numba's own calling convention, through the parallel launcher at address
    `launcher` (`_parts_in_parallel`'s code): args and the task's address are stored in a slot on this function's
    stack, and the launcher's threads call an entry made here for these argument types, entry(part, slot), which
    loads them and calls the task. So the launcher, a prange, compiles once for every task, and what depends on
    the arguments' types compiles without numba's parallel passes. An error the task reports is passed on."""
    if not (isinstance(launcher, types.Integer) and isinstance(task, types.Integer)
            and isinstance(n_parts, types.Integer) and isinstance(args, types.BaseTuple)):
        return None
    task_arg_types = [types.int64] + list(args.types)
    launcher_arg_types = [types.int64] * 3

    def codegen(context, builder, signature, values):
        launcher_address, task_address, n, args_value = values
        slot_type = ir.LiteralStructType([_I64, args_value.type])
        entry = ir.Function(builder.module, _ENTRY_TYPE, name=builder.module.get_unique_name("run_parts_entry"))
        entry.linkage = "internal"
        entry_builder = ir.IRBuilder(entry.append_basic_block())
        part, slot_pointer = entry.args
        slot = entry_builder.load(entry_builder.bitcast(slot_pointer, slot_type.as_pointer()))
        task_type = context.call_conv.get_function_type(types.none, task_arg_types)
        callee = entry_builder.inttoptr(entry_builder.extract_value(slot, 0), task_type.as_pointer())
        stored_args = entry_builder.extract_value(slot, 1)
        task_args = [part] + [entry_builder.extract_value(stored_args, i) for i in range(len(args.types))]
        status, _ = context.call_conv.call_function(entry_builder, callee, types.none, task_arg_types, task_args)
        entry_builder.ret(entry_builder.select(status.is_error, ir.Constant(_I32, 1), ir.Constant(_I32, 0)))

        # the arrays stored without their meminfo, as a prange's body receives them: the caller holds them for the
        # call, and views the task makes of them then count no references, an atomic update of one cache line that
        # every thread would otherwise make at every view
        members = []
        for i, member_type in enumerate(args.types):
            member = builder.extract_value(args_value, i)
            if isinstance(member_type, types.Array):
                array = context.make_array(member_type)(context, builder, member)
                array.meminfo = cgutils.get_null_value(array.meminfo.type)
                member = array._getvalue()
            members.append(member)
        slot_memory = cgutils.alloca_once(builder, slot_type)
        stored = builder.insert_value(ir.Constant(slot_type, ir.Undefined), task_address, 0)
        builder.store(builder.insert_value(stored, context.make_tuple(builder, args, members), 1), slot_memory)
        launcher_type = context.call_conv.get_function_type(types.none, launcher_arg_types)
        status, _ = context.call_conv.call_function(
            builder, builder.inttoptr(launcher_address, launcher_type.as_pointer()), types.none, launcher_arg_types,
            [builder.ptrtoint(entry, _I64), builder.sext(n, _I64) if n.type.width < 64 else n,
             builder.ptrtoint(slot_memory, _I64)])
        with cgutils.if_unlikely(builder, status.is_error):
            context.call_conv.return_status_propagate(builder, status)
        return context.get_dummy_value()

    return types.none(launcher, task, n_parts, args), codegen


@jit(parallel=False)
def _launch_parts(launcher, task, n_parts, args):
    _run_task_in_parts(launcher, task, n_parts, args)


_NATIVE_ADDRESSES = {}


def native_address(function, *args):
    """The address of jit function's native code for the types of args, compiled (or loaded from the disk cache)
    when it has none yet; looked up by numba's own fingerprints of the arguments (what its dispatcher looks its
    compiled code up by: typing them in Python takes longer than a small kernel's call)."""
    key = (function,) + tuple(compute_fingerprint(a) for a in args)
    address = _NATIVE_ADDRESSES.get(key)
    if address is None:
        signature = tuple(function.typeof_pyval(a) for a in args)
        compiled = function.overloads.get(signature)
        if compiled is None:
            function.compile(signature)
            compiled = function.overloads[signature]
        if compiled.signature.return_type != types.none:  # the entry gives it no room for a result
            raise TypeError(f"{function.py_func.__qualname__} returns {compiled.signature.return_type}: a task that "
                            "run_parts calls must return nothing")
        address = _NATIVE_ADDRESSES[key] = compiled.library.get_pointer_to_function(compiled.fndesc.llvm_func_name)
    return address


_LAUNCHER = []  # the address of _parts_in_parallel's code, once it is known


def run_parts(task, n_parts, *args):
    """task(np.int64(i), *args) for each part i < n_parts, in parallel. The task, a jit function compiled with
    parallel=False, is called through its native code's address: called by name, numba would compile its code
    again into the prange's kernel (linked in, optimised and turned into machine code anew), and that kernel would
    compile once per task. This way a task compiles once, without numba's parallel passes; one prange kernel
    (`_parts_in_parallel`) runs every task, and per set of argument types a small serial function
    (`_launch_parts`) hands it the arguments (`_run_task_in_parts`)."""
    if not _LAUNCHER:
        _LAUNCHER.append(native_address(_parts_in_parallel, np.int64(0), np.int64(0), np.int64(0)))
    _launch_parts(_LAUNCHER[0], native_address(task, np.int64(0), *args), n_parts, args)


def part_range(part, n_parts, n):
    """Part `part`'s share of range(n) cut into n_parts contiguous shares, as a prange's static schedule cuts it."""
    return range(part * n // n_parts, (part + 1) * n // n_parts)


@overload(part_range, inline="always")  # compiled, the same function inlined into each task
def _part_range_compiled(part, n_parts, n):
    return part_range


def parts_kernel(task):
    """The kernel that runs jit function task(part, n_parts, *args) for each part < n_parts = numba's thread count,
    through run_parts: the task is a prange's loop written out, each part taking its share of the loop's indices
    (`part_range`; every index is computed alike whichever part takes it, so the results do not depend on the
    thread count). Compiled with parallel=False and called by address, a task compiles much faster than the same
    loop in a prange, whose body numba compiles into a kernel of its own and then again into its caller
    (docs/numba.md, "What a kernel costs to compile"). An array the loop reads through a reshape is
    best reshaped by the caller and handed in: reshaped in the task, the column correlation's tile stayed in memory.
    kernel.task is the jit function."""

    def kernel(*args):
        n_parts = get_num_threads()
        run_parts(task, n_parts, n_parts, *args)

    kernel.task = task
    kernel.py_func = lambda *args: task.py_func(0, 1, *args)  # interpreted: one part takes every index
    kernel.__name__, kernel.__qualname__, kernel.__doc__ = (task.py_func.__name__, task.py_func.__qualname__,
                                                             task.py_func.__doc__)
    return kernel


def stack_tile(size, dtype):
    """A scratch vector of `size` (a compile-time constant) elements of `dtype`: in compiled code a stack array
    that LLVM keeps in registers. Interpreted: a heap array."""
    return np.empty(size, dtype)


def heap_tile(size, dtype):
    """stack_tile's stand-in under NUMBA_CNN_STACK_TILES=0: a heap array, compiled or not."""
    return np.empty(size, dtype)


def tile_allocator():
    """The tile allocator kernels close over (so that the choice is in numba's cache key)."""
    return stack_tile if STACK_TILES else heap_tile


def _prefer_vector_width(function):
    # llvmlite's attribute set has no key="value" form, so the string attribute is added raw
    set.add(function.attributes, f'"prefer-vector-width"="{VECTOR_BITS}"')


@intrinsic(prefer_literal=True)
def _alloca_vector(typingctx, size, dtype_of):
    """The compiled `stack_tile`: a C-contiguous 1-D array over an alloca of a literal number of elements."""
    if not isinstance(size, types.IntegerLiteral):
        return None
    dtype = dtype_of.dtype
    vector_type = types.Array(dtype, 1, "C")

    def codegen(context, builder, signature, args):
        count = size.literal_value
        element = context.get_data_type(dtype)
        intp = context.get_value_type(types.intp)
        itemsize = context.get_abi_sizeof(element)
        storage = cgutils.alloca_once(builder, ir.ArrayType(element, count))  # entry block: once per call
        _prefer_vector_width(builder.function)
        vector = make_array(vector_type)(context, builder)
        populate_array(vector, data=builder.bitcast(storage, element.as_pointer()),
                       shape=[ir.Constant(intp, count)], strides=[ir.Constant(intp, itemsize)],
                       itemsize=ir.Constant(intp, itemsize), meminfo=None)
        return vector._getvalue()

    return vector_type(size, dtype_of), codegen


@intrinsic
def _vector_width_hint(typingctx):
    """Sets the vector-width attribute on the calling function and emits nothing else."""

    def codegen(context, builder, signature, args):
        _prefer_vector_width(builder.function)
        return context.get_dummy_value()

    return types.none(), codegen


@overload(stack_tile, prefer_literal=True, inline="always")  # the intrinsic must land in the kernel itself
def _stack_tile_compiled(size, dtype):
    def impl(size, dtype):
        return _alloca_vector(size, dtype)
    return impl


@overload(heap_tile, inline="always")
def _heap_tile_compiled(size, dtype):
    def impl(size, dtype):
        _vector_width_hint()
        return np.empty(size, dtype)
    return impl


def copy_block(dst, dst_start, src, src_start, count):
    """dst[dst_start:dst_start + count] = src[src_start:src_start + count] for 1-D C-contiguous arrays of one dtype,
    `count` a compile-time constant. Compiled, one llvm.memcpy of a constant size, which LLVM lowers to a few
    full-width vector moves. Why: a constant-count copy loop is unrolled into scalar moves before the vectorisers
    see it, and when such a block was copied into a stack tile element by element and then read back as vectors,
    every vector load waited for the scalar stores to drain (a failed store-to-load forward). No bounds checks,
    like the kernels' indexing."""
    dst[dst_start:dst_start + count] = src[src_start:src_start + count]


@intrinsic(prefer_literal=True)
def _memcpy_elements(typingctx, dst, dst_start, src, src_start, count):
    """The compiled `copy_block`."""
    if not isinstance(count, types.IntegerLiteral):
        return None
    if not (isinstance(dst, types.Array) and isinstance(src, types.Array) and dst.ndim == src.ndim == 1
            and dst.layout == src.layout == "C" and dst.dtype == src.dtype):
        return None

    def codegen(context, builder, signature, args):
        dst_array = make_array(dst)(context, builder, args[0])
        src_array = make_array(src)(context, builder, args[2])
        itemsize = context.get_abi_sizeof(context.get_data_type(dst.dtype))
        intp = context.get_value_type(types.intp)
        cgutils.raw_memcpy(builder, builder.gep(dst_array.data, [args[1]]), builder.gep(src_array.data, [args[3]]),
                           ir.Constant(intp, count.literal_value), itemsize)
        return context.get_dummy_value()

    return types.none(dst, types.intp, src, types.intp, count), codegen


@overload(copy_block, prefer_literal=True, inline="always")
def _copy_block_compiled(dst, dst_start, src, src_start, count):
    def impl(dst, dst_start, src, src_start, count):
        _memcpy_elements(dst, dst_start, src, src_start, count)
    return impl


def rest_of(a, start):
    """a[start:] of a 1-D C-contiguous array, for 0 <= start <= len(a). Compiled, a pointer moved by `start` and
    nothing else: the slice `a[start:]` tests start for a negative value and clamps it to the length, about ten
    instructions and two branches per slice, more than a loop of a few vector multiply-adds per slice does besides
    (docs/numba.md, trap 22). No bounds checks, like the kernels' indexing."""
    return a[start:]


@intrinsic
def _rest_of_array(typingctx, a, start):
    """The compiled `rest_of`."""
    if not (isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and isinstance(start, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        src = make_array(a)(context, builder, args[0])
        offset = context.cast(builder, args[1], start, types.intp)
        out = make_array(a)(context, builder)
        populate_array(out, data=builder.gep(src.data, [offset]),
                       shape=[builder.sub(cgutils.unpack_tuple(builder, src.shape)[0], offset)],
                       strides=cgutils.unpack_tuple(builder, src.strides), itemsize=src.itemsize,
                       meminfo=src.meminfo, parent=src.parent)
        return impl_ret_borrowed(context, builder, a, out._getvalue())

    return a(a, start), codegen


@overload(rest_of, inline="always")
def _rest_of_compiled(a, start):
    def impl(a, start):
        return _rest_of_array(a, start)
    return impl


@njit(inline="always")  # inlined into the calling kernel, in numba IR
def cache_aligned(raw, count):
    """raw[start:start + count] (raw 1-D, C-contiguous, with 64 bytes to spare), start the first element on a 64-byte
    boundary. Why: Numba's np.empty and np.zeros start 32 bytes into a cache line half the time, and then each
    64-byte vector load or store at a row that starts at a multiple of 64 bytes spans two lines (a buffer's rows
    are laid out for whole vectors)."""
    start = (-raw.ctypes.data) % 64 // raw.itemsize
    return raw[start:start + count]

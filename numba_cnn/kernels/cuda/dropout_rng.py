"""The cuda backend's dropout generator: DROPOUT_STREAMS xoroshiro128p states on the device (numba.cuda.random),
made from a seed, snapshotted as JSON for a checkpoint and restored from that snapshot: the functions of
numba_cnn/kernels/dropout_rng.py for a generator that lives on the device, where the dropout kernel
(cuda/layers.py) advances its states in place. A snapshot holds every stream, so a checkpoint restores the stream
count it was taken with.
"""

import warnings

import numpy as np

from numba_cnn.kernels.cuda.runtime import DROPOUT_STREAMS, cuda

with warnings.catch_warnings():
    # In the simulator numba.cuda.random decorates its CPU seeding helpers with nopython=False (deprecated).
    warnings.simplefilter("ignore", DeprecationWarning)
    from numba.cuda.random import create_xoroshiro128p_states, xoroshiro128p_dtype


class DropoutRNG:
    """DROPOUT_STREAMS xoroshiro128p generator states on the device, advanced in place by each dropout call."""

    def __init__(self, states):
        self.states = states


def _seed_int(seed):
    """An int or a sequence of ints (as np.random.default_rng takes) -> one seed below 2**63: on a GPU,
    numba-cuda seeds the generator states through an int64 (a larger seed raised OverflowError there, never in
    the simulator)."""
    return int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0] >> np.uint64(1))


def make_dropout_rng(seed):
    with warnings.catch_warnings():
        # The simulator seeds the states in Python object mode, with uint64 wrap-around warnings: both expected.
        warnings.simplefilter("ignore")
        return DropoutRNG(create_xoroshiro128p_states(DROPOUT_STREAMS, seed=_seed_int(seed)))


def dropout_rng_state(rng):
    """A JSON-serialisable snapshot of the generator states (checkpoints store it for exact resume)."""
    states = rng.states.copy_to_host()
    return {"s0": [int(s) for s in states["s0"]], "s1": [int(s) for s in states["s1"]]}


def restore_dropout_rng(state):
    states = np.zeros(len(state["s0"]), dtype=xoroshiro128p_dtype)
    states["s0"] = np.array(state["s0"], dtype=np.uint64)
    states["s1"] = np.array(state["s1"], dtype=np.uint64)
    return DropoutRNG(cuda.to_device(states))

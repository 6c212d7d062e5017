"""The host backends' dropout generator: a numpy Generator, made from a seed, snapshotted as JSON for a checkpoint
and restored from that snapshot, so a resumed run draws the same masks.

naive, im2col and the oracle draw each mask from its stream (layers.py); jit takes a Philox key from it on every
call (jit/layers.py). cuda keeps its generator on the device, behind the same three functions
(cuda/dropout_rng.py); Backend takes one set or the other (the names are contract.DROPOUT_RNG_FUNCTIONS).
"""

import numpy as np


def make_dropout_rng(seed):
    return np.random.default_rng(seed)


def dropout_rng_state(rng):
    """A JSON-serialisable snapshot of the dropout RNG (checkpoints store it for exact resume)."""
    return rng.bit_generator.state


def restore_dropout_rng(state):
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng

"""The jit backend's dropout (numba_cnn/kernels/jit/layers.py): its generator against Philox4x32-10's published
known-answer vectors (Random123's kat_vectors), the mask against the rule its docstring states, and the key drawn
from the numpy Generator the model passes (so seeding and checkpoints work as for the other backends). The
expectation and the backward are tested with the other backends' layers in test_layers.py."""

import math

import numba
import numpy as np
import pytest

from numba_cnn.kernels.jit import layers as jit_layers

ONES = 0xFFFFFFFF
# (counter words, key words) -> the four output words, from Random123's kat_vectors for philox4x32 with 10 rounds
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((ONES,) * 4, (ONES, ONES), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def philox4x32(counter, key):
    """Philox4x32-10 in Python integers, written from the paper (the test's oracle for the compiled rounds)."""
    (c0, c1, c2, c3), (k0, k1) = counter, key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & ONES, (p0 >> 32) ^ c3 ^ k1, p0 & ONES
        k0, k1 = (k0 + 0x9E3779B9) & ONES, (k1 + 0xBB67AE85) & ONES
    return c0, c1, c2, c3


@pytest.mark.parametrize("counter,key,words", KNOWN_ANSWERS)
def test_philox_known_answers(counter, key, words):
    assert list(philox4x32(counter, key)) == list(words)


def _expected_mask(n, key, rate, dtype):
    """The mask by the documented rule, one Philox block at a time in Python."""
    keep = dtype(1.0 - rate)
    threshold = math.ceil(float(keep) * 2 ** 24)
    words = []
    for c in range((n + 3) // 4):
        words.extend(philox4x32((c & ONES, c >> 32, 0, 0), (int(key[0]), int(key[1]))))
    kept = np.array([(word >> 8) < threshold for word in words[:n]])
    return np.where(kept, dtype(1) / keep, dtype(0)).astype(dtype)


# the last: a second task with a full group of lanes, then a partial group, then a partial counter
_SECOND_TASK = 4 * (jit_layers._BLOCKS_PER_TASK + jit_layers._LANES + 5) - 1


@pytest.mark.parametrize("n", [1, 3, 5, 4097, _SECOND_TASK])
@pytest.mark.parametrize("rate", [0.5, 0.3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mask_follows_the_stated_rule_and_the_key_comes_from_the_generator(n, rate, dtype):
    x = np.random.default_rng(1).standard_normal((1, n)).astype(dtype)
    rng = np.random.default_rng(9)
    y, mask = jit_layers.dropout_forward(x, rate, rng)
    key = np.random.default_rng(9).integers(0, 2 ** 32, size=2, dtype=np.uint64)  # the one draw a call takes
    expected = _expected_mask(n, key, rate, dtype)
    assert mask.dtype == y.dtype == dtype
    np.testing.assert_array_equal(mask[0], expected)
    np.testing.assert_array_equal(y, x * mask)
    replay = np.random.default_rng(9)
    replay.integers(0, 2 ** 32, size=2, dtype=np.uint64)
    assert rng.bit_generator.state == replay.bit_generator.state  # a checkpoint of rng resumes the mask stream


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs at least 2 numba threads")
def test_mask_does_not_depend_on_the_thread_count():
    x = np.ones((128, 1600), np.float32)
    before = numba.get_num_threads()
    try:
        masks = []
        for threads in (1, 2):
            numba.set_num_threads(threads)
            masks.append(jit_layers.dropout_forward(x, 0.5, np.random.default_rng(4))[1])
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(*masks)
    assert abs((masks[0] > 0).mean() - 0.5) < 0.01  # 204,800 units: the kept share's sd is 0.0011

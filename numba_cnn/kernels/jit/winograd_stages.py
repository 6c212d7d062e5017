"""The stages of the jit backend's Winograd kernels (tiles.py's forward, winograd_grad.py's weight gradient), each
for 4x4 windows (F(2x2, 3x3)), 6x6 ones (F(4x4, 3x3), F(2x2, 5x5) and their weight gradients) and 8x8 ones
(F(4x4, 5x5) and F(5x5, 4x4)), inlined into the
kernels in numba IR: loading a tile's window of a channels-last input, the input transform B^T d B, the output
transform A^T M A (with the bias and the ReLU), the gradient tile's transform A g A^T, and the two matrix-product
loops: the forward's M[e] = V[e] @ U[e] and the weight gradient's M[e] += V[e]^T Z[e], for every element e of the
tile. The matrices, and why: winograd.py.

Numba's cache keys a function on its own bytecode and closure variables, not on the helpers it inlines from another
module, so every task built from these stages (the jit function each Winograd kernel runs in parallel) closes over
STAGES_STAMP (the SHA-256 of this file's source): an edit here changes their cache keys and recompiles them.
"""

import hashlib
from pathlib import Path

import numpy as np
from numba import njit

from numba_cnn.kernels._numba_ext import copy_block

STAGES_STAMP = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


@njit(inline="always")
def _load_window(d, x_cl, n, row0, col0, c0, chunk, zeros, size):
    """d[(size * i + j) * chunk:][:chunk] = x_cl[n, row0 + i, col0 + j, c0:c0 + chunk] for the size x size window,
    the zeros vector outside x_cl (the padding, and the rows and columns an odd output size reads past it)."""
    h_in, w_in = x_cl.shape[1], x_cl.shape[2]
    for i in range(size):
        row = row0 + i
        for j in range(size):
            col = col0 + j
            if 0 <= row < h_in and 0 <= col < w_in:
                copy_block(d, (size * i + j) * chunk, x_cl[n, row, col], c0, chunk)
            else:
                copy_block(d, (size * i + j) * chunk, zeros, 0, chunk)


@njit(inline="always")
def _transform4(d, tt, vv, chunk):
    """vv[(4a + b) * chunk + l] = (B^T d B)[a, b] of the 4x4 window d[(4i + j) * chunk + l], F(2x2, 3x3)'s B^T
    (rows (d0 - d2, d1 + d2, d2 - d1, d1 - d3), additions only), on the rows then the columns (tt unused: the
    larger windows' signature)."""
    for l in range(chunk):
        d0, d1, d2, d3 = d[l], d[chunk + l], d[2 * chunk + l], d[3 * chunk + l]
        d4, d5, d6, d7 = d[4 * chunk + l], d[5 * chunk + l], d[6 * chunk + l], d[7 * chunk + l]
        d8, d9, d10, d11 = d[8 * chunk + l], d[9 * chunk + l], d[10 * chunk + l], d[11 * chunk + l]
        d12, d13, d14, d15 = d[12 * chunk + l], d[13 * chunk + l], d[14 * chunk + l], d[15 * chunk + l]
        e0, e1, e2, e3 = d0 - d8, d1 - d9, d2 - d10, d3 - d11
        e4, e5, e6, e7 = d4 + d8, d5 + d9, d6 + d10, d7 + d11
        e8, e9, e10, e11 = d8 - d4, d9 - d5, d10 - d6, d11 - d7
        e12, e13, e14, e15 = d4 - d12, d5 - d13, d6 - d14, d7 - d15
        vv[l], vv[chunk + l] = e0 - e2, e1 + e2
        vv[2 * chunk + l], vv[3 * chunk + l] = e2 - e1, e1 - e3
        vv[4 * chunk + l], vv[5 * chunk + l] = e4 - e6, e5 + e6
        vv[6 * chunk + l], vv[7 * chunk + l] = e6 - e5, e5 - e7
        vv[8 * chunk + l], vv[9 * chunk + l] = e8 - e10, e9 + e10
        vv[10 * chunk + l], vv[11 * chunk + l] = e10 - e9, e9 - e11
        vv[12 * chunk + l], vv[13 * chunk + l] = e12 - e14, e13 + e14
        vv[14 * chunk + l], vv[15 * chunk + l] = e14 - e13, e13 - e15


@njit(inline="always")
def _input_transform6(x0, x1, x2, x3, x4, x5):
    """B^T x for one 6-vector (the points 0, 1, -1, 2, -2 and infinity). Multiples as sums: an integer literal
    times a float32 is a float64 in Numba."""
    a, s, d, e = x0 - x2, x1 + x2, x1 - x2, x3 - x1
    a2, s2, d2, e2 = a + a, s + s, d + d, e + e
    return a2 + a2 - x2 + x4, x3 + x4 - (s2 + s2), d2 + d2 + x4 - x3, e2 + x4 - x2, x4 - x2 - e2, x5 - x3 - (e2 + e2)


@njit(inline="always")
def _transform6(d, tt, vv, chunk):
    """vv[(6a + b) * chunk + l] = (B^T d B)[a, b] of the 6x6 window d[(6i + j) * chunk + l], by rows (into tt)
    then by columns; l innermost, so each step is a vector over `chunk` channels. Views at each row or column, then
    constant offsets: LLVM sees every index >= 0 (no negative-index code)."""
    for i in range(6):
        src, dst = d[6 * i * chunk:], tt[6 * i * chunk:]
        for l in range(chunk):
            t0, t1, t2, t3, t4, t5 = _input_transform6(src[l], src[chunk + l], src[2 * chunk + l], src[3 * chunk + l],
                                                       src[4 * chunk + l], src[5 * chunk + l])
            dst[l], dst[chunk + l], dst[2 * chunk + l] = t0, t1, t2
            dst[3 * chunk + l], dst[4 * chunk + l], dst[5 * chunk + l] = t3, t4, t5
    for j in range(6):
        src, dst = tt[j * chunk:], vv[j * chunk:]
        for l in range(chunk):
            v0, v1, v2, v3, v4, v5 = _input_transform6(src[l], src[6 * chunk + l], src[12 * chunk + l],
                                                       src[18 * chunk + l], src[24 * chunk + l], src[30 * chunk + l])
            dst[l], dst[6 * chunk + l], dst[12 * chunk + l] = v0, v1, v2
            dst[18 * chunk + l], dst[24 * chunk + l], dst[30 * chunk + l] = v3, v4, v5


@njit(inline="always")
def _input_transform8(x0, x1, x2, x3, x4, x5, x6, x7):
    """B^T x for one 8-vector, the points 0, 1, -1, 2, -2, 1/2, -1/2 and infinity, each row scaled by 4 or 2 (exact;
    winograd.py's G is scaled back) so that its entries are integers: rows (4, 0, -21, 0, 21, 0, -4, 0),
    (0, 4, 4, -17, -17, 4, 4, 0), (0, -4, 4, 17, -17, -4, 4, 0), (0, 2, 1, -10, -5, 8, 4, 0),
    (0, -2, 1, 10, -5, -8, 4, 0), (0, 4, 8, -5, -10, 1, 2, 0), (0, -4, 8, 5, -10, -1, 2, 0),
    (0, -4, 0, 21, 0, -21, 0, 4). The factors are float32 (exact in it): an integer literal times a float32 is a
    float64 in Numba, a float32 factor times a float64 a float64."""
    two, four, five, eight = np.float32(2), np.float32(4), np.float32(5), np.float32(8)
    ten, seventeen, twenty_one = np.float32(10), np.float32(17), np.float32(21)
    even1, odd1 = four * (x2 + x6) - seventeen * x4, four * (x1 + x5) - seventeen * x3
    even3, odd3 = x2 - five * x4 + four * x6, two * x1 - ten * x3 + eight * x5
    even5, odd5 = two * (four * x2 - five * x4 + x6), four * x1 - five * x3 + x5
    return (four * (x0 - x6) - twenty_one * (x2 - x4), even1 + odd1, even1 - odd1, even3 + odd3, even3 - odd3,
            even5 + odd5, even5 - odd5, four * (x7 - x1) + twenty_one * (x3 - x5))


@njit(inline="always")
def _transform8(d, tt, vv, chunk):
    """_transform6 for the 8x8 window d[(8i + j) * chunk + l]: vv[(8a + b) * chunk + l] = (B^T d B)[a, b], by rows
    (into tt) then by columns."""
    for i in range(8):
        src, dst = d[8 * i * chunk:], tt[8 * i * chunk:]
        for l in range(chunk):
            t0, t1, t2, t3, t4, t5, t6, t7 = _input_transform8(
                src[l], src[chunk + l], src[2 * chunk + l], src[3 * chunk + l], src[4 * chunk + l],
                src[5 * chunk + l], src[6 * chunk + l], src[7 * chunk + l])
            dst[l], dst[chunk + l], dst[2 * chunk + l], dst[3 * chunk + l] = t0, t1, t2, t3
            dst[4 * chunk + l], dst[5 * chunk + l], dst[6 * chunk + l], dst[7 * chunk + l] = t4, t5, t6, t7
    for j in range(8):
        src, dst = tt[j * chunk:], vv[j * chunk:]
        for l in range(chunk):
            v0, v1, v2, v3, v4, v5, v6, v7 = _input_transform8(
                src[l], src[8 * chunk + l], src[16 * chunk + l], src[24 * chunk + l], src[32 * chunk + l],
                src[40 * chunk + l], src[48 * chunk + l], src[56 * chunk + l])
            dst[l], dst[8 * chunk + l], dst[16 * chunk + l], dst[24 * chunk + l] = v0, v1, v2, v3
            dst[32 * chunk + l], dst[40 * chunk + l], dst[48 * chunk + l], dst[56 * chunk + l] = v4, v5, v6, v7


def _tile_input_by(transform):
    """_tile_input4, 6 and 8: v[e, at + ch] = (B^T d B)[e] of the tile's window x window at (row0, col0) of image n
    by `transform` (_transform4: F(2x2, 3x3)'s B^T, 6: that of the points 0, 1, -1, 2, -2 and infinity, 8: those
    and 1/2, -1/2), for every channel ch of x_cl, a vector of `chunk` channels at a time. One function per window,
    chosen in the kernel where the window is a constant: numba inlines a function into the kernel's IR before any
    branch on its arguments is pruned, so one that chose among the three transforms inlined all three."""

    @njit(inline="always")
    def tile_input(v, at, d, tt, vv, x_cl, n, row0, col0, chunk, zeros, window):
        for c0 in range(0, x_cl.shape[3], chunk):
            _load_window(d, x_cl, n, row0, col0, c0, chunk, zeros, window)
            transform(d, tt, vv, chunk)
            for e in range(window * window):
                copy_block(v[e], at + c0, vv, e * chunk, chunk)

    return tile_input


_tile_input4, _tile_input6, _tile_input8 = (_tile_input_by(t) for t in (_transform4, _transform6, _transform8))


@njit(inline="always")
def _output4(m, at, b_vec, floor, zero, outs, lanes):
    """outs[o * lanes + l] = the 2x2 output tile's value o (row-major) of Y = A^T M A, M[e] = m[e, at + l] over
    F(2x2, 3x3)'s 16 elements (A^T's rows (1, 1, 1, 0), (0, 1, -1, -1): additions only), plus b_vec[l], ReLU'd
    against floor (NaN kept); returns the sum of the outputs times zero (NaN once any is NaN or inf)."""
    check = zero
    for l in range(lanes):
        a0 = m[0, at + l] + m[4, at + l] + m[8, at + l]
        a1 = m[1, at + l] + m[5, at + l] + m[9, at + l]
        a2 = m[2, at + l] + m[6, at + l] + m[10, at + l]
        a3 = m[3, at + l] + m[7, at + l] + m[11, at + l]
        a4 = m[4, at + l] - m[8, at + l] - m[12, at + l]
        a5 = m[5, at + l] - m[9, at + l] - m[13, at + l]
        a6 = m[6, at + l] - m[10, at + l] - m[14, at + l]
        a7 = m[7, at + l] - m[11, at + l] - m[15, at + l]
        o0 = b_vec[l] + (a0 + a1 + a2)
        o1 = b_vec[l] + (a1 - a2 - a3)
        o2 = b_vec[l] + (a4 + a5 + a6)
        o3 = b_vec[l] + (a5 - a6 - a7)
        check += (o0 + o1 + o2 + o3) * zero
        outs[l] = floor if o0 < floor else o0  # ReLU; NaN < 0 is false: NaN stays
        outs[lanes + l] = floor if o1 < floor else o1
        outs[2 * lanes + l] = floor if o2 < floor else o2
        outs[3 * lanes + l] = floor if o3 < floor else o3
    return check


@njit(inline="always")
def _output6(m, at, b_vec, floor, zero, ss, outs, lanes):
    """_output4 for the 5x5 kernels' 36 elements: A^T's rows (1, 1, 1, 1, 1, 0) and (0, 1, -1, 2, -2, 1), on the
    columns of M (into ss) then along its rows."""
    check = zero
    for j in range(6):
        m0, m1, m2 = m[j, at:], m[6 + j, at:], m[12 + j, at:]
        m3, m4, m5 = m[18 + j, at:], m[24 + j, at:], m[30 + j, at:]
        s0, s1 = ss[j * lanes:], ss[(6 + j) * lanes:]
        for l in range(lanes):
            d34 = m3[l] - m4[l]
            s0[l] = m0[l] + m1[l] + m2[l] + m3[l] + m4[l]
            s1[l] = m1[l] - m2[l] + (d34 + d34) + m5[l]
    for i in range(2):
        s, o0s, o1s = ss[6 * i * lanes:], outs[2 * i * lanes:], outs[(2 * i + 1) * lanes:]
        for l in range(lanes):
            d34 = s[3 * lanes + l] - s[4 * lanes + l]
            o0 = b_vec[l] + (s[l] + s[lanes + l] + s[2 * lanes + l] + s[3 * lanes + l] + s[4 * lanes + l])
            o1 = b_vec[l] + (s[lanes + l] - s[2 * lanes + l] + (d34 + d34) + s[5 * lanes + l])
            check += (o0 + o1) * zero
            o0s[l] = floor if o0 < floor else o0
            o1s[l] = floor if o1 < floor else o1
    return check


@njit(inline="always")
def _output_line4(x0, x1, x2, x3, x4, x5):
    """A^T x for one 6-vector, F(4x4, 3x3)'s A^T (rows (1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0),
    (0, 1, -1, 8, -8, 1)), the multiples as sums."""
    p, q, r, s = x1 + x2, x1 - x2, x3 + x4, x3 - x4
    r2, s2 = r + r, s + s
    r4, s4 = r2 + r2, s2 + s2
    return x0 + p + r, q + s2, p + r4, q + (s4 + s4) + x5


@njit(inline="always")
def _store_row4(outs, at, lanes, bias, floor, zero, o0, o1, o2, o3):
    """outs[at + m * lanes] = the 4x4 output tile's row of values o0..o3 plus the bias, ReLU'd against floor (NaN
    kept); returns their sum times zero (NaN once any is NaN or inf)."""
    o0, o1, o2, o3 = bias + o0, bias + o1, bias + o2, bias + o3
    outs[at] = floor if o0 < floor else o0  # ReLU; NaN < floor is false: NaN stays
    outs[at + lanes] = floor if o1 < floor else o1
    outs[at + 2 * lanes] = floor if o2 < floor else o2
    outs[at + 3 * lanes] = floor if o3 < floor else o3
    return (o0 + o1 + o2 + o3) * zero


@njit(inline="always")
def _output6x4(m, at, b_vec, floor, zero, ss, outs, lanes):
    """_output4 for F(4x4, 3x3): outs[o * lanes + l] = the 4x4 output tile's value o (row-major) of Y = A^T M A over
    its 36 elements M[e] = m[e, at + l], A^T on the columns of M (into ss, 4 rows of 6) then along each row, plus
    b_vec[l], ReLU'd against floor (NaN kept); returns the outputs' sum times zero."""
    check = zero
    for j in range(6):
        for l in range(lanes):
            a = at + l
            t0, t1, t2, t3 = _output_line4(m[j, a], m[6 + j, a], m[12 + j, a], m[18 + j, a], m[24 + j, a],
                                           m[30 + j, a])
            ss[j * lanes + l], ss[(6 + j) * lanes + l] = t0, t1
            ss[(12 + j) * lanes + l], ss[(18 + j) * lanes + l] = t2, t3
    for i in range(4):
        for l in range(lanes):
            at_row = 6 * i * lanes + l
            o0, o1, o2, o3 = _output_line4(ss[at_row], ss[at_row + lanes], ss[at_row + 2 * lanes],
                                           ss[at_row + 3 * lanes], ss[at_row + 4 * lanes], ss[at_row + 5 * lanes])
            check += _store_row4(outs, 4 * i * lanes + l, lanes, b_vec[l], floor, zero, o0, o1, o2, o3)
    return check


@njit(inline="always")
def _output_line8x4(x0, x1, x2, x3, x4, x5, x6, x7):
    """A^T x for one 8-vector, F(4x4, 5x5)'s A^T with the columns of 1/2 and -1/2 scaled by 8 (exact; G scaled
    back): rows (1, 1, 1, 1, 1, 8, 8, 0), (0, 1, -1, 2, -2, 4, -4, 0), (0, 1, 1, 4, 4, 2, 2, 0),
    (0, 1, -1, 8, -8, 1, -1, 1); float32 factors, as in _input_transform8."""
    two, four, eight = np.float32(2), np.float32(4), np.float32(8)
    s12, d12, s34, d34, s56, d56 = x1 + x2, x1 - x2, x3 + x4, x3 - x4, x5 + x6, x5 - x6
    return (x0 + s12 + s34 + eight * s56, d12 + two * d34 + four * d56, s12 + four * s34 + two * s56,
            d12 + eight * d34 + d56 + x7)


@njit(inline="always")
def _output8x4(m, at, b_vec, floor, zero, ss, outs, lanes):
    """_output6x4 for F(4x4, 5x5)'s 64 elements: A^T on the columns of M (into ss, 4 rows of 8) then along each row,
    plus b_vec[l], ReLU'd against floor (NaN kept); returns the outputs' sum times zero."""
    check = zero
    for j in range(8):
        for l in range(lanes):
            a = at + l
            t0, t1, t2, t3 = _output_line8x4(m[j, a], m[8 + j, a], m[16 + j, a], m[24 + j, a], m[32 + j, a],
                                             m[40 + j, a], m[48 + j, a], m[56 + j, a])
            ss[j * lanes + l], ss[(8 + j) * lanes + l] = t0, t1
            ss[(16 + j) * lanes + l], ss[(24 + j) * lanes + l] = t2, t3
    for i in range(4):
        for l in range(lanes):
            at_row = 8 * i * lanes + l
            o0, o1, o2, o3 = _output_line8x4(ss[at_row], ss[at_row + lanes], ss[at_row + 2 * lanes],
                                             ss[at_row + 3 * lanes], ss[at_row + 4 * lanes], ss[at_row + 5 * lanes],
                                             ss[at_row + 6 * lanes], ss[at_row + 7 * lanes])
            check += _store_row4(outs, 4 * i * lanes + l, lanes, b_vec[l], floor, zero, o0, o1, o2, o3)
    return check


@njit(inline="always")
def _gradient_transform4(g, vv, sums, chunk):
    """vv[(4a + b) * chunk + l] = (A g A^T)[a, b] of the 2x2 tile of dy g[(2i + j) * chunk + l], F(3x3, 2x2)'s A
    (rows (1, 0), (1, 1), (1, -1), (0, -1)), on the rows then the columns; sums[l] += the tile's four values."""
    for l in range(chunk):
        g0, g1, g2, g3 = g[l], g[chunk + l], g[2 * chunk + l], g[3 * chunk + l]
        r0, r1 = g0, g1
        r2, r3 = g0 + g2, g1 + g3
        r4, r5 = g0 - g2, g1 - g3
        r6, r7 = -g2, -g3
        vv[l], vv[chunk + l] = r0, r0 + r1
        vv[2 * chunk + l], vv[3 * chunk + l] = r0 - r1, -r1
        vv[4 * chunk + l], vv[5 * chunk + l] = r2, r2 + r3
        vv[6 * chunk + l], vv[7 * chunk + l] = r2 - r3, -r3
        vv[8 * chunk + l], vv[9 * chunk + l] = r4, r4 + r5
        vv[10 * chunk + l], vv[11 * chunk + l] = r4 - r5, -r5
        vv[12 * chunk + l], vv[13 * chunk + l] = r6, r6 + r7
        vv[14 * chunk + l], vv[15 * chunk + l] = r6 - r7, -r7
        sums[l] += r2 + r3


@njit(inline="always")
def _pair_transform6(x0, x1):
    """A x for one 2-vector, the 5x5 kernels' A (rows (1, 0), (1, 1), (1, -1), (1, 2), (1, -2), (0, 1))."""
    x2 = x1 + x1
    return x0, x0 + x1, x0 - x1, x0 + x2, x0 - x2, x1


@njit(inline="always")
def _pair_row6(vv, row, chunk, l, x0, x1):
    """vv[(6 row + b) * chunk + l] = (A x)[b] of the 2-vector (x0, x1)."""
    z0, z1, z2, z3, z4, z5 = _pair_transform6(x0, x1)
    at = 6 * row * chunk + l
    vv[at], vv[at + chunk], vv[at + 2 * chunk] = z0, z1, z2
    vv[at + 3 * chunk], vv[at + 4 * chunk], vv[at + 5 * chunk] = z3, z4, z5


@njit(inline="always")
def _gradient_transform6(g, vv, sums, chunk):
    """_gradient_transform4 for the 5x5 kernels: vv[(6a + b) * chunk + l] = (A g A^T)[a, b], A on the columns of g
    then on each of the 6 rows, all in registers per lane (a pass through a stack tile read back by a view per row
    compiled to much slower code: docs/numba.md, trap 13); sums[l] += the tile's four values."""
    for l in range(chunk):
        g0, g1, g2, g3 = g[l], g[chunk + l], g[2 * chunk + l], g[3 * chunk + l]
        sums[l] += (g0 + g2) + (g1 + g3)
        a0, a1, a2, a3, a4, a5 = _pair_transform6(g0, g2)
        b0, b1, b2, b3, b4, b5 = _pair_transform6(g1, g3)
        _pair_row6(vv, 0, chunk, l, a0, b0)
        _pair_row6(vv, 1, chunk, l, a1, b1)
        _pair_row6(vv, 2, chunk, l, a2, b2)
        _pair_row6(vv, 3, chunk, l, a3, b3)
        _pair_row6(vv, 4, chunk, l, a4, b4)
        _pair_row6(vv, 5, chunk, l, a5, b5)


@njit(inline="always")
def _gradient_line4(x0, x1, x2, x3):
    """A x for one 4-vector, F(4x4, 3x3)'s A (rows (1, 0, 0, 0), (1, 1, 1, 1), (1, -1, 1, -1), (1, 2, 4, 8),
    (1, -2, 4, -8), (0, 0, 0, 1)), the multiples as sums."""
    even, odd = x0 + x2, x1 + x3
    x2_2, x3_2 = x2 + x2, x3 + x3
    x3_4 = x3_2 + x3_2
    even_4, odd_2 = x0 + (x2_2 + x2_2), (x1 + x1) + (x3_4 + x3_4)
    return x0, even + odd, even - odd, even_4 + odd_2, even_4 - odd_2, x3


@njit(inline="always")
def _add_tile_sums16(g, sums, chunk):
    """sums[l] += the sum of the 4x4 tile's 16 values g[e * chunk + l], in row-major order."""
    for l in range(chunk):
        total = g[l]
        for e in range(1, 16):
            total += g[e * chunk + l]
        sums[l] += total


@njit(inline="always")
def _gradient_transform6x4(g, tt, vv, sums, chunk):
    """_gradient_transform4 for a 4x4 tile of dy (F(3x3, 4x4)): vv[(6a + b) * chunk + l] = (A g A^T)[a, b] of
    g[(4i + j) * chunk + l], A on the columns of g into tt (6 rows of 4), then on each of tt's rows; offsets into
    the whole tiles (no views); sums[l] += the tile's 16 values."""
    _add_tile_sums16(g, sums, chunk)
    for j in range(4):
        for l in range(chunk):
            at = j * chunk + l
            a0, a1, a2, a3, a4, a5 = _gradient_line4(g[at], g[at + 4 * chunk], g[at + 8 * chunk], g[at + 12 * chunk])
            tt[at], tt[at + 4 * chunk], tt[at + 8 * chunk] = a0, a1, a2
            tt[at + 12 * chunk], tt[at + 16 * chunk], tt[at + 20 * chunk] = a3, a4, a5
    for a in range(6):
        for l in range(chunk):
            at, to = 4 * a * chunk + l, 6 * a * chunk + l
            z0, z1, z2, z3, z4, z5 = _gradient_line4(tt[at], tt[at + chunk], tt[at + 2 * chunk], tt[at + 3 * chunk])
            vv[to], vv[to + chunk], vv[to + 2 * chunk] = z0, z1, z2
            vv[to + 3 * chunk], vv[to + 4 * chunk], vv[to + 5 * chunk] = z3, z4, z5


@njit(inline="always")
def _gradient_line8x4(x0, x1, x2, x3):
    """A x for one 4-vector, F(4x4, 5x5)'s A (A^T of _output_line8x4: rows (1, 0, 0, 0), (1, 1, 1, 1),
    (1, -1, 1, -1), (1, 2, 4, 8), (1, -2, 4, -8), (8, 4, 2, 1), (8, -4, 2, -1), (0, 0, 0, 1)); float32 factors."""
    two, four, eight = np.float32(2), np.float32(4), np.float32(8)
    even, odd = x0 + x2, x1 + x3
    even2, odd2 = x0 + four * x2, two * x1 + eight * x3
    even_half, odd_half = eight * x0 + two * x2, four * x1 + x3
    return x0, even + odd, even - odd, even2 + odd2, even2 - odd2, even_half + odd_half, even_half - odd_half, x3


@njit(inline="always")
def _gradient_transform8x4(g, tt, vv, sums, chunk):
    """_gradient_transform6x4 for F(5x5, 4x4): vv[(8a + b) * chunk + l] = (A g A^T)[a, b] of the 4x4 tile of dy
    g[(4i + j) * chunk + l], A on the columns of g into tt (8 rows of 4), then on each of tt's rows; sums[l] += the
    tile's 16 values."""
    _add_tile_sums16(g, sums, chunk)
    for j in range(4):
        for l in range(chunk):
            at = j * chunk + l
            a0, a1, a2, a3, a4, a5, a6, a7 = _gradient_line8x4(g[at], g[at + 4 * chunk], g[at + 8 * chunk],
                                                               g[at + 12 * chunk])
            tt[at], tt[at + 4 * chunk], tt[at + 8 * chunk], tt[at + 12 * chunk] = a0, a1, a2, a3
            tt[at + 16 * chunk], tt[at + 20 * chunk], tt[at + 24 * chunk], tt[at + 28 * chunk] = a4, a5, a6, a7
    for a in range(8):
        for l in range(chunk):
            at, to = 4 * a * chunk + l, 8 * a * chunk + l
            z0, z1, z2, z3, z4, z5, z6, z7 = _gradient_line8x4(tt[at], tt[at + chunk], tt[at + 2 * chunk],
                                                               tt[at + 3 * chunk])
            vv[to], vv[to + chunk], vv[to + 2 * chunk], vv[to + 3 * chunk] = z0, z1, z2, z3
            vv[to + 4 * chunk], vv[to + 5 * chunk], vv[to + 6 * chunk], vv[to + 7 * chunk] = z4, z5, z6, z7


@njit(inline="always")
def _forward_products(v, u, m, acc, xs, n_band, c, k0, zero, elements, rows, lanes):
    """m[e, t * lanes + l] = sum over ch of v[e, t * c + ch] u[e, ch, k0 + l] for the band's n_band tiles (rounded up
    to `rows`: the last rows may read stale V) and each element e: register tiles of `rows` tiles x `lanes` output
    channels, a vector of U against `rows` broadcast values of V per step."""
    for e in range(elements):
        v_e, u_e, m_e = v[e], u[e], m[e]
        for t0 in range(0, n_band, rows):
            for i in range(rows):
                for l in range(lanes):
                    acc[i * lanes + l] = zero
            for ch in range(c):
                u_vec = u_e[ch, k0:k0 + lanes]
                for i in range(rows):
                    xs[i] = v_e[np.uint64((t0 + i) * c + ch)]  # unsigned: no wraparound code
                for l in range(lanes):
                    u_l = u_vec[l]
                    for i in range(rows):
                        acc[i * lanes + l] += xs[i] * u_l
            for i in range(rows):
                copy_block(m_e, (t0 + i) * lanes, acc, i * lanes, lanes)


@njit(inline="always")
def _grad_products(v, z, part, acc, xs, n_band, c, k_padded, elements, rows, lanes):
    """part[e, ch * k_padded + k] += sum over the band's n_band tiles t of v[e, t * c + ch] z[e, t * k_padded + k],
    for each element e: register tiles of `rows` input x `lanes` output channels loaded from part, summed over the
    tiles in order (a vector of Z against `rows` broadcast values of V per tile) and stored back."""
    for e in range(elements):
        v_e, z_e, m_e = v[e], z[e], part[e]
        for c0 in range(0, c, rows):
            for k0 in range(0, k_padded, lanes):
                for i in range(rows):
                    copy_block(acc, i * lanes, m_e, (c0 + i) * k_padded + k0, lanes)
                for t in range(n_band):
                    # unsigned indices: no code for negative ones (wraparound) in the inner loop
                    z_at, v_at = np.uint64(t * k_padded + k0), np.uint64(t * c + c0)
                    for i in range(rows):
                        xs[i] = v_e[v_at + np.uint64(i)]
                    for l in range(lanes):
                        z_l = z_e[z_at + np.uint64(l)]
                        for i in range(rows):
                            acc[i * lanes + l] += xs[i] * z_l
                for i in range(rows):
                    copy_block(m_e, (c0 + i) * k_padded + k0, acc, i * lanes, lanes)

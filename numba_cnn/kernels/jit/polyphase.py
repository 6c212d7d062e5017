"""The jit backend's strided convolutions as stride-1 ones over the input's phases, so that Winograd's kernels take
them. Host side and its two copy kernels in one file.

A stride-2 output reads every second input row and column. Split x into its four phases, the rows and columns of
each parity (x[2i + a, 2j + b] for a, b in 0, 1), stacked along the channels: a 28 x 28 x 16 input becomes
14 x 14 x 64. Each tap (u, v) of the kernel meets one phase at one offset: with `top` zeros of padding, output row i
reads input row 2i + u - top = 2(i + d) + a, so tap u lands on phase a = (u - top) mod 2 at offset
d = (u - top) // 2. A 5x5 kernel with 'same' padding (top 2) takes offsets -1, 0, 1 in both phases: three taps in
one phase, two in the other, padded with zeros to a 3x3 kernel. The layer is then a stride-1 3x3 convolution of
64 channels at 14 x 14, whose Winograd F(2x2, 3x3) computes 16 products per 2x2 tile and pair of channels against
the 25 x 4 direct products per tile of the strided layer: 4 x 16 / 100 = 0.64 of the multiply-adds, the zero taps
included. Any stride t works the same way with t * t phases.

The forward: `_phase_split` writes the phases channels-last (once per pass: the backward's weight gradient reads
the same copy), the kernel's taps are spread into the phase kernel (`phase_weights`), and winograd.py's
`winograd_conv` runs, its padding the phase offsets' (-first above, none below: the phase grid has exactly the rows
the outputs read). The backward: dw is winograd_grad.py's weight gradient of that stride-1 convolution, gathered
back tap by tap (each tap of w is one tap of the phase kernel, so no sums); dx is the stride-1 layer's input gradient
(Winograd's full correlation with the flipped phase kernel), written back to x's rows and columns by
`_phase_merge`. Taken where those Winograd kernels fit the phase layer and its products, counted for F(2x2), come
to at most POLYPHASE_SHARE of the direct ones (a 3x3 stride-2 kernel becomes 2x2 taps padded to 3x3: more products,
not fewer); else, and where an output comes out non-finite, jit/__init__.py runs general.py's strided kernels.
"""

import numpy as np

from numba_cnn.kernels._numba_ext import jit as _jit, part_range, parts_kernel
from numba_cnn.kernels.contract import is_channels_last
from numba_cnn.kernels.jit.buffers import layout_copy, nhwc, reusable_output
from numba_cnn.kernels.jit.paths import note
from numba_cnn.kernels.jit.tiles import WINOGRAD_CHUNK
from numba_cnn.kernels.jit.winograd import winograd_conv, winograd_fits
from numba_cnn.kernels.jit.winograd_grad import winograd_grad_fits, winograd_weight_grad

# the phase layer's Winograd F(2x2) products at most this share of the strided layer's direct ones
POLYPHASE_SHARE = 2 / 3


@parts_kernel
@_jit(parallel=False)
def _phase_split(part, n_parts, x_flat, x_steps, x_shape, stride, out):
    """x[N, C, H, W] -> out[N, Hp, Wp, stride * stride * C]: out[n, i, j, (a * stride + b) * C + c] = x[n, c,
    stride * i + a, stride * j + b], zero past x's rows and columns. x is read from the buffer that stores it, x_flat,
    through its element steps x_steps (image, channel, row, column) and x_shape: an NCHW and a channels-last x then
    take one compiled kernel (as an array, they are two types)."""
    image_step, channel_step, row_step, col_step = x_steps
    n_ch, h, w = x_shape[1], x_shape[2], x_shape[3]
    rows, cols = out.shape[1], out.shape[2]
    zero = out.dtype.type(0)
    for n in part_range(part, n_parts, x_shape[0]):
        for i in range(rows):
            for j in range(cols):
                for a in range(stride):
                    for b in range(stride):
                        base = (a * stride + b) * n_ch
                        row, col = stride * i + a, stride * j + b
                        if row < h and col < w:
                            # unsigned, so that numba adds no wrap-around for negative indices (docs/numba.md, trap 2)
                            at = np.uint64(n * image_step + row * row_step + col * col_step)
                            for ch in range(n_ch):
                                out[n, i, j, base + ch] = x_flat[at + np.uint64(ch * channel_step)]
                        else:
                            for ch in range(n_ch):
                                out[n, i, j, base + ch] = zero


@parts_kernel
@_jit(parallel=False)
def _phase_merge(part, n_parts, phases, stride, out):
    """phases[N, Hp, Wp, stride * stride * C] -> out[N, H, W, C], _phase_split's inverse: out[n, y, x, c] =
    phases[n, y // stride, x // stride, ((y % stride) * stride + x % stride) * C + c], zero past the phase grid."""
    n_images, h, w, n_ch = out.shape
    rows, cols = phases.shape[1], phases.shape[2]
    zero = out.dtype.type(0)
    for n in part_range(part, n_parts, n_images):
        for y in range(h):
            i, a = y // stride, y % stride
            for x in range(w):
                j, b = x // stride, x % stride
                base = (a * stride + b) * n_ch
                dst = out[n, y, x]
                if i < rows and j < cols:
                    src = phases[n, i, j, base:]  # sliced first: read at base + ch, the copy gathered (trap 2)
                    for ch in range(n_ch):
                        dst[ch] = src[ch]
                else:
                    for ch in range(n_ch):
                        dst[ch] = zero


def _phase_offsets(size, before, stride):
    """(first, count): with `before` zeros of padding, output i reads input rows stride * (i + d) + a, the phase a
    and offset d = (u - before) // stride of each tap u; d runs over first .. first + count - 1."""
    first = -before // stride
    return first, (size - 1 - before) // stride - first + 1


def _phase_taps(r, s, stride, side, first_row, first_col, top, left):
    """[(phase, di, dj, u, v)]: tap (di, dj) of the phase kernel's `phase` = a * stride + b block is w's tap (u, v);
    every tap of w appears once."""
    taps = []
    for a in range(stride):
        for b in range(stride):
            for di in range(side):
                u = stride * (di + first_row) + a + top
                for dj in range(side):
                    v = stride * (dj + first_col) + b + left
                    if 0 <= u < r and 0 <= v < s:
                        taps.append((a * stride + b, di, dj, u, v))
    return taps


class PhasePlan:
    """A strided layer's phase layer: a `side` x `side` kernel (`w_phases`) over stride^2 * C channels of a rows x
    cols phase grid, padded by `padding` (the offsets' -first above and on the left, none below or on the right),
    with the strided layer's p x q outputs."""

    def __init__(self, x_shape, w, stride, padding, side, first_row, first_col):
        n, c, h, wd = x_shape
        k, _, r, s = w.shape
        top, bottom, left, right = padding
        self.p, self.q = (h + top + bottom - r) // stride + 1, (wd + left + right - s) // stride + 1
        self.stride, self.side, self.channels = stride, side, stride * stride * c
        self.rows, self.cols = self.p + side - 1 + first_row, self.q + side - 1 + first_col
        self.padding = (-first_row, 0, -first_col, 0)
        self.taps = _phase_taps(r, s, stride, side, first_row, first_col, top, left)
        self.w_phases = np.zeros((k, self.channels, side, side), w.dtype)
        for phase, di, dj, u, v in self.taps:
            self.w_phases[:, phase * c:(phase + 1) * c, di, dj] = w[:, :, u, v]

    def gather(self, dw_phases, w_shape):
        """The phase kernel's gradient -> w's, tap by tap."""
        c = w_shape[1]
        dw = np.empty(w_shape, dw_phases.dtype)
        for phase, di, dj, u, v in self.taps:
            dw[:, :, u, v] = dw_phases[:, phase * c:(phase + 1) * c, di, dj]
        return dw

    def split(self, x):
        """x's phases channels-last [N, rows, cols, stride^2 * C], once per pass (`layout_copy`)."""
        def make(allocate):
            out = allocate((x.shape[0], self.rows, self.cols, self.channels), x.dtype)
            # the buffer that stores x, C-contiguous either way, and x's steps in it
            if is_channels_last(x):
                stored, steps = x.transpose(0, 2, 3, 1), x.strides
            else:
                stored = np.ascontiguousarray(x)
                steps = stored.strides
            _phase_split(stored.reshape(-1), tuple(step // x.itemsize for step in steps), x.shape, self.stride, out)
            return out

        return layout_copy(x, ("phases", self.stride, self.rows, self.cols), make, "x_phases")


def polyphase_plan(x_shape, w, stride, padding):
    """The PhasePlan of a strided convolution of x_shape by w, or None where the phase layer does not take the
    Winograd kernels or would not save products (module docstring)."""
    n = x_shape[0]
    k, _, r, s = w.shape
    first_row, taps_r = _phase_offsets(r, padding[0], stride)
    first_col, taps_s = _phase_offsets(s, padding[2], stride)
    side = 3 if max(taps_r, taps_s) <= 3 else 5
    if (stride < 2 or min(taps_r, taps_s) < 1 or max(taps_r, taps_s) > 5 or max(-first_row, -first_col) > side - 1
            or stride * stride * (side + 1) ** 2 > POLYPHASE_SHARE * 4 * r * s
            or stride * stride * x_shape[1] % WINOGRAD_CHUNK):
        return None
    plan = PhasePlan(x_shape, w, stride, padding, side, first_row, first_col)
    # the forward, dx (the flipped phase kernel over dy's K channels) and dw all on Winograd's kernels
    if not (winograd_fits((n, plan.channels, plan.rows, plan.cols), plan.w_phases, 1)
            and winograd_fits((n, k, plan.p, plan.q), plan.w_phases.transpose(1, 0, 2, 3), 1)
            and winograd_grad_fits(plan.w_phases.shape, 1)):
        return None
    return plan


def polyphase_forward(x, w, b, relu, stride, padding):
    """conv2d_forward of a strided layer through its phase layer (module docstring), or None where it does not take
    it or an output came out non-finite (the caller then runs the strided kernel)."""
    plan = polyphase_plan(x.shape, w, stride, padding)
    if plan is None:
        return None
    x_phases = plan.split(x)
    result = winograd_conv(x_phases.transpose(0, 3, 1, 2), plan.w_phases, b, relu, plan.padding, pool=False)
    if result is None:
        return None
    y, _, path, executed = result
    note("conv2d_forward", f"{stride * stride} phases of stride 1, {path}", executed)
    return y


def polyphase_backward(dy, x, w, need_dx, stride, padding):
    """conv2d_backward of a strided layer through its phase layer: (dx or None, dw, db), or None where it does not
    take it or a result came out non-finite."""
    plan = polyphase_plan(x.shape, w, stride, padding)
    if plan is None:
        return None
    grads = winograd_weight_grad(dy, plan.split(x).transpose(0, 3, 1, 2), plan.padding, plan.side)
    if grads is None:
        return None
    dw_phases, db, executed, path = grads
    dw = plan.gather(dw_phases, w.shape)
    dx = None
    if need_dx:  # the phase layer's dx: dy's full correlation with the flipped phase kernel, cropped by its padding
        side = plan.side
        w_flipped = np.ascontiguousarray(plan.w_phases[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
        top, _, left, _ = plan.padding
        result = winograd_conv(dy, w_flipped, np.zeros(plan.channels, dy.dtype), False,
                               (side - 1 - top, side - 1, side - 1 - left, side - 1), pool=False)
        if result is None:
            return None
        dx_phases, _, dx_path, dx_executed = result
        # channels-last whatever x's layout: the merge then writes whole vectors of channels (the layer before
        # reads either layout)
        dx = reusable_output((x.shape[0], x.shape[2], x.shape[3], x.shape[1]), x.dtype)
        _phase_merge(nhwc(dx_phases), stride, dx)
        dx = dx.transpose(0, 3, 1, 2)
        path, executed = f"{path}, dx by {dx_path}", executed + dx_executed
    note("conv2d_backward", f"{stride * stride} phases of stride 1, {path}", executed)
    return dx, dw, db

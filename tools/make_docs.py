"""Rebuild everything in docs/ that is computed rather than written: the pictures in docs/img/, the generated blocks
in the pages, and the figures the pages quote from docs/results.json.

    python tools/make_docs.py            # rewrite docs/img/*.png, the generated blocks and the tagged figures
    python tools/make_docs.py --check    # change nothing; exit 1 and name what is stale

Three kinds of computed text, so that a number is written in one place only:
- a generated block, between `<!-- generated: KEY -->` and `<!-- end generated -->`, is replaced by BLOCKS[KEY]():
  worked examples computed by the project's own code (the `reference` backend, numba_cnn.kernels.layers), tables of
  the tile shapes imported from numba_cnn/kernels/jit/tiles.py, and tables of measurements read from
  docs/results.json;
- a tagged figure, a number followed by `<!--fig:KEY-->`, is replaced by figures()[KEY], read from
  docs/results.json: the same key in two places gives the same number;
- the pictures: drawn from the same numbers, with matplotlib's Agg backend, without dates in their metadata.

The measurements themselves are made by other commands that write docs/results.json: `python tools/ladder.py
--write` (the optimisation ladder and its assembly) and `python tools/record_run.py RUN_FOLDER` (a training run).
tests/test_docs.py runs the --check half: a page whose generated text differs from what this script renders fails.
"""

import argparse
import json
import os
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DOCS = ROOT / "docs"
IMG = DOCS / "img"
RESULTS = DOCS / "results.json"
PAGES = [ROOT / "README.md"] + sorted(DOCS.glob("*.md"))
BLOCK_RE = re.compile(r"(<!-- generated: ([\w-]+) -->\n)(.*?)(<!-- end generated -->)", re.S)
FIGURE_RE = re.compile(r"(?<![\d.,])(\d[\d,]*(?:\.\d+)?)<!--fig:([\w.-]+)-->")  # unsigned: 5.3-7.4 is a range
NO_PADDING = (0, 0, 0, 0)

# ---------------------------------------------------------------- the worked example's numbers

X = np.array([[1, 2, 0, 1], [0, 1, 3, 2], [2, 0, 1, 1], [1, 3, 0, 2]], dtype=np.float64)
W = np.array([[1, 0], [-1, 2]], dtype=np.float64)
B = 1.0
DY = np.array([[1, 0, -1], [2, 1, 0], [0, -1, 1]], dtype=np.float64)
POOL_DY = np.array([[4, -2], [1, 3]], dtype=np.float64)
LOGITS = np.array([[2.0, 1.0, 0.1], [0.5, 2.5, -1.0]], dtype=np.float32)
LABELS = np.array([0, 2])
BN_X = np.array([1.0, 2.0, 3.0, 6.0])
BN_DY = np.array([1.0, 0.0, 0.0, 0.0])
BN_EPS = 1e-3  # numba_cnn/network/layers/batchnorm.py's default, read below


def reference():
    from numba_cnn.kernels import get_backend

    return get_backend("reference")


@lru_cache(maxsize=None)
def conv_example():
    """x, w, b, y, dy, dx, dw, db of the 4x4 / 2x2 example, 2-D (one image, one channel), from the oracle."""
    ref = reference()
    x, w, dy = X[None, None], W[None, None], DY[None, None]
    y = ref.conv2d_forward(x, w, np.array([B]), relu=False, stride=1, padding=NO_PADDING)
    dx, dw, db = ref.conv2d_backward(dy, x, w, need_dx=True, stride=1, padding=NO_PADDING)
    return dict(x=X, w=W, b=B, y=y[0, 0], dy=DY, dx=dx[0, 0], dw=dw[0, 0], db=float(db[0]))


@lru_cache(maxsize=None)
def pool_example():
    ref = reference()
    x = X[None, None]
    y, argmax = ref.maxpool2d_forward(x, size=(2, 2))
    dx_max = ref.maxpool2d_backward(POOL_DY[None, None], argmax, x.shape, size=(2, 2))
    avg = ref.avgpool2d_forward(x, size=(2, 2))
    dx_avg = ref.avgpool2d_backward(POOL_DY[None, None], x.shape, size=(2, 2))
    return dict(x=X, y=y[0, 0], argmax=argmax[0, 0], dy=POOL_DY, dx_max=dx_max[0, 0], avg=avg[0, 0],
                dx_avg=dx_avg[0, 0])


def num(v, digits=4):
    """A number as the docs print it: integers without a point, others with up to `digits` decimals."""
    v = float(v)
    if v == int(v) and abs(v) < 1e9:
        return str(int(v))
    return f"{v:.{digits}f}".rstrip("0").rstrip(".")


def matrix_lines(name, a, digits=4):
    """['name = [ 1  2 ]', '       [ 0  1 ]'] with aligned columns."""
    cells = [[num(v, digits) for v in row] for row in np.atleast_2d(a)]
    width = max(len(c) for row in cells for c in row)
    lines = []
    for i, row in enumerate(cells):
        lead = f"{name} = " if i == 0 else " " * (len(name) + 3)
        lines.append(lead + "[ " + "  ".join(c.rjust(width) for c in row) + " ]")
    return lines


def side_by_side(*blocks, gap=4):
    height = max(len(b) for b in blocks)
    widths = [max(len(line) for line in b) for b in blocks]
    out = []
    for i in range(height):
        parts = [(b[i] if i < len(b) else "").ljust(wd) for b, wd in zip(blocks, widths)]
        out.append((" " * gap).join(parts).rstrip())
    return out


def para(text):
    """A paragraph of generated prose, wrapped as the pages are (at most 116 characters a line)."""
    import textwrap

    return textwrap.fill(" ".join(text.split()), width=116, break_on_hyphens=False, break_long_words=False)


def code(lines):
    return "```\n" + "\n".join(lines) + "\n```\n"


def signed(v):
    """A factor in a written-out product: negative numbers in parentheses."""
    return num(v) if v >= 0 else f"({num(v)})"


def term(value, weight):
    return f"{signed(value)}*{signed(weight)}"


def block_conv_forward():
    e = conv_example()
    lines = side_by_side(matrix_lines("x", e["x"]), matrix_lines("w", e["w"]), [f"b = {num(e['b'])}"],
                         matrix_lines("y", e["y"]))
    i, j = 0, 1
    terms = " + ".join(term(e["x"][i + r, j + s], e["w"][r, s]) for r in range(2) for s in range(2))
    lines += ["", f"y[{i},{j}] = {terms} + {num(e['b'])} = {num(e['y'][i, j])}"]
    return code(lines)


def block_conv_backward():
    e = conv_example()
    lines = side_by_side(matrix_lines("dy", e["dy"]), matrix_lines("dw", e["dw"]), [f"db = {num(e['db'])}"],
                         matrix_lines("dx", e["dx"]))
    r, s = 0, 1
    terms = " + ".join(term(e["dy"][i, j], e["x"][i + r, j + s]) for i in range(3) for j in range(3)
                       if e["dy"][i, j] != 0)
    lines += ["", f"dw[{r},{s}] = sum over i, j of dy[i,j] * x[i+{r},j+{s}] = {terms} = {num(e['dw'][r, s])}"]
    h, wc = 1, 1
    parts = []
    for rr in range(2):
        for ss in range(2):
            i, j = h - rr, wc - ss
            if 0 <= i < 3 and 0 <= j < 3:
                parts.append((f"dy[{i},{j}]*w[{rr},{ss}]", term(e["dy"][i, j], e["w"][rr, ss])))
    lines += [f"dx[{h},{wc}] = " + " + ".join(p for p, _ in parts),
              " " * len(f"dx[{h},{wc}] = ") + "= " + " + ".join(t for _, t in parts) + f" = {num(e['dx'][h, wc])}"]
    return code(lines)


def im2col_parts():
    from numpy.lib.stride_tricks import sliding_window_view

    x = X.astype(np.float32).reshape(1, 1, 4, 4)
    patches = sliding_window_view(x, (2, 2), axis=(2, 3))
    cols = patches.transpose(0, 1, 4, 5, 2, 3).reshape(1, 4, 9)[0]
    return x, patches, cols


def block_im2col():
    e = conv_example()
    x, patches, cols = im2col_parts()
    y_row = W.reshape(1, 4) @ cols + B
    lines = [f"x.shape   = {x.shape}   x.strides       = {x.strides}   (bytes: float32 is 4)",
             f"patches   = sliding_window_view(x, (2, 2), axis=(2, 3))",
             f"patches.shape = {patches.shape}   patches.strides = {patches.strides}",
             ""]
    lines += side_by_side(matrix_lines("w.reshape(1, 4)", W.reshape(1, 4)), matrix_lines("cols", cols))
    lines += [""] + matrix_lines("w.reshape(1, 4) @ cols + b", y_row)
    assert np.array_equal(y_row.reshape(3, 3), e["y"]), "im2col and the oracle disagree on the worked example"
    return code(lines)


def block_col2im():
    x, _, cols = im2col_parts()
    counts = np.zeros((4, 4))
    for r in range(2):
        for s in range(2):
            counts[r:r + 3, s:s + 3] += 1
    e = conv_example()
    dcols = W.reshape(4, 1) @ DY.reshape(1, 9)
    dx = np.zeros((4, 4))
    for r in range(2):
        for s in range(2):
            dx[r:r + 3, s:s + 3] += dcols[2 * r + s].reshape(3, 3)
    assert np.array_equal(dx, e["dx"]), "col2im and the oracle disagree on the worked example"
    lines = matrix_lines("dcols = w.reshape(4, 1) @ dy.reshape(1, 9)", dcols) + [""]
    lines += side_by_side(matrix_lines("windows covering each pixel", counts), matrix_lines("dx", dx))
    return code(lines)


def block_pool():
    e = pool_example()
    lines = side_by_side(matrix_lines("x", e["x"]), matrix_lines("max", e["y"]), matrix_lines("argmax", e["argmax"]),
                         matrix_lines("avg", e["avg"]))
    lines += [""] + side_by_side(matrix_lines("dy", e["dy"]), matrix_lines("dx (max)", e["dx_max"]),
                                 matrix_lines("dx (avg)", e["dx_avg"]))
    return code(lines)


CHAIN = dict(x=3.0, w=0.5, b=-1.0, t=2.0)


def chain_loss(x, w, b, t):
    """The one-neuron graph of the chain-rule example: L = (relu(w * x + b) - t)^2."""
    return (max(w * x + b, 0.0) - t) ** 2


@lru_cache(maxsize=None)
def chain_example():
    """Forward values and gradients of every node of the chain-rule graph, by the chain rule; checked against
    central differences of chain_loss."""
    x, w, b, t = (CHAIN[k] for k in "xwbt")
    u = w * x
    z = u + b
    a = max(z, 0.0)
    loss = (a - t) ** 2
    da = 2 * (a - t)
    dz = da * (1.0 if z > 0 else 0.0)
    du, db = dz, dz
    dw, dx = du * x, du * w
    h = 1e-6
    for name, grad in (("x", dx), ("w", dw), ("b", db)):
        up, down = dict(CHAIN), dict(CHAIN)
        up[name] += h
        down[name] -= h
        numeric = (chain_loss(**up) - chain_loss(**down)) / (2 * h)
        assert abs(numeric - grad) < 1e-6, (name, numeric, grad)
    return dict(x=x, w=w, b=b, t=t, u=u, z=z, a=a, loss=loss, da=da, dz=dz, du=du, db=db, dw=dw, dx=dx)


def block_chain_rule():
    e = chain_example()
    n = {k: num(v) for k, v in e.items()}
    plus_b = n["b"] if e["b"] >= 0 else f"({n['b']})"
    forward = [("u = w * x", f"{n['w']} * {n['x']}", n["u"]), ("z = u + b", f"{n['u']} + {plus_b}", n["z"]),
               ("a = relu(z)", f"max({n['z']}, 0)", n["a"]), ("L = (a - t)^2", f"({n['a']} - {n['t']})^2", n["loss"])]
    backward = [("dL/da = 2 (a - t)", f"2 * ({n['a']} - {n['t']})", n["da"]),
                ("dL/dz = dL/da * [z > 0]", f"{n['da']} * 1", n["dz"]),
                ("dL/du = dL/dz * 1", f"{n['dz']} * 1", n["du"]), ("dL/db = dL/dz * 1", f"{n['dz']} * 1", n["db"]),
                ("dL/dw = dL/du * x", f"{n['du']} * {n['x']}", n["dw"]),
                ("dL/dx = dL/du * w", f"{n['du']} * {n['w']}", n["dx"])]
    width = max(len(a) for a, _, _ in forward + backward)
    middle = max(len(b) for _, b, _ in forward + backward)
    lines = ["forward, left to right (t = " + n["t"] + ", the target):"]
    lines += [f"  {a.ljust(width)} = {b.ljust(middle)} = {c}" for a, b, c in forward]
    lines += ["backward, right to left: each node multiplies the gradient it receives by its local derivative"]
    lines += [f"  {a.ljust(width)} = {b.ljust(middle)} = {c}" for a, b, c in backward]
    lines += ["(each of dL/dx, dL/dw, dL/db checked against (L(v + h) - L(v - h)) / 2h, h = 1e-6)"]
    return code(lines)


def block_softmax():
    from numba_cnn.kernels.layers import softmax_cross_entropy

    loss, dlogits, correct = softmax_cross_entropy(LOGITS, LABELS)
    z = LOGITS.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    losses = -np.log(p[np.arange(len(LABELS)), LABELS])
    lines = matrix_lines("z", LOGITS, 2) + [f"t = {LABELS.tolist()}   (the right class of each row)", ""]
    lines += matrix_lines("p = softmax(z)", p, 4)
    lines += [f"-log p[n, t[n]] = {num(losses[0], 4)}, {num(losses[1], 4)}      "
              f"loss = their mean = {num(loss, 4)}", ""]
    lines += matrix_lines("dlogits = (p - onehot(t)) / N", dlogits, 4)
    lines += ["", "(softmax_cross_entropy(z, t) returns loss and dlogits; p and the per-row terms are recomputed "
                  "here to show the steps)"]
    return code(lines)


def block_same_padding():
    from numba_cnn.kernels.contract import conv_output_size
    from numba_cnn.network.layers.conv2d import same_padding

    rows = ["| H | R | stride | 'same' padding (before, after) | P |", "|---|---|---|---|---|"]
    for h, r, stride in ((28, 5, 1), (28, 3, 2), (13, 3, 2), (4, 2, 1), (32, 3, 2)):
        before, after = same_padding(h, r, stride)
        rows.append(f"| {h} | {r} | {stride} | ({before}, {after}) | {conv_output_size(h, r, stride, before, after)} |")
    return "\n".join(rows) + "\n"


X5 = np.array([[1, 2, 0, 1, 2], [0, 1, 3, 2, 1], [2, 0, 1, 1, 0], [1, 3, 0, 2, 1], [2, 1, 1, 0, 3]], dtype=np.float64)


def block_strided_example():
    from numba_cnn.network.layers.conv2d import same_padding

    ref = reference()
    y = ref.conv2d_forward(X5[None, None], W[None, None], np.array([B]), relu=False, stride=2, padding=NO_PADDING)
    dx, _, _ = ref.conv2d_backward(np.ones((1, 1) + y.shape[2:]), X5[None, None], W[None, None], need_dx=True,
                                   stride=2, padding=NO_PADDING)
    pads = same_padding(4, 2, 1) + same_padding(4, 2, 1)
    yp = ref.conv2d_forward(X[None, None], W[None, None], np.array([B]), relu=False, stride=1, padding=pads)
    lines = side_by_side(matrix_lines("x (5x5)", X5), matrix_lines("stride 2:  y", y[0, 0]))
    lines += [""] + matrix_lines("dx for dy = all ones", dx[0, 0]) + [""]
    lines += side_by_side(matrix_lines("x (4x4)", X), matrix_lines(
        f"'same', padding (top, bottom, left, right) = {pads}:  y", yp[0, 0]))
    return code(lines)


def batchnorm_example():
    from numba_cnn.network.layers.batchnorm import BatchNorm2D

    eps = BatchNorm2D().epsilon
    ref = reference()
    x = BN_X.reshape(1, 1, 1, 4)
    y, mean, inv_std = ref.batchnorm2d_forward(x, np.ones(1), np.zeros(1), np.zeros(1), np.ones(1), momentum=0.99,
                                               eps=eps, training=True)
    dx, dgamma, dbeta = ref.batchnorm2d_backward(BN_DY.reshape(1, 1, 1, 4), x, np.ones(1), mean, inv_std)
    return dict(eps=eps, y=y.ravel(), mean=float(mean[0]), inv_std=float(inv_std[0]), dx=dx.ravel(),
                dgamma=float(dgamma[0]), dbeta=float(dbeta[0]))


def block_batchnorm():
    e = batchnorm_example()
    lines = [f"x = [{', '.join(num(v) for v in BN_X)}]   (one channel, M = {BN_X.size} values)   gamma = 1, beta = 0, "
             f"eps = {e['eps']}",
             f"mean = {num(e['mean'])}   inv_std = 1/sqrt(var + eps) = {num(e['inv_std'])}",
             "x_hat = y = [" + ", ".join(num(v) for v in e["y"]) + "]", "",
             f"dy = [{', '.join(num(v) for v in BN_DY)}]     (the loss depends on the first output only)",
             f"dbeta = sum(dy) = {num(e['dbeta'])}   dgamma = sum(dy * x_hat) = {num(e['dgamma'])}",
             "dx = [" + ", ".join(num(v) for v in e["dx"]) + "]",
             f"sum(dx) = {num(abs(e['dx'].sum()), 6)}   sum(dx * x_hat) = {num(abs((e['dx'] * e['y']).sum()), 6)}"]
    return code(lines)


# ---------------------------------------------------------------- the tiles, imported from the code


@lru_cache(maxsize=None)
def tile_constants(bits):
    """tiles.py's constants when the tiles are sized for a `bits`-wide register file (NUMBA_CNN_TILE_BITS, the
    override _numba_ext reads), imported in a fresh interpreter."""
    script = ("import json; from numba_cnn.kernels import _numba_ext as e; from numba_cnn.kernels.jit import tiles "
              "as t, columns as c; print(json.dumps({'bits': e.TILE_BITS, 'registers': e.TILE_REGISTERS, "
              "'CONV_TILE_NARROW': t.CONV_TILE_NARROW, 'CONV_TILE_WIDE': t.CONV_TILE_WIDE, "
              "'CONV_TILE_SMALL': t.CONV_TILE_SMALL, 'CONV_POOL_TILE': t.CONV_POOL_TILE, "
              "'CONV_POOL_TILE_NARROW': t.CONV_POOL_TILE_NARROW, "
              "'GRAD_LANES_NARROW': t.GRAD_LANES_NARROW, "
              "'GRAD_LANES_WIDE': t.GRAD_LANES_WIDE, 'TILE_TAPS': t.TILE_TAPS, 'CONV1_TILE': t.CONV1_TILE, "
              "'ONE_CHANNEL_LANES': t.ONE_CHANNEL_LANES, "
              "'COLUMN_LANES': c.COLUMN_LANES, 'COLUMN_TILE': c.COLUMN_TILE, 'COLUMN_TILE_SIX': c.COLUMN_TILE_SIX, "
              "'COLUMN_GRAD_TILE': c.COLUMN_GRAD_TILE, 'COLUMN_GRAD_TILE_SIX': c.COLUMN_GRAD_TILE_SIX, "
              "'WINOGRAD_TILE_WIDE': t.WINOGRAD_TILE_WIDE, 'WINOGRAD_TILE_NARROW': t.WINOGRAD_TILE_NARROW, "
              "'WINOGRAD_CHUNK': t.WINOGRAD_CHUNK}))")
    env = dict(os.environ, NUMBA_CNN_TILE_BITS=str(bits),
               PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def tile_cell(lanes, columns, bits):
    floats = lanes * columns
    reg = "ymm" if bits == 256 else "zmm"
    return f"{lanes} x {columns} = {floats} floats = **{floats * 32 // bits} {reg}**"


def block_tiles():
    avx2, avx512 = tile_constants(256), tile_constants(512)
    rows = ["| tile (in `numba_cnn/kernels/jit/tiles.py`) | used for | AVX2: lanes x columns | "
            "AVX-512: lanes x columns |", "|---|---|---|---|"]
    uses = {"CONV_TILE_WIDE": "conv forward, K > 32, where Winograd does not fit",
            "CONV_TILE_NARROW": "conv forward, K <= 32 lanes, and dx, where Winograd does not fit",
            "CONV_TILE_SMALL": "conv forward and dx, K <= 16 where the column tile does not pay (LeNet's conv2 "
                               "forward: 16 filters over 10 columns)",
            "CONV_POOL_TILE": "conv + ReLU + 2x2 pool fused where Winograd does not fit",
            "CONV_POOL_TILE_NARROW": "the same fused, K <= 32 where narrower than CONV_POOL_TILE"}
    for name, use in uses.items():
        cells = [tile_cell(*t[name], t["bits"]) for t in (avx2, avx512)]
        rows.append(f"| `{name}` | {use} | {cells[0]} | {cells[1]} |")
    cells = [f"{t['TILE_TAPS']} taps x {t['GRAD_LANES_NARROW']} / {t['GRAD_LANES_WIDE']} lanes = **"
             f"{t['TILE_TAPS'] * t['GRAD_LANES_NARROW'] * 32 // t['bits']} / "
             f"{t['TILE_TAPS'] * t['GRAD_LANES_WIDE'] * 32 // t['bits']} {'ymm' if t['bits'] == 256 else 'zmm'}**"
             for t in (avx2, avx512)]
    rows.append(f"| `TILE_TAPS` x `GRAD_LANES_NARROW` / `GRAD_LANES_WIDE` | weight gradients | {cells[0]} | "
                f"{cells[1]} |")
    cells = [f"{t['CONV1_TILE'][0]} columns x {t['CONV1_TILE'][1]} channels = **"
             f"{t['CONV1_TILE'][0] * t['CONV1_TILE'][1] * 32 // t['bits']} {'ymm' if t['bits'] == 256 else 'zmm'}**"
             for t in (avx2, avx512)]
    rows.append(f"| `CONV1_TILE` (columns, channels) | conv fused with a 2x2 pool, one input channel, not 3x3 or "
                f"K off the lanes below | {cells[0]} | {cells[1]} |")
    cells = [f"4 outputs x {t['ONE_CHANNEL_LANES']} lanes = **{4 * t['ONE_CHANNEL_LANES'] * 32 // t['bits']} "
             f"{'ymm' if t['bits'] == 256 else 'zmm'}**" for t in (avx2, avx512)]
    rows.append(f"| `ONE_CHANNEL_LANES` | conv1 fused with pool1 (one input channel, 3x3): a window's four outputs "
                f"| {cells[0]} | {cells[1]} |")
    for name, use, kind in (("COLUMN_TILE", "conv forward and dx with few channels, lanes along the output columns "
                                            "(LeNet's conv2 forward on AVX-512, VGG's conv1)", "rows"),
                            ("COLUMN_TILE_SIX", "the same where it computes less than COLUMN_TILE (LeNet's conv1 "
                                                "forward, its dx into 6 channels; on AVX2 conv2's forward)", "rows"),
                            ("COLUMN_GRAD_TILE", "weight gradients of few filters, lanes along the columns (LeNet's "
                                                 "conv2: 16)", "taps"),
                            ("COLUMN_GRAD_TILE_SIX", "the same where it computes fewer channels than COLUMN_GRAD_TILE "
                                                     "(6 filters: LeNet's conv1)", "taps")):
        cells = [f"{t[name][0]} channels x {t[name][1]} {kind} x {t['COLUMN_LANES']} lanes = **"
                 f"{t[name][0] * t[name][1] * t['COLUMN_LANES'] * 32 // t['bits']} "
                 f"{'ymm' if t['bits'] == 256 else 'zmm'}**" for t in (avx2, avx512)]
        rows.append(f"| `{name}` (in `columns.py`) | {use} | {cells[0]} | {cells[1]} |")
    for name, use in (("WINOGRAD_TILE_WIDE", "Winograd's 16 matrix products, K over the narrow tile's lanes "
                                             "(mnist-cnn's conv2 + pool2, K = 64)"),
                      ("WINOGRAD_TILE_NARROW", "the same, K up to its lanes")):
        cells = [f"{t[name][0]} tiles x {t[name][1]} lanes = **{t[name][0] * t[name][1] * 32 // t['bits']} "
                 f"{'ymm' if t['bits'] == 256 else 'zmm'}**" for t in (avx2, avx512)]
        rows.append(f"| `{name}` (tiles, lanes) | {use}; transforms {avx2['WINOGRAD_CHUNK']} / "
                    f"{avx512['WINOGRAD_CHUNK']} channels at a time | {cells[0]} | {cells[1]} |")
    rows.append(f"| register file | | {avx2['registers']} ymm of 8 floats | {avx512['registers']} zmm of 16 floats |")
    return "\n".join(rows) + "\n"


# ---------------------------------------------------------------- measurements, from docs/results.json


@lru_cache(maxsize=None)
def results():
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def ladder_steps():
    return results().get("ladder", {}).get("steps", [])


def step(key):
    for entry in ladder_steps():
        if entry["key"] == key:
            return entry
    raise KeyError(f"docs/results.json has no ladder step {key!r}: run python tools/ladder.py --write")


def ms(v):
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def gflops(v):
    return f"{v:.3f}" if v < 0.1 else f"{v:.1f}" if v < 100 else f"{v:.0f}"


def machine_line(record):
    m = record["machine"]
    return (f"{m['cpu']}, {m['cpus']} vCPUs ({m['isa']}; tiles sized for {m['tile_bits']}-bit registers), "
            f"{m['numba_threads']} Numba threads, numba {m['numba']}, numpy {m['numpy']}, {m['date']}")


def block_ladder_table():
    ladder = results()["ladder"]
    naive_ms = step("naive")["ms"]
    rows = ["| step | what changes | ms per batch of 128 | GFLOP/s | x naive |", "|---|---|---|---|---|"]
    for entry in ladder["steps"]:
        label = str(entry["step"]) if entry["rung"] else "(beside it)"
        forward = entry["flops"] == ladder["flops"]  # the backward rows do other work: no ratio to naive's forward
        ratio = f"{naive_ms / entry['ms']:,.0f}" if forward else "-"
        rows.append(f"| {label} | {entry['title']} | {ms(entry['ms'])} | {gflops(entry['gflops'])} | {ratio} |")
    notes = (f"Machine: {machine_line(ladder)}. Command: `{ladder['command'].split('  #')[0]}`. Each time is the "
             f"minimum over {ladder['rounds']} rounds of {ladder['repeats']} calls, the steps taking turns (naive: "
             f"one call a round on {ladder['naive_images']} images, scaled to 128; @njit: "
             f"{max(1, ladder['repeats'] // 2)} calls). GFLOP/s count the dense convolution's "
             f"{ladder['flops'] / 1e6:.0f} MFLOP (forward) or twice that (backward), also where a kernel skips "
             f"work.")
    return "\n".join(rows) + "\n\n" + para(notes) + "\n"


def block_ladder_summary():
    """The README's table: the rungs only."""
    rows = ["| step | conv2 forward, batch 128 | ms | GFLOP/s |", "|---|---|---|---|"]
    for entry in ladder_steps():
        if entry["rung"] and entry["key"] != "listed_backward":
            rows.append(f"| {entry['step']} | {entry['title']} | {ms(entry['ms'])} | {gflops(entry['gflops'])} |")
    listed, dense = step("listed_backward"), step("dense_backward")
    rows.append(f"| {listed['step']} | backward (dX, dW, db): listed, fused / dense | {ms(listed['ms'])} / "
                f"{ms(dense['ms'])} | {gflops(listed['gflops'])} / {gflops(dense['gflops'])} |")
    return "\n".join(rows) + "\n\n" + para(f"Measured on {machine_line(results()['ladder'])}.") + "\n"


def asm_lines(name, limit=None):
    entry = results()["ladder"]["asm"][name]
    return list(entry["excerpt"][:limit] if limit else entry["excerpt"])  # a copy: results() is cached


def block_asm_tile():
    ladder = results()["ladder"]
    tile = ladder["asm"]["tile"]
    strict = ladder["asm"]["tile_strict"]
    lines = asm_lines("tile")
    lines += ["", f"vfmadd instructions: {tile['counts']['vfmadd']} with fastmath contract "
                  f"(registers: {', '.join(tile['fma_registers'])});",
              f"{strict['counts']['vfmadd']} without, where the tile compiles to {strict['counts']['vmulps']} vmulps + "
              f"{strict['counts']['vaddps']} vaddps instead"]
    m = ladder["machine"]
    return code(lines) + "\n" + para(f"Compiled on {m['cpu']}, {m['isa']}, numba {m['numba']}, by "
                                      f"`python tools/ladder.py --write`.") + "\n"


def block_asm_small():
    a = results()["ladder"]["asm"]
    rows = ["| loop | fastmath | vfmadd | vmulps + vaddps (vector) | vmulss + vaddss (scalar) |",
            "|---|---|---|---|---|"]
    for name, loop, flags in (("axpy_strict", "`y[i] += a * x[i]`", "none"),
                              ("axpy_contract", "`y[i] += a * x[i]`", "`contract`"),
                              ("dot_strict", "`total += x[i] * y[i]`", "none"),
                              ("dot_reassoc", "`total += x[i] * y[i]`", "`contract`, `reassoc`")):
        c = a[name]["counts"]
        rows.append(f"| {loop} | {flags} | {c['vfmadd']} | {c['vmulps']} + {c['vaddps']} | "
                    f"{c['vmulss']} + {c['vaddss']} |")
    return "\n".join(rows) + "\n"


def block_asm_axpy():
    ladder = results()["ladder"]
    m = ladder["machine"]
    return code(asm_lines("axpy_contract")) + "\n" + para(f"Compiled on {m['cpu']}, {m['isa']}, numba "
                                                           f"{m['numba']}, by `python tools/ladder.py --write`.") + "\n"


def source_of(name):
    """The source of a function of tools/ladder.py, as the docs show it (a python block)."""
    import inspect

    sys.path.insert(0, str(ROOT / "tools"))
    import ladder

    return "```python\n" + inspect.getsource(getattr(ladder, name)).rstrip() + "\n```\n"


def model_flops():
    """[(layer, forward FLOPs, backward FLOPs)] per image of mnist-cnn, from each layer's multiply-add count
    (Layer.macs): 2 FLOPs per multiply-add; backward twice the forward (input and weight gradients), once for the
    first layer with parameters (no input gradient)."""
    from numba_cnn.model import default_network

    network = default_network()
    rows, first = [], True
    for layer, shape in zip(network.layers, network.shapes):
        macs = layer.macs(shape)
        if not macs:
            continue
        rows.append((layer, shape, 2 * macs, 2 * macs * (1 if first else 2)))
        first = False
    return rows


def block_flops_table():
    rows = ["| layer | forward MFLOP per image | backward MFLOP per image |", "|---|---|---|"]
    total = 0
    for layer, shape, fwd, bwd in model_flops():
        out_shape = layer.output_shape(shape)
        if len(shape) == 3:
            what = f"{shape[0]}->{out_shape[0]}, {shape[1]}x{shape[2]} -> {out_shape[1]}x{out_shape[2]}"
        else:
            what = f"{shape[0]} -> {out_shape[0]}"
        note = " (dW only)" if bwd == fwd else ""
        rows.append(f"| {layer.name} ({what}) | {fwd / 1e6:.3f} | {bwd / 1e6:.3f}{note} |")
        total += fwd + bwd
    return "\n".join(rows) + "\n"


def training_record():
    record = results().get("training")
    if record is None:
        raise KeyError("docs/results.json has no training run: run python tools/record_run.py RUN_FOLDER")
    return record


def block_training_table():
    run = training_record()
    rows = ["| epoch | test accuracy | seconds |", "|---|---|---|"]
    for i, (acc, sec) in enumerate(zip(run["test_accuracies"], run["epoch_seconds"]), 1):
        rows.append(f"| {i} | {acc * 100:.2f}% | {sec:.2f} |")
    note = (f"`{run['command']}` on {run['machine_line']}. Its warm-up loaded the compiled kernels from the disk "
            f"cache in {run['cache_load_s']:.2f} s")
    if "compile_s" in run:
        note += f"; compiling them on an empty cache took {run['compile_s']:.1f} s (`{run['compile_command']}`)"
    return "\n".join(rows) + "\n\n" + para(note + ".") + "\n"


def block_layer_table():
    run = training_record()
    rows = ["| section | forward ms per batch | backward ms per batch | other ms per batch | share of the epoch |",
            "|---|---|---|---|---|"]

    def cell(value):
        return f"{value:.2f}" if value else ""

    for entry in run["layers"]:
        rows.append(f"| {entry['name']} | {cell(entry['forward_ms'])} | {cell(entry['backward_ms'])} | "
                    f"{cell(entry.get('other_ms', 0.0))} | {entry['share'] * 100:.1f}% |")
    return "\n".join(rows) + "\n\n" + para(f"Epoch {run['layer_epoch']} (the fastest) of `{run['command']}` on "
                                           f"{run['machine_line']}. \"Other\": gathering and scaling the batch "
                                           f"(data), the Adam step (optimizer).") + "\n"


def figures():
    """Every tagged figure's text, by key."""
    out = {}
    per_image = sum(fwd + bwd for _, _, fwd, bwd in model_flops())
    conv2 = [fwd + bwd for layer, _, fwd, bwd in model_flops() if layer.name == "conv2"][0]
    out.update({"model.mflop_per_image": f"{per_image / 1e6:.2f}", "model.gflop_per_epoch": f"{per_image * 6e4 / 1e9:.0f}",
                "model.conv2_share": f"{conv2 / per_image * 100:.0f}"})
    if "ladder" in results():
        naive, fused, listed, dense = step("naive"), step("fused"), step("listed_backward"), step("dense_backward")
        njit, cl, tile, threads = step("njit"), step("channels_last"), step("tile"), step("prange")
        ladder = results()["ladder"]
        out.update({
            "ladder.naive.s_per_image": f"{naive['ms'] / 1e3 / ladder['shape']['N']:.2f}",
            "ladder.naive.s_per_batch": f"{naive['ms'] / 1e3:.0f}",
            "ladder.njit.ms": ms(njit["ms"]),
            "ladder.njit.x_naive": f"{naive['ms'] / njit['ms']:.0f}",
            "ladder.channels_last.ms": ms(cl["ms"]),
            "ladder.channels_last.x_njit": f"{njit['ms'] / cl['ms']:.1f}",
            "ladder.tile.ms": ms(tile["ms"]),
            "ladder.tile.gflops": gflops(tile["gflops"]),
            "ladder.tile.macs_per_ns": f"{tile['gflops'] / 2:.0f}",
            "ladder.tile.x_channels_last": f"{cl['ms'] / tile['ms']:.1f}",
            "ladder.tile_strict.ms": ms(step("tile_strict")["ms"]),
            "ladder.prange.ms": ms(threads["ms"]),
            "ladder.prange.x_tile": f"{tile['ms'] / threads['ms']:.2f}",
            "ladder.fused.ms": ms(fused["ms"]),
            "ladder.fused.gflops": gflops(fused["gflops"]),
            "ladder.jit_conv2d_forward.ms": ms(step("jit_conv2d_forward")["ms"]),
            "ladder.fused.x_naive": f"{naive['ms'] / fused['ms']:,.0f}",
            "ladder.listed.ms": ms(listed["ms"]),
            "ladder.dense_backward.ms": ms(dense["ms"]),
            "ladder.listed.x_dense": f"{dense['ms'] / listed['ms']:.1f}",
            "ladder.nonzero_percent": f"{ladder['nonzero_conv_gradients'] * 100:.1f}",
            "ladder.seconds": f"{ladder['seconds']:.0f}",
            "ladder.flops_m": f"{ladder['flops'] / 1e6:.0f}",
            "ladder.tile.fma_count": str(ladder["asm"]["tile"]["counts"]["vfmadd"]),
            "ladder.tile.compile_s": f"{tile['compile_s']:.1f}",
            "ladder.x_njit_to_prange": f"{njit['ms'] / threads['ms']:.0f}",
            "ladder.naive.ms_per_mac_ns": f"{naive['ms'] * 1e6 / (ladder['flops'] / 2):.0f}",
        })
        out["ladder.epoch_at_fused_s"] = f"{per_image * 6e4 / 1e9 / fused['gflops']:.1f}"
    if "training" in results():
        run = training_record()
        out.update({
            "training.test_accuracy": f"{run['test_accuracy'] * 100:.2f}",
            "training.sec_per_epoch_min": f"{min(run['epoch_seconds']):.1f}",
            "training.sec_per_epoch_max": f"{max(run['epoch_seconds']):.1f}",
            "training.epochs": str(len(run["epoch_seconds"])),
            "training.compile_s": f"{run['compile_s']:.1f}",
        })
        if "cache_load_s" in run:
            out["training.cache_load_s"] = f"{run['cache_load_s']:.2f}"
    return out


def block_compare_presets():
    """One table per network of docs/results.json's "compare" entries (tools/record_compare.py): seconds per
    epoch, inference, peak memory and own memory (the peak less what the process held with only the data loaded)
    of numba_cnn's jit against each framework setting, as the ratios the bench computed in that run."""
    entries = results().get("compare", {})
    if not entries:
        return para("No comparison recorded yet: run `python tools/record_compare.py` on a `bench --compare` "
                    "report.") + "\n"
    out = []
    from numba_cnn.network.presets import PRESETS

    order = list(PRESETS) + sorted(name for name in entries if name not in PRESETS)
    for name in (name for name in order if name in entries):
        entry = entries[name]
        out.append(f"**{name}** ({entry['layers']} layers, input {'x'.join(map(str, entry['input_shape']))}; "
                   f"`{entry['command']}`; {entry['measure']}, batch {entry['batch_size']}, "
                   f"{entry['threads']} threads, {entry['rounds']} round(s) in turn):")
        out.append("")
        out.append("| contender | s/epoch | x fastest | inference img/s | x fastest | peak MB | x PyTorch's best | "
                   "own MB | x PyTorch's best |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for c in entry["contenders"]:
            fastest, torch_best = c.get("vs_fastest_framework", {}), c.get("vs_torch_best", {})

            def ratio(table, key):
                return f"{table[key]:.2f}" if key in table else "-"

            out.append(f"| {c['contender']} | {c['sec_per_epoch']:.2f} | {ratio(fastest, 'sec_per_epoch')} | "
                       f"{c['inference_img_per_s']:,.0f} | {ratio(fastest, 'inference_img_per_s')} | "
                       f"{c['peak_rss_mb']:.0f} | {ratio(torch_best, 'peak_rss_mb')} | "
                       f"{c['own_memory_mb']:.0f} | {ratio(torch_best, 'own_memory_mb')} |")
        jit = next((c for c in entry["contenders"] if "executed_peak_share" in c), None)
        note = (f"{entry['machine']['cpu']}, {entry['machine']['isa']}, {entry['created_utc'][:10]}; sgemm peak "
                f"{entry['peak_gflops']:.0f} GFLOP/s in the run.")
        if jit is not None:
            skipped = jit["executed_flops_per_image"] < entry["training_flops_per_image"]
            why = ("fewer where a listed backward skips zeros and where Winograd's 3x3 layers multiply 36 times per "
                   "4x4 output tile and channel pair, not 144, or 16 per 2x2 tile, not 36 (its 5x5 layers 64 per 4x4 "
                   "tile, not 400, or 36 per 2x2, not 100; a 5x5 stride-2 layer as a 3x3 one over its input's four "
                   "phases)" if skipped else
                   "products with stored zeros, such as a full correlation's border, included")
            note += (f" {jit['contender']} executed {jit['executed_flops_per_image'] / 1e6:.1f} MFLOP per training "
                     f"image against the dense count's {entry['training_flops_per_image'] / 1e6:.1f} ({why}): "
                     f"{100 * jit['executed_peak_share']:.0f}% of that peak on executed work.")
        out.append("")
        out.append(para(note))
        out.append("")
    return "\n".join(out)


BLOCKS = {
    "compare-presets": block_compare_presets,
    "conv-forward": block_conv_forward,
    "conv-backward": block_conv_backward,
    "im2col": block_im2col,
    "col2im": block_col2im,
    "pool": block_pool,
    "softmax": block_softmax,
    "chain-rule": block_chain_rule,
    "same-padding": block_same_padding,
    "strided": block_strided_example,
    "batchnorm": block_batchnorm,
    "tiles": block_tiles,
    "ladder-table": block_ladder_table,
    "ladder-summary": block_ladder_summary,
    "asm-tile": block_asm_tile,
    "asm-small": block_asm_small,
    "asm-axpy": block_asm_axpy,
    "layer-table": block_layer_table,
    "flops-table": block_flops_table,
    "training-table": block_training_table,
    "source-njit": lambda: source_of("conv_njit"),
    "source-channels-last": lambda: source_of("conv_channels_last"),
    "source-tile": lambda: source_of("make_tiled"),
}


def rendered(text, figure_values=None):
    """`text` with every generated block and tagged figure replaced by what this script computes now."""
    figure_values = figures() if figure_values is None else figure_values

    def block(match):
        key = match.group(2)
        if key not in BLOCKS:
            raise KeyError(f"unknown generated block {key!r}")
        return match.group(1) + BLOCKS[key]() + match.group(4)

    def figure(match):
        key = match.group(2)
        if key not in figure_values:
            raise KeyError(f"unknown figure {key!r}")
        return figure_values[key] + f"<!--fig:{key}-->"

    return FIGURE_RE.sub(figure, BLOCK_RE.sub(block, text))


def stale_pages():
    """[(page, [what differs])] for every page whose computed text is not what this script renders now."""
    stale = []
    values = figures()
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        new = rendered(text, values)
        if new != text:
            old_parts = dict((m.group(2), m.group(3)) for m in BLOCK_RE.finditer(text))
            new_parts = dict((m.group(2), m.group(3)) for m in BLOCK_RE.finditer(new))
            what = [f"block {key}" for key in old_parts if old_parts[key] != new_parts.get(key)]
            what += [f"figure {key}: {old} (now {values[key]})" for old, key in FIGURE_RE.findall(text)
                     if values.get(key) != old]
            stale.append((page, what))
    return stale


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if anything is stale")
    parser.add_argument("--no-pictures", action="store_true", help="only the generated text")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_pages()
        for page, what in stale:
            print(f"{page.relative_to(ROOT)}: stale: {', '.join(what) or 'text'}")
        return 1 if stale else 0
    values = figures()
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        new = rendered(text, values)
        if new != text:
            page.write_text(new, encoding="utf-8")
            print(f"updated: {page.relative_to(ROOT)}")
    if not args.no_pictures:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from doc_pictures import draw_all

        for path in draw_all(IMG):
            print(f"drawn: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

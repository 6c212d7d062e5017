"""The pictures of docs/img/, drawn from the numbers tools/make_docs.py computes with the project's own code (and
the tile shapes imported from numba_cnn/kernels/jit/tiles.py). `python tools/make_docs.py` calls draw_all."""

import os
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Circle, FancyArrowPatch, Rectangle  # noqa: E402

import make_docs as md  # noqa: E402

DPI = 100
PALETTE = ["#8ecae6", "#ffb703", "#90be6d", "#f28482", "#cdb4db", "#f6bd60", "#84a59d", "#bde0fe", "#ffafcc"]
GREY = "#eeeeee"
FORWARD = "#2a7f3f"
BACKWARD = "#c0392b"
plt.rcParams.update({"font.size": 12, "font.family": "DejaVu Sans", "svg.hashsalt": "numba_cnn",
                     "path.simplify": False})


def new_axes(width, height, x_range, y_range):
    fig = plt.figure(figsize=(width, height), dpi=DPI)
    ax = fig.add_axes([0.01, 0.01, 0.98, 0.98])
    ax.set_xlim(*x_range)
    ax.set_ylim(y_range[1], y_range[0])  # rows go down
    ax.set_aspect("equal")
    ax.axis("off")
    return fig, ax


def save(fig, path):
    fig.savefig(path, dpi=DPI, metadata={"Software": None}, bbox_inches="tight", pad_inches=0.15)  # no version or date: the same picture, the same bytes
    plt.close(fig)
    return path


def matrix(ax, a, x0, y0, colors=None, bold=None, edges=None, name=None, fontsize=14, fmt=md.num, cell=1.0):
    """Draw the 2-D array `a` with its top left corner at (x0, y0): one square per element, its value inside.
    colors[i][j] fills a square (default white), bold[i][j] makes its number bold, edges = [(i, j, h, w, colour)]
    outlines blocks. name goes above the matrix."""
    a = np.atleast_2d(a)
    rows, cols = a.shape
    for i in range(rows):
        for j in range(cols):
            face = colors[i][j] if colors is not None else "white"
            ax.add_patch(Rectangle((x0 + j * cell, y0 + i * cell), cell, cell, facecolor=face, edgecolor="#555555",
                                   linewidth=1))
            weight = "bold" if bold is not None and bold[i][j] else "normal"
            ax.text(x0 + (j + 0.5) * cell, y0 + (i + 0.5) * cell, fmt(a[i, j]), ha="center", va="center",
                    fontsize=fontsize, fontweight=weight)
    for i, j, h, w, colour in edges or ():
        ax.add_patch(Rectangle((x0 + j * cell, y0 + i * cell), w * cell, h * cell, fill=False, edgecolor=colour,
                               linewidth=3.5))
    if name:
        ax.text(x0 + cols * cell / 2, y0 - 0.35, name, ha="center", va="bottom", fontsize=fontsize)


def fill(shape, colour=None):
    return [[colour or "white"] * shape[1] for _ in range(shape[0])]


def conv_forward(path):
    e = md.conv_example()
    fig, ax = new_axes(12, 7.6, (-0.5, 15.5), (-1.4, 12.4))
    for row, (i, j) in enumerate(((0, 0), (1, 2))):
        top = row * 6.4
        colour = PALETTE[row]
        xc = fill((4, 4))
        for r in range(2):
            for s in range(2):
                xc[i + r][j + s] = colour
        matrix(ax, e["x"], 0, top, colors=xc, edges=[(i, j, 2, 2, "#333333")], name="input x (4x4)")
        ax.text(4.75, top + 2, "\u2605", ha="center", va="center", fontsize=22)  # correlate
        matrix(ax, e["w"], 5.5, top + 1, colors=fill((2, 2), colour), name="kernel w (2x2)")
        ax.text(8.3, top + 2, f"+ b = {md.num(e['b'])}", ha="left", va="center", fontsize=15)
        ax.text(11.0, top + 2, "=", ha="center", va="center", fontsize=22)
        yc = fill((3, 3))
        yc[i][j] = colour
        matrix(ax, e["y"], 12, top + 0.5, colors=yc, edges=[(i, j, 1, 1, "#333333")], name="output y (3x3)")
        terms = " + ".join(md.term(e["x"][i + r, j + s], e["w"][r, s]) for r in range(2) for s in range(2))
        ax.text(0, top + 4.9, f"y[{i},{j}] = {terms} + {md.num(e['b'])} = {md.num(e['y'][i, j])}", ha="left",
                va="center", fontsize=14, color="#222222")
    ax.text(15.4, 12.2, "\u2605: slide w over x, multiply the overlapping numbers, add them up",
            ha="right", va="center", fontsize=11, color="#555555")
    return save(fig, path)


def conv_backward(path):
    e = md.conv_example()
    dy_pad = np.pad(e["dy"], 1)
    w_flip = e["w"][::-1, ::-1]
    dx_check = np.array([[np.sum(dy_pad[h:h + 2, w:w + 2] * w_flip) for w in range(4)] for h in range(4)])
    assert np.array_equal(dx_check, e["dx"]), "the padded correlation disagrees with the oracle's dx"
    fig, ax = new_axes(12, 8.4, (-0.5, 15.5), (-1.6, 13.4))
    # dw = x correlated with dy
    r, s = 0, 1
    colour = PALETTE[1]
    xc = fill((4, 4))
    for i in range(3):
        for j in range(3):
            xc[i + r][j + s] = colour
    matrix(ax, e["x"], 0, 0, colors=xc, edges=[(r, s, 3, 3, "#333333")], name="input x")
    ax.text(4.75, 2, "\u2605", ha="center", va="center", fontsize=22)
    matrix(ax, e["dy"], 5.5, 0.5, colors=fill((3, 3), colour), name="dy (from the layer above)")
    ax.text(9.5, 2, "=", ha="center", va="center", fontsize=22)
    dwc = fill((2, 2))
    dwc[r][s] = colour
    matrix(ax, e["dw"], 10.5, 1, colors=dwc, edges=[(r, s, 1, 1, "#333333")], name="dw")
    ax.text(13.2, 2, f"db = sum(dy)\n     = {md.num(e['db'])}", ha="left", va="center", fontsize=14)
    terms = " + ".join(md.term(e["dy"][i, j], e["x"][i + r, j + s]) for i in range(3) for j in range(3)
                       if e["dy"][i, j] != 0)
    ax.text(0, 4.8, f"dw[{r},{s}] = {terms} = {md.num(e['dw'][r, s])}   (dy slides over x)", fontsize=13,
            va="center")
    # dx = dy zero-padded, correlated with the flipped kernel
    top, h, w = 6.4, 1, 1
    colour = PALETTE[0]
    pc = fill((5, 5))
    for i in range(5):
        for j in range(5):
            if i in (0, 4) or j in (0, 4):
                pc[i][j] = GREY
    for rr in range(2):
        for ss in range(2):
            pc[h + rr][w + ss] = colour
    matrix(ax, dy_pad, 0, top, colors=pc, edges=[(h, w, 2, 2, "#333333")], name="dy, zero-padded by 1")
    ax.text(5.75, top + 2.5, "\u2605", ha="center", va="center", fontsize=22)
    matrix(ax, w_flip, 6.5, top + 1.5, colors=fill((2, 2), colour), name="w turned 180\u00b0")
    ax.text(9.5, top + 2.5, "=", ha="center", va="center", fontsize=22)
    dxc = fill((4, 4))
    dxc[h][w] = colour
    matrix(ax, e["dx"], 10.5, top + 0.5, colors=dxc, edges=[(h, w, 1, 1, "#333333")], name="dx")
    terms = " + ".join(md.term(dy_pad[h + rr, w + ss], w_flip[rr, ss]) for rr in range(2) for ss in range(2))
    ax.text(0, top + 6.0, f"dx[{h},{w}] = {terms} = {md.num(e['dx'][h, w])}   (a 'full' correlation)",
            fontsize=13, va="center")
    return save(fig, path)


def im2col(path):
    e = md.conv_example()
    _, _, cols = md.im2col_parts()
    fig, ax = new_axes(13, 6.4, (-1.2, 17.5), (-1.0, 8.6))
    shown = (0, 1, 5)  # windows outlined on x, their columns coloured alike
    edges = [(j // 3, j % 3, 2, 2, PALETTE[n]) for n, j in enumerate(shown)]
    matrix(ax, e["x"], 0, 0.5, edges=edges, name="x: three of its nine 2x2 windows")
    colors = fill((4, 9))
    for n, j in enumerate(shown):
        for t in range(4):
            colors[t][j] = PALETTE[n]
    matrix(ax, cols, 7, 0.5, colors=colors, name="cols: one column per window (output pixel)")
    for t in range(4):
        ax.text(6.8, 0.5 + t + 0.5, f"tap ({t // 2},{t % 2})", ha="right", va="center", fontsize=11)
    for j in range(9):
        ax.text(7 + j + 0.5, 4.75, f"({j // 3},{j % 3})", ha="center", va="center", fontsize=9, color="#555555")
    ax.text(16.2, 2.5, "one row\nper tap", ha="left", va="center", fontsize=11, color="#555555")
    # w row @ cols + b = y row
    matrix(ax, e["w"].reshape(1, 4), -1.0, 6.5, colors=fill((1, 4), GREY), name="w as a row")
    ax.text(3.2, 7.0, f"@ cols + {md.num(e['b'])} =", ha="left", va="center", fontsize=14)
    yc = fill((1, 9))
    for n, j in enumerate(shown):
        yc[0][j] = PALETTE[n]
    matrix(ax, e["y"].reshape(1, 9), 7, 6.5, colors=yc, name="y as a row: reshape to 3x3")
    return save(fig, path)


def pooling(path):
    e = md.pool_example()
    fig, ax = new_axes(12.5, 8.4, (-0.5, 16.5), (-1.5, 12.0))
    window_colour = [[PALETTE[(i // 2) * 2 + j // 2] for j in range(4)] for i in range(4)]
    winners = [[False] * 4 for _ in range(4)]
    for pi in range(2):
        for pj in range(2):
            where = int(e["argmax"][pi, pj])
            winners[2 * pi + where // 2][2 * pj + where % 2] = True
    outlined = [(i, j, 1, 1, "#333333") for i in range(4) for j in range(4) if winners[i][j]]
    matrix(ax, e["x"], 0, 0, colors=window_colour, bold=winners, edges=outlined,
           name="x: four 2x2 windows, winners outlined")
    small = [[PALETTE[i * 2 + j] for j in range(2)] for i in range(2)]
    ax.text(5.0, 2, "\u2192", ha="center", va="center", fontsize=26)
    matrix(ax, e["y"], 6, 1, colors=small, name="max-pool")
    matrix(ax, e["avg"], 10, 1, colors=small, name="average-pool")
    ax.text(13.0, 2, "argmax: " + ", ".join(str(int(v)) for v in e["argmax"].ravel()) + "\n(offset 2*di + dj\n"
            "of each winner)", ha="left", va="center", fontsize=11, color="#555555")
    top = 5.6
    matrix(ax, e["dy"], 0.5, top + 1, colors=small, name="dy (pooled)")
    ax.text(3.6, top + 2, "\u2192", ha="center", va="center", fontsize=26)
    routed = [[window_colour[i][j] if winners[i][j] else GREY for j in range(4)] for i in range(4)]
    matrix(ax, e["dx_max"], 4.5, top, colors=routed, name="max routes: dx")
    matrix(ax, e["dx_avg"], 10.5, top, colors=window_colour, name="average distributes: dx", fontsize=12)
    ax.text(4.5, top + 4.7, "all of dy to the winner,\n0 to the other three", ha="left", va="top", fontsize=12)
    ax.text(10.5, top + 4.7, "dy / (2*2) to each of the four", ha="left", va="top", fontsize=12)
    return save(fig, path)


def register_tile(path):
    panels = [md.tile_constants(256), md.tile_constants(512)]
    fig = plt.figure(figsize=(13, 8.0), dpi=DPI)
    for n, t in enumerate(panels):
        ax = fig.add_axes([0.01, 0.51 - n * 0.5, 0.98, 0.46])
        lanes, columns = t["CONV_TILE_WIDE"]
        width = t["bits"] // 32
        reg = "ymm" if t["bits"] == 256 else "zmm"
        per_column = lanes // width
        accumulators = per_column * columns
        scale = 16 / max(lanes, 16)  # the drawing's width of one float
        ax.set_xlim(-3.2, 35)
        ax.set_ylim(6.6, -1.6)
        ax.set_aspect("equal")
        ax.axis("off")
        name = "AVX2" if t["bits"] == 256 else "AVX-512"
        ax.text(-3.0, -1.0, f"{name}: CONV_TILE_WIDE = ({lanes} lanes, {columns} columns): {accumulators} of the "
                f"{t['registers']} {reg} registers hold the tile", fontsize=14, fontweight="bold", va="center")
        for jj in range(columns):
            y = jj * 1.3
            ax.text(-0.3, y + 0.5, f"column j0+{jj}", ha="right", va="center", fontsize=10)
            for v in range(per_column):
                x = v * width * scale
                ax.add_patch(Rectangle((x, y), width * scale, 1, facecolor=PALETTE[(jj * per_column + v) % 9],
                                       edgecolor="#333333", linewidth=1.5))
                ax.text(x + width * scale / 2, y + 0.5, f"{reg}{jj * per_column + v}: k {v * width}-"
                        f"{v * width + width - 1}", ha="center", va="center", fontsize=9.5)
        ax.text(0, columns * 1.3 + 0.2, f"each box: one {t['bits']}-bit register, {width} float32: {width} output "
                f"channels of one output column", fontsize=11, va="top")
        ax.text(0, columns * 1.3 + 1.0, f"one step of the 288-term reduction: broadcast x[j0+jj, c] to a register, "
                f"then acc += x * w[r, s, c, lanes]:\n{accumulators} FMAs for {columns} inputs and {per_column} "
                f"weight vectors read", fontsize=11, va="top")
        left = 18.5
        ax.text(left, -0.15, f"the register file: {t['registers']} {reg}", fontsize=11, va="bottom")
        for r in range(t["registers"]):
            x, y = left + (r % 16) * 1.0, 0.2 + (r // 16) * 1.1
            used = r < accumulators
            ax.add_patch(Rectangle((x, y), 0.9, 0.9, facecolor=PALETTE[(r % 9)] if used else "white",
                                   edgecolor="#333333"))
            ax.text(x + 0.45, y + 0.45, str(r), ha="center", va="center", fontsize=8)
        free = t["registers"] - accumulators
        ax.text(left, 0.2 + ((t["registers"] - 1) // 16 + 1) * 1.1 + 0.3,
                f"coloured: the {accumulators} accumulators; white: {free} left for the\nbroadcast input, "
                f"weights and addresses. A tile needing more\nthan {t['registers']} spills to the stack "
                f"(register numbers: illustrative)", fontsize=10.5, va="top")
    return save(fig, path)


def chain_rule(path):
    e = md.chain_example()
    fig, ax = new_axes(13, 5.6, (-0.8, 15.6), (-0.6, 5.6))
    nodes = {"x": (0.3, 0.1), "w": (0.3, 3.9), "mul": (3.8, 2.0), "b": (4.4, 4.7), "add": (7.0, 2.6),
             "relu": (10.0, 2.6), "loss": (13.0, 2.6)}
    labels = {"mul": "*", "add": "+", "relu": "relu", "loss": "(a-t)\u00b2"}
    for key, (x, y) in nodes.items():
        if key in labels:
            ax.add_patch(Circle((x, y), 0.62, facecolor="#f4f1de", edgecolor="#333333", linewidth=1.5))
            ax.text(x, y, labels[key], ha="center", va="center", fontsize=13)
        else:
            ax.text(x, y, key, ha="center", va="center", fontsize=16, fontweight="bold")
    edges = [("x", "mul", e["x"], e["dx"]), ("w", "mul", e["w"], e["dw"]), ("mul", "add", e["u"], e["du"]),
             ("b", "add", e["b"], e["db"]), ("add", "relu", e["z"], e["dz"]), ("relu", "loss", e["a"], e["da"])]
    for start, end, value, grad in edges:
        (x0, y0), (x1, y1) = nodes[start], nodes[end]
        ax.add_patch(FancyArrowPatch((x0 + 0.35, y0), (x1 - 0.65, y1), arrowstyle="-|>", mutation_scale=18,
                                     color="#333333", linewidth=1.5))
        mx, my = (x0 + x1) / 2, (y0 + y1) / 2
        ax.text(mx, my - 0.28, md.num(value), ha="center", va="bottom", fontsize=14, color=FORWARD,
                fontweight="bold")
        ax.text(mx, my + 0.28, md.num(grad), ha="center", va="top", fontsize=14, color=BACKWARD, fontweight="bold")
    x, y = nodes["loss"]
    ax.text(x + 0.8, y - 0.3, f"L = {md.num(e['loss'])}", color=FORWARD, fontsize=14, fontweight="bold", va="bottom")
    ax.text(x + 0.8, y + 0.3, "dL/dL = 1", color=BACKWARD, fontsize=14, fontweight="bold", va="top")
    ax.text(-0.6, 5.45, f"green: forward values (t = {md.num(e['t'])});  red: dL/d(that value), from right to left. "
            "At each node: gradient in = gradient out x local derivative.", fontsize=11, va="center")
    return save(fig, path)


def ladder(path):
    steps = md.ladder_steps()
    ladder_record = md.results()["ladder"]
    fig = plt.figure(figsize=(11, 5.6), dpi=DPI)
    ax = fig.add_axes([0.36, 0.13, 0.6, 0.78])
    labels, values, colours = [], [], []
    for entry in steps:
        labels.append((f"{entry['step']}. " if entry["rung"] else "   ") + entry["title"])
        values.append(entry["ms"])
        colours.append(PALETTE[0] if entry["rung"] else GREY)
    y = np.arange(len(steps))
    ax.barh(y, values, color=colours, edgecolor="#333333")
    ax.set_xscale("log")
    ax.set_yticks(y, labels, fontsize=10)
    ax.invert_yaxis()
    ax.set_xlabel("ms per batch of 128 (log scale; shorter is faster)")
    for yy, entry in zip(y, steps):
        ax.text(entry["ms"] * 1.15, yy, f"{md.ms(entry['ms'])} ms, {md.gflops(entry['gflops'])} GFLOP/s",
                va="center", fontsize=9)
    ax.set_xlim(min(values) / 2, max(values) * 40)
    m = ladder_record["machine"]
    ax.set_title(f"conv2 (32->64 channels, 3x3, 13x13), batch 128: {m['cpu']}, {m['numba_threads']} threads",
                 fontsize=11)
    return save(fig, path)


PICTURES = {"conv_forward.png": conv_forward, "conv_backward.png": conv_backward, "im2col.png": im2col,
            "pooling.png": pooling, "register_tile.png": register_tile, "chain_rule.png": chain_rule,
            "ladder.png": ladder}


def draw_all(folder):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [draw(folder / name) for name, draw in PICTURES.items()]

"""Pictures of training: runs' curves and where their time went (one run, or several on one figure), and a grid of
misclassified test images. Every picture here and in the bench goes through pyplot() and save_png(): matplotlib's
non-interactive Agg backend, files written whole or not at all; nothing needs a screen.
"""

import numpy as np

from numba_cnn.atomic import atomic_write

DPI = 110
MISCLASSIFIED_SHOWN = 36


def pyplot():
    """matplotlib.pyplot on the Agg backend (draws into files only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path):
    """Write `fig` to `path` as PNG (atomically: a reader never sees half a file) and free it."""
    plt = pyplot()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
    finally:
        plt.close(fig)


def layer_shares(epochs):
    """{layer: share of the training time} over all `epochs` (metrics.json's history), in network order."""
    total = sum(e["seconds"] for e in epochs)
    shares = {}
    for epoch in epochs:
        for row in epoch["layers"]:
            shares[row["layer"]] = shares.get(row["layer"], 0.0) + row["seconds"] / total
    return shares


def plot_runs(runs, path, title):
    """One figure for `runs`, a list of (label, epochs) with epochs as in metrics.json: training loss, train and
    test accuracy, seconds per epoch, and the share of the training time each layer took; one colour per run."""
    plt = pyplot()
    fig, ((ax_loss, ax_acc), (ax_time, ax_layers)) = plt.subplots(2, 2, figsize=(12, 8.5), layout="constrained")
    for i, (label, epochs) in enumerate(runs):
        x = [e["epoch"] for e in epochs]
        colour = f"C{i}"
        ax_loss.plot(x, [e["train_loss"] for e in epochs], "o-", color=colour, label=label)
        ax_acc.plot(x, [100 * e["test_accuracy"] for e in epochs], "o-", color=colour)
        ax_acc.plot(x, [100 * e["train_accuracy"] for e in epochs], "x--", color=colour)
        ax_time.plot(x, [e["seconds"] for e in epochs], "o-", color=colour)
    ax_loss.set(title="training loss (mean over the epoch)", xlabel="epoch", ylabel="cross-entropy loss")
    ax_loss.legend(fontsize=8, title="run")
    ax_acc.set(title="accuracy", xlabel="epoch", ylabel="accuracy (%)")
    ax_acc.plot([], [], "ko-", label="test (after the epoch)")
    ax_acc.plot([], [], "kx--", label="train (during the epoch)")
    ax_acc.legend(fontsize=9, loc="lower right")
    seconds = [e["seconds"] for _, epochs in runs for e in epochs]
    ax_time.set(title="training time per epoch (evaluation not included)", xlabel="epoch", ylabel="seconds")
    if max(seconds) > 20 * min(seconds):  # runs orders of magnitude apart (naive and jit, say)
        ax_time.set_yscale("log")
        ax_time.set_ylabel("seconds (log scale)")
    else:
        ax_time.set_ylim(0, 1.1 * max(seconds))
    numbers = sorted({e["epoch"] for _, epochs in runs for e in epochs})
    for ax in (ax_loss, ax_acc, ax_time):
        ax.set_xlim(numbers[0] - 0.5, numbers[-1] + 0.5)  # room around a single epoch's points too
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
    _plot_layer_shares(ax_layers, [(label, layer_shares(epochs)) for label, epochs in runs if epochs])
    fig.suptitle(title, fontsize=11)
    save_png(fig, path)


def _plot_layer_shares(ax, runs):
    """Horizontal bars: one group per layer, one bar per run, the share of training time in percent."""
    layers = list(dict.fromkeys(layer for _, shares in runs for layer in shares))
    height = 0.8 / max(1, len(runs))
    for i, (_, shares) in enumerate(runs):
        ys = [j + (i - (len(runs) - 1) / 2) * height for j in range(len(layers))]
        values = [100 * shares.get(layer, 0.0) for layer in layers]
        bars = ax.barh(ys, values, height=height, color=f"C{i}")
        ax.bar_label(bars, fmt="%.1f%%", fontsize=7, padding=2)
    ax.set_yticks(range(len(layers)), layers)
    ax.invert_yaxis()
    ax.set(title="share of training time per layer (all epochs)", xlabel="% of training time")
    ax.set_xlim(0, 1.15 * max([100 * v for _, shares in runs for v in shares.values()] or [1]))
    ax.grid(axis="x", alpha=0.3)


def plot_misclassified(images, labels, predictions, class_names, path, count=MISCLASSIFIED_SHOWN, columns=6):
    """The first `count` test images the model got wrong, each titled with its true and predicted class; images
    (N, C, H, W) with C 1 (drawn grey) or 3 (drawn in colour), or (N, H, W) grey, uint8 or scaled to [0, 1];
    -> (images shown, images misclassified)."""
    plt = pyplot()
    wrong = np.flatnonzero(np.asarray(predictions) != np.asarray(labels))
    shown = wrong[:count]
    rows = max(1, -(-len(shown) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.7 * columns, 2.0 * rows + 0.6), squeeze=False,
                             layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, index in zip(axes.flat, shown):
        picture, colour_map = _picture(images[index])
        ax.imshow(picture, cmap=colour_map)
        ax.set_title(f"#{index} true {class_names[labels[index]]}\npred {class_names[predictions[index]]}",
                     fontsize=8)
    total = len(labels)
    if len(shown):
        what = (f"the first {len(shown)} of {len(wrong)} misclassified test images (of {total}): "
                f"#index in the test set, true and predicted class")
    else:
        what = f"no misclassified images among {total} test images"
    fig.suptitle(what, fontsize=10)
    save_png(fig, path)
    return len(shown), len(wrong)


def _picture(image):
    """imshow's arguments for one image: (H, W) with the gray_r colour map for grey, (H, W, 3) for colour."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[0] == 1:
        image = image[0]
    if image.ndim == 2:
        return image, "gray_r"
    if image.ndim == 3 and image.shape[0] == 3:
        return image.transpose(1, 2, 0), None
    raise ValueError(f"cannot draw an image of shape {image.shape}: expected (C, H, W) with C 1 or 3, or (H, W)")

"""How long a training run will take, said before it starts when that is out of proportion.

After the warm-up (train.py), a run whose estimate exceeds LONG_RUN_S prints one line with the estimate and the
--limit that would take about SUGGESTED_RUN_S. It neither asks nor refuses: CI has no stdin, and a long run may be
what the user wants. The estimate is images x epochs x seconds per image, for training and for the evaluation after
each epoch. The warm-up's seconds include compiling (jit) and first touches, so they only screen: a run they put
under the bound is under it; above it, one more pass, now compiled, is timed and gives the estimate.
"""

import math
import time
from dataclasses import dataclass

LONG_RUN_S = 30 * 60
SUGGESTED_RUN_S = 5 * 60


@dataclass(frozen=True)
class RunSize:
    train_images: int
    test_images: int
    epochs: int
    test_limited: bool  # --test-limit given: --limit does not shrink the test set


def run_seconds(size, train_s_per_image, test_s_per_image):
    return size.epochs * (size.train_images * train_s_per_image + size.test_images * test_s_per_image)


def suggestion(seconds, size, train_s_per_image, test_s_per_image):
    """-> (flags, the RunSize they give) for a run of about `seconds`: --limit N trains on N images and tests on N;
    with --test-limit given, --limit alone where the test images leave room for training, else both flags."""
    per_epoch = seconds / size.epochs
    test_s = size.test_images * test_s_per_image
    if size.test_limited and test_s <= per_epoch / 2:
        n = max(1, _round_down((per_epoch - test_s) / train_s_per_image))
        return f"--limit {n}", RunSize(min(n, size.train_images), size.test_images, size.epochs, True)
    n = max(1, _round_down(per_epoch / (train_s_per_image + test_s_per_image)))
    flags = f"--limit {n} --test-limit {n}" if size.test_limited else f"--limit {n}"
    return flags, RunSize(min(n, size.train_images), min(n, size.test_images), size.epochs, size.test_limited)


def _round_down(n):
    """n rounded down to two significant figures (a limit to type, not to read as precise)."""
    if n < 100:
        return int(n)
    scale = 10 ** (int(math.log10(n)) - 1)
    return int(n // scale * scale)


def format_duration(seconds):
    """1 d 4 h, 3 h 12 min, 7 min, 42 s."""
    minutes, hours, days = seconds / 60, seconds / 3600, seconds / 86400
    if days >= 1:
        return f"{int(days)} d {int(hours % 24)} h"
    if hours >= 1:
        return f"{int(hours)} h {int(minutes % 60)} min"
    if minutes >= 1:
        return f"{round(minutes)} min"
    return f"{seconds:.0f} s"


def time_per_image(model, x_train, y_train, x_test, dropout_rng):
    """Seconds per image of a training pass (forward and backward, no update) on x_train and of inference on
    x_test, both already on the model's device and scaled."""
    sync = model.backend.synchronize or (lambda: None)
    start = time.perf_counter()
    model.forward_backward(x_train, y_train, dropout_rng)
    sync()
    middle = time.perf_counter()
    model.predict(x_test)
    sync()
    return (middle - start) / len(x_train), (time.perf_counter() - middle) / len(x_test)


def long_run_note(size, backend, warmup_s_per_image, measure):
    """The line to print when the run is expected to exceed LONG_RUN_S, else None.

    warmup_s_per_image: the warm-up's seconds (training and inference pass together) per image, an upper bound on
    either; measure(): -> (train, test) seconds per image from a pass after the warm-up (time_per_image), called
    only when the upper bound is over LONG_RUN_S."""
    if run_seconds(size, warmup_s_per_image, warmup_s_per_image) <= LONG_RUN_S:
        return None
    train_s, test_s = measure()
    total = run_seconds(size, train_s, test_s)
    if total <= LONG_RUN_S:
        return None
    flags, smaller = suggestion(SUGGESTED_RUN_S, size, train_s, test_s)
    return (f"note: this run will take about {format_duration(total)} ({size.epochs} epoch(s) of "
            f"{size.train_images} training and {size.test_images} test images with --backend {backend}: "
            f"{train_s:.3g} s per training image, {test_s:.3g} s per test image); {flags} would take about "
            f"{format_duration(run_seconds(smaller, train_s, test_s))}")

"""LayerTimer: wall seconds of every layer's forward and backward pass, aggregated per epoch.

The model wraps each layer in `timer.section(layer, phase)`; the trainer wraps the loss, the optimizer step and
data preparation the same way. A section costs two perf_counter() calls and a dict update, microseconds against
the milliseconds of a layer, so the timer's overhead is a negligible share of an epoch.
"""

import time
from contextlib import contextmanager


class LayerTimer:
    def __init__(self, sync=None):
        # sync: called before each clock read when kernels run asynchronously (cuda), so time lands on its layer.
        self._sync = sync
        self.seconds = {}  # (layer, phase) -> seconds since reset()
        self.calls = {}
        self.order = []  # first-seen order of (layer, phase), so tables follow the network
        self.on_enter = None  # called with (layer, phase) as a section starts (the progress bar shows it)

    def reset(self):
        self.seconds = {}
        self.calls = {}

    @contextmanager
    def section(self, layer, phase):
        key = (layer, phase)
        if self.on_enter is not None:
            self.on_enter(layer, phase)
        if self._sync:
            self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                self._sync()
            elapsed = time.perf_counter() - start
            if key not in self.seconds:
                self.seconds[key] = 0.0
                self.calls[key] = 0
                if key not in self.order:
                    self.order.append(key)
            self.seconds[key] += elapsed
            self.calls[key] += 1

    def table(self, epoch_seconds):
        """Rows {layer, forward_ms, backward_ms, other_ms, seconds, share} in network order, per call in ms
        (forward/backward/other per batch), seconds summed over the epoch, share of epoch_seconds."""
        rows = {}
        for layer, phase in self.order:
            if (layer, phase) not in self.seconds:
                continue
            row = rows.setdefault(layer, {"layer": layer, "forward_ms": 0.0, "backward_ms": 0.0, "other_ms": 0.0,
                                          "seconds": 0.0, "calls": 0})
            total = self.seconds[(layer, phase)]
            calls = self.calls[(layer, phase)]
            column = {"forward": "forward_ms", "backward": "backward_ms"}.get(phase, "other_ms")
            row[column] += 1000.0 * total / calls
            row["seconds"] += total
            row["calls"] = max(row["calls"], calls)
        out = list(rows.values())
        for row in out:
            row["share"] = row["seconds"] / epoch_seconds if epoch_seconds > 0 else 0.0
        return out


def format_table(rows, epoch_seconds):
    lines = [f"{'layer':<12}{'fwd ms/batch':>14}{'bwd ms/batch':>14}{'other ms':>10}{'seconds':>10}{'share':>8}"]
    for row in rows:
        lines.append(f"{row['layer']:<12}{row['forward_ms']:>14.2f}{row['backward_ms']:>14.2f}{row['other_ms']:>10.2f}"
                     f"{row['seconds']:>10.2f}{100 * row['share']:>7.1f}%")
    covered = sum(row["seconds"] for row in rows)
    lines.append(f"{'timed total':<12}{'':>38}{covered:>10.2f}{100 * covered / max(epoch_seconds, 1e-12):>7.1f}%"
                 f" of {epoch_seconds:.2f} s")
    return "\n".join(lines)


class NullTimer:
    """Stands in for LayerTimer when nothing is measured (evaluation, tests)."""

    @contextmanager
    def section(self, layer, phase):
        yield

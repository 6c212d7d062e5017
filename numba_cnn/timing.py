"""LayerTimer: seconds of every layer's forward and backward pass, aggregated per epoch (wall seconds on the host;
on a GPU, seconds on the device's timeline, from events: LayerTimer's docstring).

The model wraps each layer in `timer.section(layer, phase)`; the trainer wraps the loss, the optimizer step and
data preparation the same way. A section costs two clock reads (or two event records) and a dict update,
microseconds against the milliseconds of a layer, so the timer's overhead is a negligible share of an epoch.
"""

import time
from contextlib import contextmanager


class LayerTimer:
    """Seconds per (layer, phase). Three clocks, by what runs the kernels:
    - host backends: the host clock around the section;
    - sync (a device backend without timing events, the simulator): the host clock after waiting for the device;
    - device_event (a device backend's event factory, numba-cuda's event interface): an event recorded on the
      device's stream before and after the section, read in batches (SETTLE_EVERY sections, and before a table),
      so the device is never waited for between layers. The time is on the device's timeline: a layer's kernels
      plus any gap in which the device waited for the host to launch them."""

    SETTLE_EVERY = 512

    def __init__(self, sync=None, device_event=None):
        self._sync = None if device_event is not None else sync
        self._new_event = device_event
        self._spare_events = []
        self._pending = []  # (key, start event, end event) recorded and not yet read
        self.seconds = {}  # (layer, phase) -> seconds since reset()
        self.calls = {}
        self.order = []  # first-seen order of (layer, phase), so tables follow the network
        self.on_enter = None  # called with (layer, phase) as a section starts (the progress bar shows it)

    def reset(self):
        self._settle()
        self.seconds = {}
        self.calls = {}

    def _record(self):
        event = self._spare_events.pop() if self._spare_events else self._new_event()
        event.record()
        return event

    def _add(self, key, elapsed):
        if key not in self.seconds:
            self.seconds[key] = 0.0
            self.calls[key] = 0
            if key not in self.order:
                self.order.append(key)
        self.seconds[key] += elapsed
        self.calls[key] += 1

    def _settle(self):
        """Read the pending events' times (waiting for the last one) and give the events back for reuse."""
        if not self._pending:
            return
        self._pending[-1][2].synchronize()
        for key, start, end in self._pending:
            self._add(key, start.elapsed_time(end) / 1000.0)
            self._spare_events += (start, end)
        self._pending = []

    @contextmanager
    def section(self, layer, phase):
        key = (layer, phase)
        if self.on_enter is not None:
            self.on_enter(layer, phase)
        if self._new_event is not None:
            start = self._record()
            try:
                yield
            finally:
                self._pending.append((key, start, self._record()))
                if len(self._pending) >= self.SETTLE_EVERY:
                    self._settle()
            return
        if self._sync:
            self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                self._sync()
            self._add(key, time.perf_counter() - start)

    def table(self, epoch_seconds):
        """Rows {layer, forward_ms, backward_ms, other_ms, seconds, share} in network order, per call in ms
        (forward/backward/other per batch), seconds summed over the epoch, share of epoch_seconds."""
        self._settle()
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

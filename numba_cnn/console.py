"""The terminal side of a training run: the progress line and Ctrl-C handling."""

import os
import signal
import sys
import threading
import time

EXIT_INTERRUPTED = 130


def format_clock(seconds):
    """Seconds as m:ss, or h:mm:ss from an hour on (as Keras writes its ETA)."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """One line per epoch that redraws itself on a terminal; elsewhere a plain line every tenth of the epoch.

    Like Keras's, it shows images per second and the time left in the epoch (from the steps made so far; a resumed
    epoch counts from where it resumed), then the time the epoch took; on a terminal also the layer it is in."""

    def __init__(self, total, label, stream=sys.stderr):
        self.total, self.label, self.stream = total, label, stream
        self.tty = stream.isatty()
        self.start = time.perf_counter()
        self.last_draw = 0.0
        self.last_tenth = -1
        self.phase = ""
        self.done, self.stats = 0, ""
        self.steps, self.images = 0, 0  # made since this line started

    def set_phase(self, layer, phase):
        self.phase = f"{layer} {phase}"
        self._draw(self.done, self.stats, force=False)

    def update(self, done, loss, accuracy, images):
        """done: steps of the epoch finished; images: in the step just made."""
        self.done = done
        self.steps += 1
        self.images += images
        self.stats = f"loss {loss:.4f} acc {accuracy:.4f}"
        self._draw(done, self.stats, force=done == self.total)

    def _speed(self, elapsed):
        """'1234 img/s | ETA 0:42' while the epoch runs, '1234 img/s | 0:56' (its length) at its end."""
        rate = f"{self.images / elapsed:.0f} img/s" if self.steps and elapsed > 0 else "- img/s"
        if self.done == self.total:
            return f"{rate} | {format_clock(elapsed)}"
        left = (self.total - self.done) * elapsed / self.steps if self.steps else None
        return f"{rate} | ETA {format_clock(left) if left is not None else '-'}"

    def _draw(self, done, stats, force):
        now = time.perf_counter()
        elapsed = now - self.start
        if self.tty:
            if not force and now - self.last_draw < 0.2:
                return
            width = 24
            filled = int(width * done / self.total)
            bar = "#" * filled + "." * (width - filled)
            phase = f" | {self.phase}" if self.phase and done < self.total else ""
            stats = f" {stats}" if stats else ""  # none before the first step ends
            self.stream.write(f"\r{self.label} [{bar}] {done}/{self.total}{stats} | {self._speed(elapsed)}{phase}"
                              f"\x1b[K")
            if done == self.total:
                self.stream.write("\n")
            self.stream.flush()
            self.last_draw = now
        else:
            tenth = 10 * done // self.total
            if tenth > self.last_tenth and done > 0:
                self.last_tenth = tenth
                self.stream.write(f"{self.label} {done}/{self.total} {stats} | {self._speed(elapsed)}\n")
                self.stream.flush()


class InterruptFlag:
    """First SIGINT: finish the current step, checkpoint, stop. Second SIGINT: leave at once (checkpoints are
    written by rename, so even a write cut short leaves the previous one whole)."""

    def __init__(self):
        self.set = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame):
        if self.set:
            sys.stderr.write("\nsecond Ctrl-C: exiting now\n")
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)
        self.set = True
        sys.stderr.write("\nCtrl-C: stopping after this step and writing a checkpoint (Ctrl-C again to quit now)\n")
        sys.stderr.flush()

"""When a training run has diverged: the loss is NaN or infinite, or it has exploded by orders of magnitude over its
running value. The trainer asks `DivergenceMonitor.check(loss)` once per step, before the optimizer step, and stops
(exit 3, no checkpoint written after that step) when it answers with a message.

The rule, with its numbers:
    running  = an exponential moving average of the step losses (weight RUNNING_WEIGHT on the newest);
    baseline = the lowest running value so far (the first loss until then);
    diverged when the loss is not finite, or when loss > max(FACTOR * baseline, FLOOR).

Why a baseline that only falls: a loss that doubles every step drags a moving average along with it and is never
100 times it, but it is soon 100 times the best the run has done. Why the FLOOR: late in a healthy run the running
loss is a few hundredths and single batches of 0.3-0.5 happen (10-20 times the baseline); a ten-class softmax that
knows nothing scores ln(10) = 2.30, so a batch loss above 10 * ln(10) = 23 means logits off by tens of nats on
average, which no healthy run shows.

Healthy MNIST runs stay an order of magnitude below both limits (their largest ratio to the baseline is in single
digits, and no batch loss comes near the floor), a run with too large a learning rate that recovers is not stopped,
and one that blows up stops within its first steps; docs/commands.md has the runs' figures.
"""

import math

FACTOR = 100.0
FLOOR = 10 * math.log(10)  # 23.0: ten times the loss of a uniform ten-class guess
RUNNING_WEIGHT = 0.1


class DivergenceMonitor:
    """Watches the step losses of one run. `enabled=False` (--no-divergence-stop) still watches and reports the
    first divergence once, through `check`'s second return value, but never asks the trainer to stop."""

    def __init__(self, enabled=True, state=None):
        self.enabled = enabled
        self.running = None  # the moving average of the losses so far
        self.baseline = None  # its lowest value so far
        self.max_ratio = 0.0  # the largest loss / baseline seen (the metrics record it: how close a run came)
        self.reported = False
        if state:
            self.running, self.baseline = state.get("running"), state.get("baseline")
            self.max_ratio = float(state.get("max_ratio", 0.0))

    def state_dict(self):
        """JSON-serialisable, so that a resumed run judges its losses as the straight run would have."""
        return {"running": self.running, "baseline": self.baseline, "max_ratio": self.max_ratio}

    def threshold(self):
        """The largest loss the next step may show without counting as diverged (inf before the first loss)."""
        return math.inf if self.baseline is None else max(FACTOR * self.baseline, FLOOR)

    def check(self, loss):
        """-> (stop, reason): reason is None for a healthy loss, else a sentence naming what happened (to which
        the trainer adds where and what was kept). stop is reason is not None and the monitor is enabled. A healthy
        loss updates the running value; a diverged one leaves it as it was."""
        loss = float(loss)
        reason = None
        if not math.isfinite(loss):
            was = "" if self.running is None else f" (its running value was {self.running:.3g})"
            reason = f"the loss is {loss}{was}"
        elif loss > self.threshold():
            reason = f"the loss grew from {self.baseline:.3g} to {loss:.3g}"
        if reason is not None:
            first, self.reported = not self.reported, True
            return self.enabled, (reason if self.enabled or first else None)
        if self.baseline is not None and self.baseline > 0:
            self.max_ratio = max(self.max_ratio, loss / self.baseline)
        self.running = loss if self.running is None else self.running + RUNNING_WEIGHT * (loss - self.running)
        self.baseline = self.running if self.baseline is None else min(self.baseline, self.running)
        return False, None


def stop_message(reason, epoch, step, checkpoint_path, stopping=True):
    """The one line the trainer logs: what happened, where, what to do and which checkpoint is kept."""
    where = f"epoch {epoch + 1}, step {step + 1}"
    if not stopping:
        return f"warning: training diverged at {where}: {reason}; going on (--no-divergence-stop)"
    kept = (f"the last good checkpoint is {checkpoint_path}" if checkpoint_path.exists()
            else "no checkpoint was written yet")
    return f"training diverged at {where}: {reason}: lower --lr ({kept})"

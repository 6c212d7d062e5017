"""The divergence stop (numba_cnn/divergence.py): the rule on loss sequences written out by hand, and the CLI on a run
that explodes without ever turning NaN (`train --lr 1e6`): one clear line, exit 3, the checkpoint from before the
diverged step left as it was; `--no-divergence-stop` lets it burn."""

import math

import numpy as np
import pytest

from numba_cnn import checkpoint as ckpt
from numba_cnn.divergence import FACTOR, FLOOR, DivergenceMonitor
from test_train_cli import npz_path, run_cli  # noqa: F401 (npz_path: the fixture)


def feed(monitor, losses):
    """-> the index of the first loss the monitor stops at (None if none) and the reasons it gave."""
    reasons = []
    for i, loss in enumerate(losses):
        stop, reason = monitor.check(loss)
        if reason is not None:
            reasons.append(reason)
        if stop:
            return i, reasons
    return None, reasons


def healthy_losses(steps=2000, seed=0):
    """A loss curve shaped like MNIST training's: 2.3 falling to a few hundredths, with batch-to-batch noise and
    a spike to 1.5 late in the run (30-75 times the running loss), which must not count as divergence."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    losses = 0.03 + 2.27 * np.exp(-t / 60) + 0.1 * np.exp(-t / 300) * rng.random(steps)
    losses *= rng.lognormal(0, 0.4, steps)
    losses[3 * steps // 4] = 1.5
    return losses


def test_healthy_curve_never_trips_the_stop():
    monitor = DivergenceMonitor()
    assert feed(monitor, healthy_losses()) == (None, [])
    assert monitor.max_ratio > 10  # the spike came close to a factor rule without a floor, not to this one


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_stops(bad):
    index, reasons = feed(DivergenceMonitor(), [2.3, 2.1, bad, 1.0])
    assert index == 2 and reasons == [f"the loss is {bad} (its running value was 2.28)"]


def test_explosion_stops_with_from_and_to():
    index, reasons = feed(DivergenceMonitor(), [2.30, 2.29, 1.7e21])
    assert index == 2 and reasons == ["the loss grew from 2.3 to 1.7e+21"]


def test_steady_doubling_is_caught_although_the_running_value_follows_it():
    """A loss that doubles each step drags its moving average along; the baseline (the lowest running value) does
    not move, so the stop fires once the loss passes FACTOR times it."""
    losses = [2.3 * 2 ** k for k in range(30)]
    index, _ = feed(DivergenceMonitor(), losses)
    assert index is not None and losses[index] > FACTOR * 2.3 and losses[index - 1] <= FACTOR * 2.3 * 1.0001


def test_the_floor_spares_late_spikes():
    """Late in a run the baseline is tiny: a batch loss of 20 is 1000 times 0.02 but below the floor of 23."""
    monitor = DivergenceMonitor()
    feed(monitor, [2.3] + [0.02] * 500)
    assert monitor.threshold() == FLOOR
    assert feed(monitor, [20.0, 0.02]) == (None, [])
    assert feed(monitor, [FLOOR * 1.01])[0] == 0


def test_disabled_monitor_reports_once_and_never_stops():
    index, reasons = feed(DivergenceMonitor(enabled=False), [2.3, 1e9, math.nan, 1e12])
    assert index is None and reasons == ["the loss grew from 2.3 to 1e+09"]


def test_state_round_trips():
    monitor = DivergenceMonitor()
    feed(monitor, healthy_losses(300))
    again = DivergenceMonitor(state=monitor.state_dict())
    assert again.state_dict() == monitor.state_dict()
    for loss in (0.5, 90.0, 1e5):
        assert again.check(loss) == monitor.check(loss)


# ---------------------------------------------------------------- the CLI


def diverged_lines(result):
    return [line for line in (result.stdout + result.stderr).splitlines() if "diverged" in line]


def test_cli_lr_1e6_stops_with_one_line_exit_3_and_keeps_the_checkpoint(npz_path, tmp_path):
    """Adam keeps the weights finite at lr 1e6, so the loss never turns NaN: it explodes instead (to 1e20 and more
    at the second step). A checkpoint is written after every step; none may be written after the diverged one."""
    out = tmp_path / "run"
    result = run_cli("train", "--kernels", "im2col", "--data", npz_path, "--lr", "1e6", "--epochs", "2",
                     "--batch-size", "32", "--checkpoint-every", "1", "--out", out)
    assert result.returncode == 3, (result.stdout, result.stderr)
    lines = diverged_lines(result)
    assert len(lines) == 1, lines
    assert lines[0].startswith("training diverged at epoch 1, step ")
    assert "the loss grew from 2.3" in lines[0] and ": lower --lr" in lines[0]
    assert f"the last good checkpoint is {out / 'checkpoint.npz'}" in lines[0]
    assert "Traceback" not in result.stderr
    step = int(lines[0].split("step ")[1].split(":")[0])
    params, adam_state, meta, _ = ckpt.load_checkpoint(out / "checkpoint.npz")
    assert int(adam_state["iterations"]) == step - 1  # the step before the diverged one, not after it
    assert all(np.isfinite(p).all() for p in params.values())
    assert '"status": "diverged"' in (out / "metrics.json").read_text()


def test_cli_no_divergence_stop_lets_it_burn(npz_path, tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--kernels", "im2col", "--data", npz_path, "--lr", "1e6", "--epochs", "1",
                     "--batch-size", "32", "--limit", "96", "--out", out, "--no-divergence-stop")
    assert result.returncode == 0, (result.stdout, result.stderr)
    lines = diverged_lines(result)
    assert len(lines) == 1 and lines[0].startswith("warning: training diverged") and "going on" in lines[0]
    assert "done: test accuracy" in result.stdout

"""Runs side by side: `python -m numba_cnn report RUN [RUN...]` prints a table of the runs and draws them on one
figure (plots.plot_runs); training draws its own run the same way into the run folder (draw_run).
"""

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from numba_cnn.errors import NumbaCNNError
from numba_cnn.plots import layer_shares, plot_runs

RUN_PNG = "training.png"


@dataclass
class Run:
    folder: Path
    config: dict  # config.json
    metrics: dict  # metrics.json: {"run": machine, threads, warm-up; "epochs": history; "status"}

    @property
    def epochs(self):
        return self.metrics.get("epochs", [])

    @property
    def label(self):
        """The folder's name, with the backend and seed unless the name already says them."""
        c = self.config
        details = [c["backend"]] if c["backend"] not in self.folder.name else []
        details.append(f"seed {c['seed']}")
        return f"{self.folder.name} ({', '.join(details)})"


def load_run(path):
    """A run folder (or a file in it, such as its checkpoint.npz) -> Run; a folder without a readable record is
    a NumbaCNNError naming it."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    records = {}
    for name in ("config.json", "metrics.json"):
        try:
            records[name] = json.loads((folder / name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise NumbaCNNError(f"{folder} is not a run folder: it has no {name} (train writes one per run)") from None
        except (OSError, ValueError) as exc:
            raise NumbaCNNError(f"cannot read {folder / name}: {exc}") from None
    config = records["config.json"]
    config.setdefault("backend", config.pop("kernels", "?"))  # runs written before "kernels" became "backend"
    return Run(folder, config, records["metrics.json"])


def figure_title(runs):
    """What the runs share, in a line: data set, training images, batch size, learning rate (where all agree)."""
    def common(get):
        values = {str(get(run)) for run in runs}
        return values.pop() if len(values) == 1 else "various"

    data = common(lambda r: _dataset(r.config))
    limit = common(lambda r: r.config.get("limit") or "all")
    return (f"numba_cnn training: {data}, {limit} training images, batch {common(lambda r: r.config['batch_size'])}, "
            f"lr {common(lambda r: r.config['lr'])}")


def _dataset(config):
    """The data set a run recorded ("?" for a run trained through the API without a record)."""
    return (config.get("data") or {}).get("dataset", "?")


def draw_run(folder):
    """The run folder's picture (RUN_PNG) from its config.json and metrics.json; returns its path, or None while
    the run has no finished epoch."""
    run = load_run(folder)
    if not run.epochs:
        return None
    path = run.folder / RUN_PNG
    plot_runs([(run.label, run.epochs)], path, f"{figure_title([run])}; {run.metrics.get('status', 'running')}")
    return path


def format_runs_table(runs):
    """One line per run (its last epoch's figures, median seconds per epoch), then each run's share of training
    time per layer."""
    lines = [f"{'run':<34} {'backend':<7} {'data':<13} {'seed':>4} {'batch':>5} {'lr':>7} {'epochs':>6} "
             f"{'status':<11} {'loss':>7} {'train acc':>9} {'test acc':>8} {'s/epoch':>8} {'ms/batch':>8} "
             f"{'warm-up s':>9}"]
    for run in runs:
        c, e = run.config, run.epochs
        last = e[-1] if e else None
        per_batch = f"{statistics.median(x['ms_per_batch'] for x in e):.1f}" if e else "-"
        lines.append(
            f"{run.folder.name[:34]:<34} {c['backend']:<7} {_dataset(c):<13} "
            f"{c['seed']:>4} {c['batch_size']:>5} {c['lr']:>7.0e} {len(e):>6} "
            f"{run.metrics.get('status', 'running'):<11} "
            + (f"{last['train_loss']:>7.4f} {last['train_accuracy']:>9.4f} {last['test_accuracy']:>8.4f} "
               f"{statistics.median(x['seconds'] for x in e):>8.2f} {per_batch:>8} " if last
               else f"{'-':>7} {'-':>9} {'-':>8} {'-':>8} {per_batch:>8} ")
            + f"{run.metrics.get('run', {}).get('warmup_seconds', float('nan')):>9.2f}")
    shares = [(run, layer_shares(run.epochs)) for run in runs if run.epochs]
    if shares:
        layers = list(dict.fromkeys(layer for _, s in shares for layer in s))
        lines += ["", "share of training time per layer (%)",
                  f"{'run':<34}" + "".join(f"{layer:>10}" for layer in layers)]
        lines += [f"{run.folder.name[:34]:<34}" + "".join(f"{100 * s.get(layer, 0.0):>10.1f}" for layer in layers)
                  for run, s in shares]
    lines.append("loss, train acc: the last epoch's means over its batches; test acc: after the last epoch; "
                 "s/epoch, ms/batch: medians over the epochs of the training time (evaluation apart)")
    return "\n".join(lines)


def add_arguments(parser):
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders (train's --out), or their checkpoint.npz")
    parser.add_argument("--out", metavar="PATH.png",
                        help="the figure (default: report-<time>.png beside the first run folder)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")


def run(args):
    """`python -m numba_cnn report`: the table on stdout, the figure into --out -> exit code."""
    runs = [load_run(path) for path in args.runs]
    print(format_runs_table(runs))
    drawn = [(run.label, run.epochs) for run in runs if run.epochs]
    if not drawn:
        raise NumbaCNNError("none of these runs has a finished epoch to draw")
    out = Path(args.out) if args.out else runs[0].folder.parent / f"report-{time.strftime('%Y%m%d-%H%M%S')}.png"
    try:
        plot_runs(drawn, out, figure_title(runs))
    except OSError as exc:
        raise NumbaCNNError(f"cannot write {out}: {exc.strerror or exc}") from None
    print(f"written: {out}")
    return 0

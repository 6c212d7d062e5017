"""Store a training run's figures in docs/results.json, the one file the docs' measured tables are rendered from.

    export NUMBA_CACHE_DIR=$(mktemp -d)                                                    # an empty kernel cache
    python -m numba_cnn train --kernels jit --epochs 1 --limit 256 --out runs/jit-cold    # compiles every kernel
    python -m numba_cnn train --kernels jit --out runs/jit                                 # loads them from the cache
    python tools/record_run.py runs/jit --cold-run runs/jit-cold
    python tools/make_docs.py

It reads the run folders' config.json and metrics.json (written by `train`): test accuracy and seconds of every
epoch, the warm-up (the jit kernels' load from the disk cache; with --cold-run, their compile on an empty cache),
and the per-layer table of the fastest epoch, with the machine from `lscpu`.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ladder import RESULTS, machine  # noqa: E402


def command_of(config):
    parts = ["python -m numba_cnn train", f"--kernels {config['backend']}"]
    if config.get("epochs", 5) != 5:
        parts.append(f"--epochs {config['epochs']}")
    if config.get("limit"):
        parts.append(f"--limit {config['limit']}")
    return " ".join(parts)


def machine_text(info):
    return (f"{info['cpu']}, {info['cpus']} vCPUs ({info['isa']}), {info['numba_threads']} Numba threads, "
            f"numba {info['numba']}, numpy {info['numpy']}, {info['date']}")


def record(run, cold_run=None):
    config = json.loads((run / "config.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    epochs = metrics["epochs"]
    fastest = min(epochs, key=lambda e: e["seconds"])
    layers = [{"name": entry["layer"], "forward_ms": entry["forward_ms"], "backward_ms": entry["backward_ms"],
               "other_ms": entry.get("other_ms", 0.0), "share": entry["share"]} for entry in fastest["layers"]]
    info = machine()
    out = {"command": command_of(config), "machine": info, "machine_line": machine_text(info),
           "backend": config["backend"], "epochs": len(epochs), "test_accuracy": epochs[-1]["test_accuracy"],
           "test_accuracies": [e["test_accuracy"] for e in epochs], "epoch_seconds": [e["seconds"] for e in epochs],
           "layer_epoch": fastest["epoch"], "layers": layers, "cache_load_s": metrics["run"]["warmup_seconds"]}
    if cold_run is not None:
        cold = json.loads((cold_run / "metrics.json").read_text())
        out["compile_s"] = cold["run"]["warmup_seconds"]
        out["compile_command"] = "NUMBA_CACHE_DIR=<an empty folder> " + command_of(
            json.loads((cold_run / "config.json").read_text()))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="the run folder train wrote")
    parser.add_argument("--cold-run", type=Path, help="an earlier run that started on an empty kernel cache")
    args = parser.parse_args(argv)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["training"] = record(args.run, args.cold_run)
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    t = results["training"]
    print(f"recorded: {t['epochs']} epochs, test accuracy {t['test_accuracy']:.4f}, "
          f"{min(t['epoch_seconds']):.2f}-{max(t['epoch_seconds']):.2f} s per epoch, cache load {t['cache_load_s']:.2f} s, "
          f"cold compile {t.get('compile_s', float('nan')):.1f} s -> {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

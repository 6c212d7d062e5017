"""Store a training run's figures in docs/results.json, the one file the docs' measured tables are rendered from.

    NUMBA_CACHE_DIR=$(mktemp -d) python -m numba_cnn train --kernels jit --out runs/jit    # a cold kernel cache
    python -m numba_cnn train --kernels jit --epochs 1 --limit 256 --out runs/jit-warm      # the same cache, warm
    python tools/record_run.py runs/jit --cold-cache --warm-run runs/jit-warm
    python tools/make_docs.py

It reads the run folder's config.json and metrics.json (written by `train`): test accuracy and seconds of every
epoch, the warm-up (the jit kernels' compile on a cold cache, or their load from the disk cache), and the per-layer
table of the fastest epoch, with the machine from `lscpu`.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ladder import RESULTS, machine  # noqa: E402


def command_of(config, cache_dir=False):
    parts = ["python -m numba_cnn train", f"--kernels {config['backend']}"]
    if config.get("epochs", 5) != 5:
        parts.append(f"--epochs {config['epochs']}")
    if config.get("limit"):
        parts.append(f"--limit {config['limit']}")
    text = " ".join(parts)
    return f"NUMBA_CACHE_DIR=<empty folder> {text}" if cache_dir else text


def machine_text(info):
    return (f"{info['cpu']}, {info['cpus']} vCPUs ({info['isa']}), {info['numba_threads']} Numba threads, "
            f"numba {info['numba']}, numpy {info['numpy']}, {info['date']}")


def record(run, cold_cache=False, warm_run=None):
    config = json.loads((run / "config.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    epochs = metrics["epochs"]
    fastest = min(epochs, key=lambda e: e["seconds"])
    layers = [{"name": entry["layer"], "forward_ms": entry["forward_ms"], "backward_ms": entry["backward_ms"] or
               entry.get("other_ms", 0.0), "share": entry["share"]} for entry in fastest["layers"]]
    info = machine()
    out = {"command": command_of(config, cold_cache), "machine": info, "machine_line": machine_text(info),
           "backend": config["backend"], "epochs": len(epochs), "test_accuracy": epochs[-1]["test_accuracy"],
           "test_accuracies": [e["test_accuracy"] for e in epochs], "epoch_seconds": [e["seconds"] for e in epochs],
           "layer_epoch": fastest["epoch"], "layers": layers, "compile_s": metrics["run"]["warmup_seconds"],
           "cold_cache": cold_cache}
    if warm_run is not None:
        warm = json.loads((warm_run / "metrics.json").read_text())
        out["cache_load_s"] = warm["run"]["warmup_seconds"]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="the run folder train wrote")
    parser.add_argument("--cold-cache", action="store_true", help="the run started on an empty kernel cache")
    parser.add_argument("--warm-run", type=Path, help="a later run on the same, now warm, cache")
    args = parser.parse_args(argv)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["training"] = record(args.run, args.cold_cache, args.warm_run)
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    t = results["training"]
    print(f"recorded: {t['epochs']} epochs, test accuracy {t['test_accuracy']:.4f}, "
          f"{min(t['epoch_seconds']):.2f}-{max(t['epoch_seconds']):.2f} s per epoch, warm-up {t['compile_s']:.1f} s "
          f"-> {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

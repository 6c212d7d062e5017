"""Store training comparisons (`bench --compare`) in docs/results.json, one per network, for the per-network tables
of the README and docs/results.md:

    python -m numba_cnn bench --compare torch,keras --model lenet5 --out runs/compare-lenet5
    python tools/record_compare.py runs/compare-lenet5/compare-*.json
    python tools/make_docs.py

Each report's network name keys its entry (a later report of the same network replaces the earlier one); the
entry keeps the command's settings, the machine and, per contender, the medians and ranges the report computed,
the ratios to the fastest framework and to PyTorch's best setting, and numba_cnn's executed work.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ladder import RESULTS, machine  # noqa: E402

from numba_cnn.kernels import BACKENDS  # noqa: E402
from numba_cnn.network.presets import PRESETS  # noqa: E402

CONTENDER_KEYS = ("contender", "sec_per_epoch", "sec_per_epoch_range", "inference_img_per_s", "peak_rss_mb",
                  "own_memory_mb", "test_accuracy", "gflops", "peak_share", "executed_flops_per_image",
                  "executed_gflops", "executed_peak_share", "vs_fastest_framework", "vs_fastest_framework_names",
                  "vs_torch_best", "vs_torch_best_names", "baseline")


def command_of(settings, network_name):
    ours = [c for c in settings["contenders"] if c in BACKENDS]
    theirs = [c for c in settings["contenders"] if c not in BACKENDS and ":" not in c]
    parts = [f"python -m numba_cnn bench --compare {','.join(theirs)} --kernels {','.join(ours)}"]
    parts.append(f"--model {network_name if network_name in PRESETS else network_name + '.json'}")
    if settings["dataset"] == "random":
        parts.append("--random-data")
    elif settings["dataset"] != "mnist":
        parts.append(f"--dataset {settings['dataset']}")
    parts.append(f"--steps {settings['steps']} --rounds {settings['rounds']}")
    return " ".join(parts)


def record(report):
    settings, network = report["settings"], report["settings"]["network"]
    name = network.get("name") or "unnamed"
    contenders = [{key: e[key] for key in CONTENDER_KEYS if key in e} for e in report["contenders"]
                  if e.get("status") == "ok"]
    return name, {"network": name, "input_shape": network["input_shape"], "layers": len(network["layers"]),
                  "command": command_of(settings, name), "batch_size": settings["batch_size"],
                  "threads": settings["threads"], "rounds": settings["rounds"], "measure": settings["measure"],
                  "data": settings["data"], "created_utc": report["created_utc"], "machine": machine(),
                  "peak_gflops": report["calibration"]["peak_gflops"],
                  "training_flops_per_image": report["calibration"]["training_flops_per_image"],
                  "contenders": contenders}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", type=Path, nargs="+", help="compare-*.json files bench --compare wrote")
    args = parser.parse_args(argv)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for path in args.reports:
        name, entry = record(json.loads(path.read_text()))
        results.setdefault("compare", {})[name] = entry
        jit = next((c for c in entry["contenders"] if c["contender"] == "jit"), None)
        ratio = jit["vs_fastest_framework"]["sec_per_epoch"] if jit and "vs_fastest_framework" in jit else None
        print(f"recorded {name}: jit x fastest framework {ratio if ratio is None else round(ratio, 2)}")
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

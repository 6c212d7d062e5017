"""Entry point of a `bench --compare` subprocess: python -m numba_cnn.bench SPEC.json."""

import json
import sys
from pathlib import Path

from numba_cnn.bench import write_result
from numba_cnn.bench.compare import run_contender
from numba_cnn.errors import NumbaCNNError


def _contender_process(spec_path):
    """Entry point of a --compare subprocess: read the spec, run the contender, write its result (or the
    user-facing error) as JSON where the spec says."""
    from numba_cnn.profiling import maybe_profile

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    result_path = Path(spec.pop("result_path"))
    try:
        with maybe_profile(spec.pop("profile"), "bench-compare", spec["name"]):
            result = run_contender(**spec)
    except NumbaCNNError as exc:
        result = {"user_error": str(exc)}
    write_result(result_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(_contender_process(sys.argv[1]))

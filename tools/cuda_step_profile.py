"""Where a cuda training step's time goes, measured on a GPU: run by tools/gpu-check.sh.

For one network (default mnist-cnn), batches gathered on the device from a device-resident copy of random uint8
images, as `train` does:
- ms per step, wall clock over --steps steps after --warm steps (one synchronize at the end, none inside);
- the device's own time per layer and phase (the layer timer's events), and what share of the wall time the
  device spent inside layers at all;
- kernel launches and driver allocations per step (the pool's counters, when the pool is installed).

Prints one JSON line (with --json) or a table. Run it twice, with NUMBA_CNN_CUDA_POOL=1 and =0, for the pool's
effect; a figure from one run is compared with figures from the same run only.
"""

import argparse
import json
import sys
import time

import numpy as np


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mnist-cnn")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warm", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from numba_cnn.bench.networks import bench_network
    from numba_cnn.kernels import get_backend
    from numba_cnn.kernels.cuda import runtime
    from numba_cnn.model import Model
    from numba_cnn.optim import Adam
    from numba_cnn.timing import LayerTimer, NullTimer

    backend = get_backend("cuda")
    network = bench_network(args.model)
    model = Model(backend, seed=0, network=network)
    optimizer = Adam(model.params, backend)
    rng = np.random.default_rng(0)
    images = 8192
    x_dev = backend.to_device(rng.integers(0, 256, (images, *network.input_shape), dtype=np.uint8))
    y_dev = backend.to_device(rng.integers(0, network.output_shape[0], images, dtype=np.int64))
    dropout_rng = backend.make_dropout_rng(0)
    order = backend.to_device(rng.permutation(images * 4) % images)

    launches = [0]
    real_run = runtime._run

    def counting_run(*run_args, **run_kwargs):
        launches[0] += 1
        real_run(*run_args, **run_kwargs)

    def step(i):
        start = (i * args.batch_size) % (images * 4 - args.batch_size)
        idx = order[start:start + args.batch_size]
        with model.timer.section("data", "other"):
            xb, yb = backend.as_float_images(backend.take_rows(x_dev, idx)), backend.take_rows(y_dev, idx)
        model.forward_backward(xb, yb, dropout_rng)
        with model.timer.section("optimizer", "other"):
            optimizer.step(model.grads)

    model.timer = NullTimer()
    for i in range(args.warm):
        step(i)
    backend.synchronize()
    manager = type(getattr(runtime.cuda.current_context(), "memory_manager", None))
    pool = getattr(manager, "pool", None)
    allocations_before = pool.driver_allocations if pool else None

    def timed_steps():
        backend.synchronize()
        start = time.perf_counter()
        for i in range(args.steps):
            step(i)
        backend.synchronize()
        return time.perf_counter() - start

    runtime._run = counting_run
    wall = timed_steps()
    runtime._run = real_run
    per_step_launches = launches[0] / args.steps

    timer = LayerTimer(sync=backend.synchronize, device_event=backend.device_event)
    model.timer = timer
    timed_wall = timed_steps()
    rows = timer.table(timed_wall)

    result = {"model": args.model, "pool": manager.__name__, "steps": args.steps, "batch": args.batch_size,
              "ms_per_step": 1000 * wall / args.steps, "ms_per_step_with_events": 1000 * timed_wall / args.steps,
              "launches_per_step": per_step_launches,
              "driver_allocations_per_step": (None if pool is None
                                              else (pool.driver_allocations - allocations_before) / args.steps),
              "device_ms_in_layers_per_step": 1000 * sum(r["seconds"] for r in rows) / args.steps,
              "layers": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.model} on cuda ({result['pool']}), batch {args.batch_size}: {result['ms_per_step']:.3f} ms/step "
          f"wall, {per_step_launches:.0f} launches/step, driver allocations/step "
          f"{result['driver_allocations_per_step']}")
    print(f"with layer events: {result['ms_per_step_with_events']:.3f} ms/step; device inside layers "
          f"{result['device_ms_in_layers_per_step']:.3f} ms/step")
    for r in rows:
        print(f"  {r['layer']:<12} fwd {r['forward_ms']:8.3f}  bwd {r['backward_ms']:8.3f}  "
              f"other {r['other_ms']:8.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

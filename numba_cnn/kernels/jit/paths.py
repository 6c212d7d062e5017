"""Which kernel path each jit op call took, and the multiply-adds it executed, for whoever asks (the op bench, the
training comparison): the glue in jit/__init__.py picks a path from the shapes and the target's tiles and calls
`note` once per op call; nothing is kept unless a `PathLog` is open on this thread.

Executed multiply-adds: the products the kernels compute, those with stored zeros included (the padding, the
zero border of the full correlation that gives a stride-1 dx), a tile's unused lanes and columns left out. The
dense count of a layer (Layer.macs) is what the layer costs without skipping: the listed backward, which runs only
over the conv output's nonzero gradients, executes far fewer; a stride-1 dx somewhat more.
"""

import threading

_per_thread = threading.local()


class PathLog:
    """`with PathLog() as log:` -> log.calls, one (op, path, executed multiply-adds) per op call made inside."""

    def __init__(self):
        self.calls = []
        self._outer = None

    def __enter__(self):
        self._outer = getattr(_per_thread, "log", None)
        _per_thread.log = self
        return self

    def __exit__(self, *exc):
        _per_thread.log = self._outer

    @property
    def paths(self):
        """The distinct "op: path" entries, in call order."""
        return list(dict.fromkeys(f"{op}: {path}" for op, path, _ in self.calls))

    @property
    def executed_macs(self):
        return sum(macs for _, _, macs in self.calls)


def note(op, path, executed_macs):
    log = getattr(_per_thread, "log", None)
    if log is not None:
        log.calls.append((op, path, int(executed_macs)))

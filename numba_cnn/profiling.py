"""--profile: run a command under pyinstrument and keep its call tree as HTML and text in profiles/."""

import time
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def maybe_profile(enabled, command, backend, folder="profiles"):
    """Profile the body when enabled; files are named <command>-<backend>-<UTC time>.{html,txt}."""
    if not enabled:
        yield None
        return
    from pyinstrument import Profiler

    profiler = Profiler()
    profiler.start()
    try:
        yield profiler
    finally:
        profiler.stop()
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"{command}-{backend}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        Path(f"{stem}.html").write_text(profiler.output_html(), encoding="utf-8")
        Path(f"{stem}.txt").write_text(profiler.output_text(unicode=True, color=False), encoding="utf-8")
        print(f"profile written: {stem}.html (open in a browser) and {stem}.txt")

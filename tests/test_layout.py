"""The package's shape: modules small enough to read in one sitting, and imports that only go down (no module
imports, directly or through others, a module that imports it back)."""

import ast
import io
import re
import tokenize
from pathlib import Path

import numba_cnn

PACKAGE = Path(numba_cnn.__file__).parent
# Long enough for a backend's contract functions with their docstrings side by side; a longer module is two topics.
MAX_LINES = 600


def modules():
    """{dotted name: path} for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imported_modules(name, path, known):
    """The package modules that `name` imports anywhere in its source (function-level imports included). A
    package's __init__ does not count as imported by its own submodules: Python runs it first, but that is not an
    import the submodule makes."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from pkg import sub` imports the submodule; `from pkg import name` the package's own module
            base = node.module
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def test_no_module_is_too_long():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_imports_only_go_down():
    known = modules()
    graph = {name: imported_modules(name, path, known) for name, path in known.items()}
    cycles = []

    def visit(node, stack, seen):
        for nxt in graph[node]:
            if nxt in stack:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in seen:
                seen.add(nxt)
                visit(nxt, stack + [nxt], seen)

    for start in graph:
        visit(start, [start], {start})
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_the_cycle_check_can_fail(tmp_path):
    # the checker on a made-up pair that imports each other: it must find the cycle
    (tmp_path / "a.py").write_text("from pkg import b\n")
    (tmp_path / "b.py").write_text("import pkg.a\n")
    known = {"pkg.a": tmp_path / "a.py", "pkg.b": tmp_path / "b.py"}
    assert imported_modules("pkg.a", known["pkg.a"], known) == {"pkg.b"}
    assert imported_modules("pkg.b", known["pkg.b"], known) == {"pkg.a"}


# Measurements belong in docs/results.md with their machine and command; code comments and docstrings give reasons.
MEASUREMENT_PATTERNS = {
    "a CPU name": re.compile(r"\b(Zen ?\d|EPYC|Xeon|Sapphire Rapids|Ryzen|Skylake|Ice Lake|Cascade Lake)\b"),
    "a date": re.compile(r"\b20\d\d-\d\d-\d\d\b"),
    "a time in ms or us": re.compile(r"\b\d+(\.\d+)?(-\d+(\.\d+)?)? ?(ms|us|µs)\b"),
}


def comments_and_docstrings(path):
    """(line, text) of every comment and docstring in a module."""
    source = path.read_text()
    found = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(source).readline)
             if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                found.append((node.body[0].lineno, doc))
    return found


def measurements_in(path):
    return [f"{path.relative_to(PACKAGE.parent)}:{line}: {what}" for line, text in comments_and_docstrings(path)
            for what, pattern in MEASUREMENT_PATTERNS.items() if pattern.search(text)]


def test_comments_and_docstrings_hold_no_measurements():
    found = [hit for path in modules().values() for hit in measurements_in(path)]
    assert not found, f"measurements in comments or docstrings (they go to docs/results.md): {found[:10]}"


def test_the_measurement_check_can_fail(tmp_path):
    module = tmp_path / "pkg" / "m.py"
    module.parent.mkdir()
    module.write_text('"""Kernels."""\n\nX = 1  # 3.5 ms on a Zen 3, 2026-11-27\n')
    hits = [what for _, text in comments_and_docstrings(module) for what, pattern in MEASUREMENT_PATTERNS.items()
            if pattern.search(text)]
    assert sorted(hits) == ["a CPU name", "a date", "a time in ms or us"]

"""docs/ stays true to the code: every page is there and says something, every file it names exists, every
`path.py: name` (and `numba_cnn.module.name`) it cites is defined there, every command marked
`# checked by tests/test_docs.py` runs and writes the files its `produces:` list names, and every figure a page
names is produced by such a command (or ships in docs/img/, drawn by tools/make_docs.py).

One true number per claim: every computed text of the pages and the top-level README (worked examples, tables of
tile shapes, measured tables, and figures tagged `<!--fig:KEY-->`) must be what `python tools/make_docs.py`
renders now, from the code and docs/results.json; so a figure quoted in two places cannot disagree, and a page's
tile shape or formula cannot drift from the code it names."""

import ast
import fnmatch
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pictures import assert_png

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = ("README.md", "layers.md", "training.md", "kernels.md", "numba.md", "ladder.md", "performance.md",
         "results.md", "commands.md")
TOOLS = ROOT / "tools"
CHECK_MARK = "# checked by tests/test_docs.py"
COMMAND_TIMEOUT_S = 180  # each checked command takes seconds; the margin is for a loaded 2-core machine

PATH_RE = re.compile(r"(?<![\w/.])((?:numba_cnn|tests)/[\w./-]*[\w/])")
# `numba_cnn/kernels/layers.py: softmax_cross_entropy`, `numba_cnn/model.py: Model.forward` (a line break may
# follow ':')
REFERENCE_RE = re.compile(r"((?:numba_cnn|tests)/[\w/]+\.py):\s+([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
DOTTED_RE = re.compile(r"`(numba_cnn(?:\.[A-Za-z_]\w*)+)`")
FIGURE_RE = re.compile(r"[\w<>*./-]+\.png")
BASH_BLOCK_RE = re.compile(r"```bash\n(.*?)```", re.S)


def page_text(name):
    return (DOCS / name).read_text(encoding="utf-8")


def all_text():
    return {name: page_text(name) for name in PAGES}


def defined_names(tree):
    """Names bound at a module's or class's top level (def, class, assignment), looking into if/try blocks."""
    names = {}
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for leaf in ast.walk(target):
                    if isinstance(leaf, ast.Name):
                        names[leaf.id] = node
        elif isinstance(node, (ast.If, ast.Try)):
            stack.extend(node.body + node.orelse + getattr(node, "finalbody", []))
            for handler in getattr(node, "handlers", []):
                stack.extend(handler.body)
    return names


def resolves(path, dotted):
    """Whether `dotted` (name or Class.method) is defined in the Python file at `path`."""
    scope = ast.parse(path.read_text(encoding="utf-8"))
    for part in dotted.split("."):
        node = defined_names(scope).get(part)
        if node is None:
            return False
        scope = node
    return True


def module_reference(dotted):
    """`numba_cnn.a.b.name` -> (file, 'name') for the longest module prefix that is a file, else None."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:cut])
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate, ".".join(parts[cut:])
    return None


def checked_commands():
    """(page, command, produces globs) for every ```bash block holding CHECK_MARK."""
    found = []
    for name in PAGES:
        for block in BASH_BLOCK_RE.findall(page_text(name)):
            if CHECK_MARK not in block:
                continue
            produces, lines = [], []
            for line in block.splitlines():
                if line.startswith("#"):
                    if "produces:" in line:
                        produces += line.split("produces:", 1)[1].split()
                    continue
                if line.strip():
                    lines.append(line.rstrip("\\").strip())
            found.append((name, " ".join(lines), produces))
    return found


def test_every_page_exists_and_says_something():
    for name in PAGES:
        text = page_text(name)
        assert text.startswith("# "), f"docs/{name} does not start with a heading"
        assert len(text.split()) > 150, f"docs/{name} is nearly empty"
    index = page_text("README.md")
    for name in PAGES[1:]:
        assert f"({name})" in index, f"docs/README.md does not link {name}"


def test_every_file_named_exists():
    missing = [(page, path) for page, text in all_text().items() for path in PATH_RE.findall(text)
               if not (ROOT / path).exists()]
    assert not missing, f"docs name files that do not exist: {missing}"


def test_every_code_reference_names_a_definition():
    checked, wrong = 0, []
    for page, text in all_text().items():
        for path, name in REFERENCE_RE.findall(text):
            checked += 1
            if not (ROOT / path).is_file() or not resolves(ROOT / path, name):
                wrong.append(f"{page}: {path}: {name}")
        for dotted in DOTTED_RE.findall(text):
            checked += 1
            found = module_reference(dotted)
            if found is None or (found[1] and not resolves(*found)):
                wrong.append(f"{page}: {dotted}")
    assert checked > 50, f"only {checked} references found: has the reference format changed?"
    assert not wrong, f"references to nothing: {wrong}"


def test_the_reference_check_catches_a_wrong_name():
    assert resolves(ROOT / "numba_cnn/model.py", "Model.forward_backward")
    assert resolves(ROOT / "numba_cnn/network/layers/conv2d.py", "Conv2D.backward")
    assert resolves(ROOT / "numba_cnn/kernels/jit/tiles.py", "CONV_TILE_WIDE")  # bound inside an if
    assert not resolves(ROOT / "numba_cnn/model.py", "Model.no_such_method")
    assert not resolves(ROOT / "numba_cnn/kernels/layers.py", "softmax")
    assert module_reference("numba_cnn.model.Model") == (ROOT / "numba_cnn/model.py", "Model")


def test_every_figure_named_is_produced_by_a_checked_command():
    produced = {Path(glob).name for _, _, produces in checked_commands() for glob in produces}
    shipped = {p.name for p in (DOCS / "img").glob("*.png")} if (DOCS / "img").is_dir() else set()
    orphans = []
    for page, text in all_text().items():
        for figure in FIGURE_RE.findall(text):
            name = re.sub(r"<[^>]*>", "*", Path(figure).name)
            if name not in produced and name not in shipped and not any(
                    fnmatch.fnmatch(name, pattern) for pattern in produced):
                orphans.append(f"{page}: {figure}")
    assert not orphans, f"figures no checked command produces: {orphans}"
    for png in (DOCS / "img").glob("*.png") if (DOCS / "img").is_dir() else ():
        assert png.stat().st_size < 300_000, f"{png} is larger than 300 KB"
        assert_png(png)


COMMANDS = checked_commands()


def test_there_are_a_few_checked_commands():
    assert 2 <= len(COMMANDS) <= 5, [c for _, c, _ in COMMANDS]


@pytest.mark.parametrize("page, command, produces", COMMANDS, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(COMMANDS)])
def test_checked_command_runs_and_writes_its_files(page, command, produces, tmp_path):
    argv = shlex.split(command)
    assert argv[0] == "python", f"{page}: a checked command starts with python: {command}"
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=os.pathsep.join(
        filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))))
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S)
    assert proc.returncode == 0, f"{page}: `{command}` exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert proc.stdout.strip(), f"{page}: `{command}` printed nothing"
    for glob in produces:
        files = sorted(tmp_path.glob(glob))
        assert files, f"{page}: `{command}` wrote no {glob}"
        for path in files:
            assert path.stat().st_size > 0, f"{path} is empty"
            if path.suffix == ".png":  # a bench on a few ops draws a short chart
                assert_png(path, min_height=150, min_bytes=5_000)


# ---------------------------------------------------------------- one true number per claim


def make_docs():
    """tools/make_docs.py as a module (it is a script, not part of the package)."""
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    import make_docs as module

    return module


def test_every_computed_text_is_what_make_docs_renders_now():
    stale = make_docs().stale_pages()
    assert not stale, ("pages whose generated blocks or tagged figures differ from what `python tools/make_docs.py` "
                       f"renders (run it, after re-measuring if the code changed): {stale}")


def test_a_figure_quoted_twice_with_two_values_is_caught():
    md = make_docs()
    values = {"ladder.fused.ms": "3.53"}
    text = "fused: 3.53<!--fig:ladder.fused.ms--> ms ... again 3.60<!--fig:ladder.fused.ms--> ms\n"
    assert md.rendered(text, values) != text
    assert md.rendered(text, values).count("3.53<!--fig:ladder.fused.ms-->") == 2
    tampered = md.BLOCK_RE.sub(lambda m: m.group(1) + "x = [ 9 ]\n" + m.group(4),
                               "<!-- generated: conv-forward -->\nold\n<!-- end generated -->")
    assert md.rendered(tampered, values) != tampered
    with pytest.raises(KeyError):
        md.rendered("1.0<!--fig:no.such.key-->", values)


def test_tile_table_agrees_with_tiles_py():
    """kernels.md's table of tiles, read back cell by cell, against the constants of
    numba_cnn/kernels/jit/tiles.py imported for a 256-bit and a 512-bit register file."""
    md = make_docs()
    text = page_text("kernels.md")
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[3:5]]
            for line in text.splitlines() if line.startswith("| `CONV_")}
    assert set(rows) == {"`CONV_TILE_WIDE`", "`CONV_TILE_NARROW`", "`CONV_TILE_SMALL`", "`CONV_POOL_TILE`",
                         "`CONV_POOL_TILE_NARROW`"}, rows
    for column, bits in enumerate((256, 512)):
        constants = md.tile_constants(bits)
        width = bits // 32
        for name, cells in rows.items():
            lanes, columns = constants[name.strip("`")]
            registers = lanes * columns // width
            expected = f"{lanes} x {columns} = {lanes * columns} floats = **{registers} {'ymm' if bits == 256 else 'zmm'}**"
            assert cells[column] == expected, (name, bits, cells[column], expected)
            assert registers <= constants["registers"], f"{name} needs {registers} registers of {constants['registers']}"


def test_the_output_size_formula_on_the_page_is_the_codes():
    """layers.md's `P = (H + top + bottom - R) // stride + 1`, evaluated, against contract.conv_output_size; and
    its 'same' padding rule against conv2d.same_padding."""
    from numba_cnn.kernels.contract import conv_output_size
    from numba_cnn.network.layers.conv2d import same_padding

    text = page_text("layers.md")
    formula = re.search(r"P = (\(H \+ top \+ bottom - R\) // stride \+ 1)", text)
    assert formula, "layers.md no longer states the output size formula"
    rule = re.search(r"The total\s+padding is `(max\(\(P - 1\) \* stride \+ R - H, 0\))`", text)
    assert rule, "layers.md no longer states the 'same' padding rule"
    assert "extra row goes at the bottom" in text
    for h in range(1, 12):
        for r in range(1, h + 1):
            for stride in (1, 2, 3):
                for top, bottom in ((0, 0), (1, 0), (1, 2)):
                    env = dict(H=h, R=r, stride=stride, top=top, bottom=bottom)
                    assert eval(formula.group(1), {}, env) == conv_output_size(h, r, stride, top, bottom)
                before, after = same_padding(h, r, stride)
                total = eval(rule.group(1), {"max": max}, dict(P=-(-h // stride), stride=stride, R=r, H=h))
                assert (before + after, after - before) == (total, total % 2), (h, r, stride)


def test_every_picture_is_drawn_by_make_docs():
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    from doc_pictures import PICTURES

    named = {Path(figure).name for text in all_text().values() for figure in re.findall(r"\(img/([\w.-]+\.png)\)", text)}
    assert named, "no page shows a picture from docs/img/"
    assert named <= set(PICTURES), f"pictures no function of tools/doc_pictures.py draws: {named - set(PICTURES)}"
    for name in named:
        assert (DOCS / "img" / name).is_file(), f"docs/img/{name} is missing: run python tools/make_docs.py"


def test_the_ladder_checks_every_step_against_the_oracle():
    """tools/ladder.py on a small shape, one call per step: every step runs and agrees with the float64 oracle (a
    step that disagrees raises before it is timed)."""
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    import ladder

    lanes, columns = ladder.CONV_TILE_WIDE
    shape = dict(N=2, C=3, H=columns + 4, W=columns + 4, K=lanes, R=3, S=3)
    record = ladder.run_ladder(shape=shape, repeats=1, rounds=1, naive_images=1, log=lambda line: None)
    keys = [step["key"] for step in record["steps"] if step["rung"]]
    assert keys == ["naive", "njit", "channels_last", "tile", "prange", "fused", "listed_backward"]
    assert all(step["error"] <= ladder.FLOAT32_TOL for step in record["steps"])
    from numba_cnn.kernels._numba_ext import TARGET_FEATURES

    if "fma" in TARGET_FEATURES:  # the tile's multiply-adds compile to FMAs under fastmath's `contract`
        assert record["asm"]["tile"]["counts"]["vfmadd"] > 0
        assert record["asm"]["tile_strict"]["counts"]["vfmadd"] == 0

"""The tree keeps the shape a newcomer can live in: fasthash never imports brcd, no import
cycles between modules, no module over 500 lines, no function body over 80 lines, and the
demo stays a thin script (<= 300 lines)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fasthash", "brcd")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(name: str, path: Path, top_level_only: bool) -> set[str]:
    """Modules of our packages that ``name`` imports (resolving relative imports)."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def test_fasthash_never_imports_brcd():
    for name, path in _modules().items():
        if name.startswith("fasthash"):
            bad = {m for m in _imports(name, path, False) if m.startswith("brcd")}
            assert not bad, f"{name} imports {bad}"


def test_no_import_cycles():
    mods = _modules()
    graph = {n: {m for m in _imports(n, p, True) if m in mods and m != n}
             for n, p in mods.items()}
    # a package's __init__ importing its own submodules is how re-exports work, not a cycle
    graph = {n: {m for m in deps if not (m.startswith(n + ".") and mods[n].name == "__init__.py")}
             for n, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for m in graph[n]:
            if state.get(m) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])


@pytest.mark.parametrize("pkg", PACKAGES)
def test_size_limits(pkg):
    too_long = []
    for name, path in _modules().items():
        if not name.startswith(pkg):
            continue
        src = path.read_text()
        if len(src.splitlines()) > 500:
            too_long.append(f"{name}: {len(src.splitlines())} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                doc = isinstance(body[0], ast.Expr) and isinstance(
                    getattr(body[0], "value", None), ast.Constant)
                start = body[1].lineno if doc and len(body) > 1 else body[0].lineno
                if node.end_lineno - start + 1 > 80:
                    too_long.append(f"{name}.{node.name}: {node.end_lineno - start + 1} lines")
    assert not too_long
    if pkg == "brcd":
        assert len((ROOT / "brcd" / "demo.py").read_text().splitlines()) <= 300

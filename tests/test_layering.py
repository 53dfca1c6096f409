"""The package's layers point one way: no import cycle between its modules, and no module reaches
into another's private names. Read from the source (``ast``), so the test sees every module-level
import, not only those a test run happens to execute."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"compile_toolkit": ROOT / "compile_toolkit", "compile_toolkit.models": ROOT / "models",
            "compile_toolkit.passes": ROOT / "passes"}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (``models``/``passes`` are mapped
    into it by pyproject.toml)."""
    found: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        if not folder.is_dir():
            continue
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            found.setdefault(name, path)
    return found


def _module_level_imports(tree: ast.Module) -> list[ast.ImportFrom | ast.Import]:
    """Imports that run when the module is imported: top level, outside ``if TYPE_CHECKING:``."""
    found: list[ast.ImportFrom | ast.Import] = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.Try):
            found += [n for n in node.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    return found


def _target(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the package modules it imports at module level; and every private name imported
    across modules (``module: from target import _name``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    private: list[str] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _target(name, path, node)
                private += [f"{name}: from {target} import {a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__") and target in modules]
        for node in _module_level_imports(tree):
            if isinstance(node, ast.Import):
                imported = {a.name for a in node.names if a.name in modules}
            else:
                target = _target(name, path, node)
                imported = {f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target
                            for a in node.names} & set(modules)
            graph[name] |= {face for module in imported for face in _with_packages(module, modules)}
    return graph, private


def _with_packages(module: str, modules: dict[str, Path]) -> set[str]:
    """``module`` and the package ``__init__``s Python runs to import it: importing
    ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first, so a cycle through a package's face
    is a cycle too."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in modules}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _is_package_init(name: str) -> bool:
    return name in PACKAGES or (ROOT / "compile_toolkit" / Path(*name.split(".")[1:]) / "__init__.py").is_file()


def test_no_import_cycle_between_modules():
    """A package's ``__init__`` re-exporting its own submodules is not a cycle of layers, so edges
    into an ``__init__`` from inside its own package are left out."""
    graph, _ = _graph()
    pruned = {name: {t for t in targets if not (_is_package_init(t) and name.startswith(t + "."))}
              for name, targets in graph.items()}
    assert _cycles(pruned) == []


def test_no_private_name_is_imported_across_modules():
    _, private = _graph()
    assert private == []


def test_the_checks_catch_a_cycle_and_a_private_import():
    """Positive controls on a made-up graph and on a made-up import."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    modules = {name: Path() for name in ("p", "p.q", "p.q.r", "p.s")}
    assert _with_packages("p.q.r", modules) == {"p", "p.q", "p.q.r"}  # the faces run on the way in
    # p.s imports p.q.r, whose package face p.q imports p.s back: a cycle only through the face.
    assert _cycles({"p.s": _with_packages("p.q.r", modules), "p.q": {"p.s"}, "p.q.r": set()}) == [["p.q", "p.s"]]
    tree = ast.parse("from .layers import _zero_vector\n")
    node = tree.body[0]
    assert isinstance(node, ast.ImportFrom)
    assert _target("compile_toolkit.channels.rules.norms", Path("norms.py"), node) == "compile_toolkit.channels.rules.layers"


@pytest.mark.parametrize("lower, upper", [("compile_toolkit.pruning", "compile_toolkit.training"),
                                          ("compile_toolkit.channels", "compile_toolkit.pruning")])
def test_lower_layers_do_not_import_upper_ones(lower, upper):
    graph, _ = _graph()
    offending = sorted(f"{name} -> {t}" for name, targets in graph.items() if name.startswith(lower)
                       for t in targets if t.startswith(upper))
    assert offending == []


def test_importing_the_package_does_not_load_torch_xla():
    """``xr.use_spmd()`` cannot be undone and torch_xla claims devices when loaded: only the SPMD
    strategy (and the StableHLO worker process) may import it. transformers loads it with its
    models, so the hf exporter imports those only when it runs."""
    import subprocess
    import sys

    code = "import sys, compile_toolkit.cli, compile_toolkit.training; print('torch_xla' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"

"""Dependencies run one way: the import graph of the project's packages has no cycles.

Every import counts, including those inside functions (they are cycles that merely happen
later). ``modeconn.models`` is the bottom layer and never imports ``modeconn``; fitters never import
the method table or ``connect``; ``modeconn.service`` is imported by nothing in the library.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# package name -> its folder; models/ and service/ are linked into modeconn/ under these names
PACKAGES = {"modeconn": "modeconn", "modeconn.models": "models", "modeconn.service": "service"}
MODELS, SERVICE = "modeconn.models", "modeconn.service"


def _module_name(package: str, folder: Path, path: Path) -> str:
    parts = [package, *path.relative_to(folder).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(package, ROOT / folder, path): path
        for package, folder in PACKAGES.items()
        for path in sorted((ROOT / folder).rglob("*.py"))
    }


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module ``name`` refers to (a module, or the package holding a name)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                targets = [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                found = _resolve(target, modules)
                if found is not None and found != name and not name.startswith(found + "."):
                    graph[name].add(found)  # a package's own __init__ is not a dependency
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_has_no_cycles():
    cycle = _cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_models_is_the_bottom_layer():
    graph = import_graph()
    assert len([m for m in graph if _within(m, MODELS)]) > 5
    up = {m: sorted(d for d in deps if not _within(d, MODELS)) for m, deps in graph.items()}
    assert {m: d for m, d in up.items() if _within(m, MODELS) and d} == {}


def test_fitters_do_not_import_the_table():
    graph = import_graph()
    fitters = [m for m in graph if m.startswith("modeconn.fit.")]
    table = {"modeconn.fit.methods", "modeconn.fit.connect"}
    for module in fitters:
        if module not in table:
            assert not graph[module] & table, module


def test_the_library_does_not_import_the_service():
    graph = import_graph()
    for module, deps in graph.items():
        if not _within(module, SERVICE):
            assert not any(_within(d, SERVICE) for d in deps), module


def test_the_detector_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_public_names_agree_with_what_type_checkers_see():
    import modeconn

    tree = ast.parse((ROOT / "modeconn" / "__init__.py").read_text())
    checked = {
        alias.name: node.module
        for block in tree.body
        if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert checked == modeconn._EXPORTS
    assert set(modeconn.__all__) == set(checked) | {"__version__"}
    for name in modeconn.__all__:
        assert getattr(modeconn, name) is not None, name


def test_a_users_models_and_service_folders_do_not_shadow_the_packages(tmp_path):
    """``python -m modeconn`` puts the working directory first on the import path."""
    import subprocess
    import sys

    for name in ("models", "service"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('the user folder')\n")
    done = subprocess.run(
        [sys.executable, "-m", "modeconn", "spec", "--model", "mlp", "--arg", "width=8"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "proven" in (done.stdout + done.stderr).lower()

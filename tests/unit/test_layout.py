"""The package's shape: no import cycles between modules (module-level imports,
TYPE_CHECKING blocks aside), and the layers import downwards only."""

from __future__ import annotations

import ast

from common import REPO

AGENT = REPO / "agent"


def module_name(path: object) -> str:
    rel = path.relative_to(REPO).with_suffix("")  # type: ignore[attr-defined]
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_imports() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in AGENT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.parse(path.read_text()).body:  # module level only
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    return graph


def test_no_import_cycles() -> None:
    graph = module_imports()
    done: set[str] = set()
    stack: list[str] = []

    def visit(node: str) -> None:
        if node in done:
            return
        assert node not in stack, "import cycle: " + " -> ".join([*stack, node])
        stack.append(node)
        for dep in sorted(graph[node]):
            visit(dep)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)


def test_layers_import_downwards() -> None:
    """wire imports neither device nor fleet; device does not import fleet."""
    for name, deps in module_imports().items():
        if name.startswith("agent.wire"):
            assert not [d for d in deps if d.startswith(("agent.device", "agent.fleet"))], name
        if name.startswith("agent.device"):
            assert not [d for d in deps if d.startswith("agent.fleet")], name

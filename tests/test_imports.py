"""The engine's import graph is acyclic: every module of specedit imports only modules below it.

Read from the source (module-level imports, those under `if TYPE_CHECKING:` included; imports inside functions
are deferred on purpose and left out), so a cycle hidden behind TYPE_CHECKING fails here too."""

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "engine"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ENGINE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The engine modules `path` imports at module level (relative imports: the engine's own)."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    if name == "":
        package = []
    found: set[str] = set()

    def walk(nodes):
        for node in nodes:
            if isinstance(node, ast.If):
                walk(node.body + node.orelse)
            elif isinstance(node, ast.Try):
                walk(node.body + [s for h in node.handlers for s in h.body] + node.orelse + node.finalbody)
            elif isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - (node.level - 1)]
                if node.module:
                    found.add(".".join(base + node.module.split(".")))
                else:
                    found.update(".".join(base + [a.name]) for a in node.names)

    walk(ast.parse(path.read_text()).body)
    return found - {name}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path of module names, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_engine_import_graph_is_acyclic():
    graph = {module_name(p): imports(p) for p in ENGINE.rglob("*.py")}
    assert {"scheduler", "api", "acceptance", "draft_policy"} <= set(graph) and "cache" in graph["scheduler"]
    assert cycle(graph) is None, " -> ".join(cycle(graph))

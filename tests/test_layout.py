"""The package layout rules hold in the source: no import circles, and the sides never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports: at the top, inside a function (lazy) or under ``if TYPE_CHECKING:``.
    A circle hidden by a lazy or a type-only import is still a circle between two modules' ideas."""
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


PACKAGES = ("common", "client", "server", "simulations", "conf")


def _graph(*packages: str) -> dict[str, set[str]]:
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts): p
               for package in packages for p in (ROOT / package).rglob("*.py")}
    modules = {name.removesuffix(".__init__"): path for name, path in modules.items()}
    return {name: _imports(path) & set(modules) - {name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_data_package_has_no_import_circle() -> None:
    graph = _graph("common/data")
    assert "common.data.sites" in graph["common.data.registry"]  # lazy and top-level imports are read
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_common_has_no_import_circle() -> None:
    """The trainer takes DP's step as a collaborator: common.train never imports common.privacy."""
    graph = _graph("common")
    assert not any(name.startswith("common.privacy") for name in graph["common.train.engine"])
    assert "common.privacy.step" in graph["common.privacy.wiring"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_no_package_has_an_import_circle_lazy_and_type_only_imports_included() -> None:
    graph = _graph(*PACKAGES)
    assert "client.private_round" in graph["client.training_round"]  # a lazy import is read
    assert "common.train.engine" in graph["common.privacy.step"]  # a TYPE_CHECKING import is read
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_a_circle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_sides_never_import_each_other_and_common_imports_neither() -> None:
    graph = _graph(*PACKAGES)
    forbidden = {"client": ("server", "simulations"), "server": ("client", "simulations"),
                 "common": ("client", "server", "simulations")}
    crossings = sorted(f"{module} -> {target}" for module, targets in graph.items() for target in targets
                       if target.split(".")[0] in forbidden.get(module.split(".")[0], ()))
    assert crossings == []

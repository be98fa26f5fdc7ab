"""The pipeline's modules import each other without a circle, counting imports inside functions too (a lazy import
hides a circle from Python, not from a reader): each module stands above everything it imports."""

from __future__ import annotations

import ast

from tests.helpers.dist import REPO


def _module(path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(package: str = "pretrain") -> dict[str, set[str]]:
    files = sorted((REPO / package).rglob("*.py"))
    mods = {_module(f): f for f in files}
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                # the longest module of the package the name denotes (from pkg import submodule counts as submodule)
                target = next((n[:i] for i in sorted({len(n)} | {j for j, c in enumerate(n) if c == "."},
                                                     reverse=True) if n[:i] in mods), None)
                if target and target != m and not m.startswith(target + "."):
                    graph[m].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_pretrain_has_no_import_circle():
    graph = import_graph("pretrain")
    assert "pretrain.checkpoint.manager" in graph and graph["pretrain.checkpoint.verify"] >= {
        "pretrain.checkpoint.tags", "pretrain.checkpoint.ds_recovery"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None

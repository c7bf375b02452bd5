"""The import graph of `runner/`: no circle, and no arrow from a lower layer to a higher one.

Read from the source with `ast` (nothing is imported, no Ray starts), so a new arrow fails here
and names the file that draws it. Three sorts of import are told apart:

- module-level imports run when the module is imported: they are the arrows a circle is made
  of (importing `a.b.c` also runs the packages `a` and `a.b`, so those count too);
- imports under `if TYPE_CHECKING:` run never, but still say what a module knows about;
- imports inside a function run when it is called (kept lazy for start-up time: Ray, pandas,
  matplotlib); they are arrows all the same.

The layer rules count all three: a lower layer that names a higher one, even for a type or
lazily, is the coupling the layers exist to prevent.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import runner

RUNNER = Path(runner.__file__).parent

# the seam and the scheduler's request: below both backends, the executor and every kind
CORE = (
    "runner.scheduler",
    "runner.lease",
    "runner.calls",
    "runner.verdicts",
    "runner.kind",
    "runner.backend",
)
ABOVE_CORE = ("runner.backends", "runner.stages", "runner.executor", "runner.cli")
BACKENDS = ("runner.backends",)
ABOVE_BACKENDS = ("runner.stages", "runner.cli")
REGISTRY = "runner.stages.registry"
# who may read the kinds' registry: the CLI hands the kinds to execute() and simulate()
READS_REGISTRY = ("runner.cli",)


@dataclass
class Imports:
    """What one module imports: runner modules it names, and top-level outside packages."""

    runtime: set[str] = field(default_factory=set)
    typing: set[str] = field(default_factory=set)
    deferred: set[str] = field(default_factory=set)
    outside: set[str] = field(default_factory=set)

    def every(self) -> set[str]:
        return self.runtime | self.typing | self.deferred


def _modules(root: Path = RUNNER) -> dict[str, tuple[Path, bool]]:
    """Every module of the package by dotted name, with its file and whether it is a package."""
    found = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        if package:
            parts.pop()
        found[".".join(parts)] = (path, package)
    return found


def _within(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


class _Reader(ast.NodeVisitor):
    """The imports of one module, sorted by when they run."""

    def __init__(self, name: str, package: bool) -> None:
        self.here = name if package else name.rpartition(".")[0]
        self.found: dict[str, set[str]] = {"runtime": set(), "typing": set(), "deferred": set()}
        self.when = "runtime"

    def _into(self, when: str, nodes: Iterable[ast.AST]) -> None:
        before, self.when = self.when, when
        for node in nodes:
            self.visit(node)
        self.when = before

    def visit_If(self, node: ast.If) -> None:
        if "TYPE_CHECKING" in ast.unparse(node.test):
            self._into("typing", node.body)
            self._into(self.when, node.orelse)
        else:
            self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._into("deferred" if self.when == "runtime" else self.when, node.body)

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Import(self, node: ast.Import) -> None:
        self.found[self.when].update(a.name for a in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.here
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        # `from a import b`: b may be a module of a or a name in it; resolved below
        self.found[self.when].update(f"{base}.{a.name}" for a in node.names)


def _resolve(name: str, modules: Mapping[str, object]) -> str | None:
    """The module a dotted import name lands in (its longest prefix that is a module)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path = RUNNER) -> dict[str, Imports]:
    """Each module of the package and what it imports."""
    modules = _modules(root)
    graph = {}
    for name, (path, package) in modules.items():
        reader = _Reader(name, package)
        reader.visit(ast.parse(path.read_text(), str(path)))
        imports = Imports()
        for when, names in reader.found.items():
            into: set[str] = getattr(imports, when)
            for dotted in names:
                top = dotted.split(".")[0]
                if top != root.name:
                    imports.outside.add(top)
                    continue
                target = _resolve(dotted, modules)
                if target is None or target == name:
                    continue
                into.add(target)
                if when == "runtime":  # importing a.b.c first runs packages a and a.b
                    mine = {name, *_ancestors(name)}
                    into.update(a for a in _ancestors(target) if a not in mine)
        graph[name] = imports
    return graph


def find_cycle(edges: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One circle of the graph as its modules in order (the first repeated at the end), or
    None when it has none."""
    done: set[str] = set()
    for start in sorted(edges):
        if start in done:
            continue
        path, on_path = [start], {start}
        todo = [iter(sorted(edges[start]))]
        while todo:
            nxt = next(todo[-1], None)
            if nxt is None:  # all of the module's imports walked: no circle through it
                finished = path.pop()
                on_path.discard(finished)
                done.add(finished)
                todo.pop()
            elif nxt in on_path:
                return [*path[path.index(nxt) :], nxt]
            elif nxt not in done:
                path.append(nxt)
                on_path.add(nxt)
                todo.append(iter(sorted(edges.get(nxt, ()))))
    return None


GRAPH = import_graph()


def _arrows(frm: Iterable[str], to: Iterable[str]) -> list[str]:
    """Every import from a module within `frm` of a module within `to`."""
    frm, to = tuple(frm), tuple(to)
    return sorted(
        f"{name} imports {target}"
        for name, imports in GRAPH.items()
        if _within(name, frm)
        for target in imports.every()
        if _within(target, to)
    )


def test_the_graph_is_read() -> None:
    """The reader finds the package and what it imports (else every rule below holds by
    reading nothing)."""
    assert len(GRAPH) > 50
    executor = GRAPH["runner.executor"]
    assert {"runner.verdicts", "runner.backend", "runner.scheduler.core"} <= executor.runtime
    assert "runner.kind" in GRAPH["runner.lease"].typing
    assert "ray" in GRAPH["runner.backends.ray"].outside
    assert "runner.scheduler" in GRAPH["runner.lease"].runtime  # the package of its import


def test_find_cycle_names_the_modules_of_a_circle() -> None:
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b", "c"], "b": ["c"], "c": []}) is None


def test_no_import_circle() -> None:
    cycle = find_cycle({name: imports.runtime for name, imports in GRAPH.items()})
    assert cycle is None, "import circle: " + " -> ".join(cycle or ())


def test_the_core_names_no_backend_kind_executor_or_cli() -> None:
    arrows = _arrows(CORE, ABOVE_CORE)
    assert arrows == [], "a lower layer names a higher one:\n" + "\n".join(arrows)


def test_the_backends_name_no_kind_or_cli() -> None:
    arrows = _arrows(BACKENDS, ABOVE_BACKENDS)
    assert arrows == [], "a backend names a kind or the CLI:\n" + "\n".join(arrows)


def test_the_executor_names_neither_ray_nor_a_kind() -> None:
    assert "ray" not in GRAPH["runner.executor"].outside, "runner.executor imports ray"
    arrows = _arrows(["runner.executor"], ["runner.stages"])
    assert arrows == [], "the executor names a kind:\n" + "\n".join(arrows)


def test_only_the_cli_reads_the_kinds_registry() -> None:
    readers = sorted(
        name
        for name, imports in GRAPH.items()
        if REGISTRY in imports.every() and not _within(name, [REGISTRY])
    )
    assert readers == list(READS_REGISTRY), f"the kinds' registry is read by {readers}"

"""The architecture, checked from the source with `ast` (nothing is imported): no module of `cut` or
`benchmarks` reaches into another module's private names, and the module-level import graph has no
cycle. A helper two modules need is public in the lower one (issue 21)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cut", "benchmarks")

# (importing module, "module.name") pairs tolerated for now, each with its reason; none today
ALLOWED_PRIVATE: set[tuple[str, str]] = set()


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = module_files()


def target(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute name of what `from ... import` reads from."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(module: str, path: Path) -> Iterator[tuple[int, str]]:
    """(line, "other.module._name") for each private name of another module that `module` imports
    (`from m import _x`) or reads as an attribute of an imported module (`m._x`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bound: dict[str, str] = {}  # local name -> the module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = target(module, path, node)
            for alias in node.names:
                if f"{source}.{alias.name}" in MODULES:
                    bound[alias.asname or alias.name] = f"{source}.{alias.name}"
                elif source in MODULES and source != module and is_private(alias.name):
                    yield node.lineno, f"{source}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    name = alias.asname or alias.name.split(".")[0]
                    bound[name] = alias.name if alias.asname else name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr) and isinstance(node.value, ast.Name):
            other = bound.get(node.value.id)
            if other is not None and other != module:
                yield node.lineno, f"{other}.{node.attr}"


def module_imports(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The imports that run when the module loads: top level, inside if / try, but not under
    `if TYPE_CHECKING:` and not inside functions (lazy imports are how a cycle is broken)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                yield from module_imports(node.body)
            yield from module_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from module_imports(block)


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of the packages it imports at load time."""
    graph = {}
    for module, path in MODULES.items():
        deps = set()
        for node in module_imports(ast.parse(path.read_text(encoding="utf-8")).body):
            if isinstance(node, ast.ImportFrom):
                source = target(module, path, node)
                for alias in node.names:
                    if f"{source}.{alias.name}" in MODULES:
                        deps.add(f"{source}.{alias.name}")
                    elif source in MODULES:
                        deps.add(source)
            else:
                deps.update(alias.name for alias in node.names if alias.name in MODULES)
        deps.discard(module)
        graph[module] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_modules_found():
    assert (
        "cut.training.loss" in MODULES and "cut.evaluation.aspects" in MODULES and "benchmarks.run" in MODULES
    )


def test_no_private_names_across_modules():
    found = {(m, name): line for m, p in MODULES.items() for line, name in private_uses(m, p)}
    bad = sorted(
        f"{MODULES[m].relative_to(ROOT)}:{line} uses {name}"
        for (m, name), line in found.items()
        if (m, name) not in ALLOWED_PRIVATE
    )
    assert not bad, "private names used across modules (make the helper public):\n" + "\n".join(bad)
    stale = ALLOWED_PRIVATE - set(found)
    assert not stale, f"allow-list entries no longer needed, remove them: {sorted(stale)}"


def test_private_use_is_detected(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(
        "from cut.training.loss import _hidden\nfrom cut.data import pairs\nimport cut.data.records as r\npairs._fit()\nr._x\n"
    )
    assert sorted(private_uses("cut.probe", path)) == [
        (1, "cut.training.loss._hidden"),
        (4, "cut.data.pairs._fit"),
        (5, "cut.data.records._x"),
    ]


def test_import_graph_has_no_cycle():
    graph = import_graph()
    assert graph["cut.judges.judge"] >= {"cut.errors", "cut.data.files"}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_is_detected():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# the parts of cut, each a package; beside them at most 8 top-level modules
PACKAGES_OF_CUT = {
    "data", "modeling", "training", "llm", "judges", "tasks", "methods", "loop",
    "evaluation", "analysis", "recipes", "resources",
}  # fmt: skip
MAX_TOP_LEVEL_MODULES = 8


def test_cut_is_laid_out_by_part():
    top = sorted(p.name for p in (ROOT / "cut").glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, f"{len(top)} top-level modules in cut/: {top}"
    packages = {p.name for p in (ROOT / "cut").iterdir() if (p / "__init__.py").is_file()}
    assert packages == PACKAGES_OF_CUT


def test_every_module_imports_absolutely():
    """Absolute imports only: a module runs the same under its old path (cut.MOVED) as under its own."""
    relative = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for module, path in MODULES.items()
        if module.startswith("cut")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom) and node.level
    ]
    assert not relative, relative


# the parts in import order: a module imports only from its own part and the parts before it
PART_ORDER = [
    "errors", "args", "resources", "data", "modeling", "training", "llm", "tasks", "judges",
    "methods", "evaluation", "loop", "analysis", "recipes", "cli", "__init__",
]  # fmt: skip


def part_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "cut":
        return None
    return "__init__" if len(parts) == 1 else parts[1].removesuffix(".py")


def test_parts_import_in_one_direction():
    graph = import_graph()
    assert set(PART_ORDER) >= {part_of(m) for m in graph if part_of(m)}
    upward = sorted(
        f"{m} imports {d}"
        for m, deps in graph.items()
        if part_of(m)
        for d in deps
        if part_of(d) and PART_ORDER.index(part_of(d)) > PART_ORDER.index(part_of(m))
    )
    assert not upward, "a part imports one after it (README: Layout):\n" + "\n".join(upward)

"""fmaml's modules import one another without a cycle.

The graph is read from the source with `ast`, not from what an import happens to execute, and counts:
- every `import` and `from ... import`, at module level or inside a function: a lazy import that closes a
  cycle only hides it until the function runs, and the two modules still cannot be understood apart;
- a string that is exactly a dotted path into fmaml, to a module or to a name defined in one (a
  `class_path` LightningCLI imports, a lazy `importlib.import_module` target): the import happens at run
  time, but the dependency is the same. A string such as the name "fmaml.Checkpoint", which no module
  defines, is only a name.

`from fmaml.data.specs import X` is an edge to fmaml.data.specs only: importing a submodule also runs its
package's `__init__`, but that is Python's mechanics, not a dependency of the importer on the package.
"""

from __future__ import annotations

import ast
import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "fmaml"
DOTTED_PATH = re.compile(r"fmaml(\.\w+)+")


def module_names(package: pathlib.Path = PACKAGE) -> dict[str, pathlib.Path]:
    """'fmaml.data.specs' -> its file, for every module and package under `package`."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def owner(dotted: str, modules: dict[str, pathlib.Path]) -> str | None:
    """The module a dotted name lives in: itself when it is a module, else the longest module prefix."""
    while dotted and dotted not in modules:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every dotted name the module imports or names by string, absolute (relative imports resolved)."""
    here = module.split(".") if is_package else module.split(".")[:-1]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            # `from fmaml.data import specs` imports the module fmaml.data.specs, and the package for names.
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and DOTTED_PATH.fullmatch(node.value)
        ):
            names.add(node.value)
    return names


def defined_names(tree: ast.Module) -> set[str]:
    """The names a module defines at its top level (functions, classes, assignments, imports)."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).partition(".")[0] for alias in node.names)
    return names


def import_graph(package: pathlib.Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the fmaml modules it depends on (itself left out)."""
    modules = module_names(package)
    trees = {module: ast.parse(path.read_text(), filename=str(path)) for module, path in modules.items()}

    def depends_on(name: str) -> str | None:
        module = owner(name, modules)
        rest = name[len(module) + 1 :] if module else ""
        # A module, or a name it defines (`from fmaml.data import MetaDataModule`: the package's name).
        if module is None or (rest and rest.partition(".")[0] not in defined_names(trees[module])):
            return None
        return module

    graph = {}
    for module, tree in trees.items():
        names = imported_names(tree, module, modules[module].name == "__init__.py")
        graph[module] = {m for m in map(depends_on, names) if m is not None and m != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None: a depth-first search that stops at the first back edge."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for successor in sorted(graph.get(node, ())):
            if state.get(successor) == "open":
                return [*path[path.index(successor) :], successor]
            if successor not in state and (cycle := visit(successor)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_fmaml_has_no_import_cycle():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle among fmaml's modules: " + " -> ".join(cycle)


def test_the_graph_sees_lazy_imports_and_class_paths(tmp_path):
    # The rules above, on a package made to break each: the test must not pass because it looked away.
    package = tmp_path / "fmaml"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from fmaml.b import g\n")
    (package / "b.py").write_text("PATH = 'fmaml.sub.c.Thing'\nNAME = 'fmaml.a.Undefined'\ndef g(): pass\n")
    (package / "sub" / "c.py").write_text("from .. import a\nclass Thing: pass\n")
    graph = import_graph(package)
    assert graph["fmaml.a"] == {"fmaml.b"}
    assert graph["fmaml.b"] == {"fmaml.sub.c"}
    assert graph["fmaml.sub.c"] == {"fmaml.a"}
    assert find_cycle(graph) == ["fmaml.a", "fmaml.b", "fmaml.sub.c", "fmaml.a"]
    (package / "sub" / "c.py").write_text("import fmaml.sub\nclass Thing: pass\n")
    assert find_cycle(import_graph(package)) is None

"""The modules of `adnet_hf` import one another without a cycle, and through public names only.

Every import counts, also one inside a function or a TYPE_CHECKING block: a cycle there is still two modules that
cannot be understood (or split off) one without the other. `__init__.py`'s re-exports are the package's face, not a
dependency between modules, so they are left out of the graph.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "adnet_hf"


def module_name(path: Path) -> str:
    """`adnet_hf.x` for adnet_hf/x.py, `adnet_hf.sub` for adnet_hf/sub/__init__.py."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) for each name `path` imports from a module of the package; name None for `import module`."""
    package = module_name(path).split(".")
    return imports_of(ast.parse(path.read_text(), str(path)), package if path.name == "__init__.py" else package[:-1])


def imports_of(tree: ast.AST, package: list[str]) -> list[tuple[str, str | None]]:
    """`imported` for the syntax `tree` of a module of `package` (its dotted name, split): every import in it,
    however deep, that resolves to the package."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            # `from package import submodule` imports the submodule
            found += [
                (f"{module}.{alias.name}", None) if f"{module}.{alias.name}" in MODULES else (module, alias.name)
                for alias in node.names
            ]
    return [(module, name) for module, name in found if module.partition(".")[0] == PACKAGE.name]


def import_graph() -> dict[str, set[str]]:
    """Each module's intra-package imports; `__init__.py` files import nothing here."""
    return {
        name: {module for module, _ in imported(path) if module != name}
        for name, path in MODULES.items()
        if path.name != "__init__.py"
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` as the modules along it (the first repeated at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every path from it is explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            cycle = None if target in state else visit(target)
            if cycle:
                return cycle
        state[node] = "done"
        path.pop()
        return None

    return next(filter(None, (visit(node) for node in sorted(graph) if node not in state)), None)


def test_the_checks_see_every_import_and_cycles():
    source = """
from typing import TYPE_CHECKING
import torch
from . import units_adnet
from .. import elsewhere
if TYPE_CHECKING:
    from .engine_adnet import StepEngine

def f():
    from adnet_hf.exits_adnet import _hidden
    import adnet_hf.losses_adnet
"""
    assert set(imports_of(ast.parse(source), ["adnet_hf"])) == {
        ("adnet_hf.units_adnet", None),
        ("adnet_hf.engine_adnet", "StepEngine"),
        ("adnet_hf.exits_adnet", "_hidden"),
        ("adnet_hf.losses_adnet", None),
    }
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_name_is_imported_from_another_module():
    private = [
        f"{module_name(path)} imports {name} from {module}"
        for path in MODULES.values()
        for module, name in imported(path)
        if name and name.startswith("_") and not name.startswith("__")
    ]
    assert not private, "private names imported across modules:\n" + "\n".join(private)

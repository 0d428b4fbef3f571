"""The layering of docs/architecture.md, enforced: the import graph of src/catforge (built with
``ast``) has no edge outside the allowed-edges table, none of the refused module edges, and no
cycle."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "catforge"
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def _table(name: str) -> list[list[str]]:
    text = ARCHITECTURE.read_text()
    block = re.search(rf"<!-- {name}:start -->(.*?)<!-- {name}:end -->", text, re.S)
    assert block is not None, f"{ARCHITECTURE} has no {name} table"
    rows = [line.strip().strip("|").split("|") for line in block.group(1).strip().splitlines()]
    return [[cell.strip() for cell in row] for row in rows[2:]]  # without header and rule


def allowed_edges() -> dict[str, set[str]]:
    table = _table("allowed-edges")
    return {row[0]: {name.strip() for name in row[1].split(",")} - {"-"} for row in table}


def forbidden_edges() -> list[tuple[str, str]]:
    return [(row[0], row[1]) for row in _table("forbidden-edges")]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, *, typing_only: bool = True) -> set[str]:
    """The catforge modules ``path`` imports (absolute names; ``from a import b`` counts ``a.b``
    when ``a.b`` is a module, else ``a``); ``typing_only=False`` leaves out the imports under
    ``if TYPE_CHECKING:`` (they never run, so they make no cycle)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    skipped = set() if typing_only else _type_checking_nodes(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
    return {module for module in found if module.split(".")[0] == "catforge"} - {name}


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in (
            "TYPE_CHECKING",
            "typing.TYPE_CHECKING",
        ):
            guarded |= {id(child) for statement in node.body for child in ast.walk(statement)}
    return guarded


MODULES = {module_name(path) for path in PACKAGE.rglob("*.py")}


def graph(*, typing_only: bool = True) -> dict[str, set[str]]:
    """Module -> the catforge modules it imports."""
    return {
        module_name(path): imports(path, typing_only=typing_only) for path in PACKAGE.rglob("*.py")
    }


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "catforge"


def test_every_package_is_in_the_table() -> None:
    table = allowed_edges()
    packages = {layer(module) for module in MODULES} - {"catforge"}
    assert packages <= set(table), f"packages missing in the table: {packages - set(table)}"


def test_no_import_outside_the_allowed_edges() -> None:
    table = allowed_edges()
    bad = [
        f"{importer} -> {imported}"
        for importer, targets in graph().items()
        for imported in targets
        if layer(imported) not in (layer(importer), "catforge")
        and layer(imported)
        not in table.get(layer(importer), {"errors"} if layer(importer) == "errors" else set())
    ]
    assert not bad, "imports outside docs/architecture.md's allowed edges:\n" + "\n".join(bad)


def test_no_refused_module_edge() -> None:
    edges = graph()
    bad = [
        f"{importer} -> {imported}"
        for importer, targets in edges.items()
        for imported in targets
        for refused_from, refused in forbidden_edges()
        if layer(importer) == refused_from and imported == f"catforge.{refused}"
    ]
    assert not bad, "refused imports:\n" + "\n".join(bad)


def test_no_import_cycle() -> None:
    edges = graph(typing_only=False)
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the stack, 2 done
    stack: list[str] = []
    cycles: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(edges.get(module, ())):
            if state[target] == 1:
                cycles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif state[target] == 0:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(edges):
        if state[module] == 0:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_a_bad_edge(tmp_path: Path) -> None:
    """The checker itself: a relative and an absolute import resolve to catforge modules."""
    path = PACKAGE / "models" / "schnet.py"
    assert "catforge.models.layers" in imports(path)
    assert all(module.startswith("catforge") for module in imports(path))

"""The package's folders are its architecture: each subpackage imports only the layers below it
(lib/profilerec/*/__init__.py says which), and no module imports itself back through a cycle."""

import ast
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "lib" / "profilerec"
MAY_IMPORT = {
    "base": set(),  # config.py, errors.py
    "data": {"base"},
    "model": {"base", "data"},
    "runtime": {"base", "data"},
    "batch": {"base", "data", "model", "runtime"},
    "training": {"base", "data", "model", "runtime"},
    "service": {"base", "data", "model"},
    "cli": {"base", "data", "model", "runtime", "batch", "training", "service"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(LIB.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in MAY_IMPORT) else "base"


def imports() -> dict[str, set[str]]:
    """Every module of the package and the package modules it imports (at any depth of the file)."""
    found = {}
    for path in LIB.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("profilerec"):
                names.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names if a.name.startswith("profilerec"))
        found[module_name(path)] = names
    # "from profilerec.data import storage" names a module; "from profilerec.data.schema import Event" does not
    return {m: {n if n in found else n.rsplit(".", 1)[0] for n in names} for m, names in found.items()}


def test_every_subpackage_imports_only_the_layers_below_it():
    assert set(MAY_IMPORT) - {"base"} <= {p.name for p in LIB.iterdir() if (p / "__init__.py").exists()}
    wrong = sorted(f"{m} imports {n}" for m, names in imports().items() for n in names
                   if layer(n) != layer(m) and layer(n) not in MAY_IMPORT[layer(m)] and m != "profilerec.__main__")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_itself_through_a_cycle():
    graph = imports()
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(module, ())):
            if nxt == path[0]:
                cycles.append(" -> ".join(path + [nxt]))
            elif nxt not in path and nxt in graph and len(path) < 12 and nxt > path[0]:
                visit(nxt, path + [nxt])

    for start in sorted(graph):
        visit(start, [start])
    assert not cycles, "\n".join(cycles)

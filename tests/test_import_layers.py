"""Imports flow one way: core <- pruning <- batched <- experiments <- reporting <- cli, and the modules of one
layer import each other without cycles, counting every import: at the top, inside a function, or for type checking
only (a cycle hidden in a function is still two modules that each need the other)."""

import ast
from pathlib import Path

import eigenprune

ROOT = Path(eigenprune.__file__).parent
LAYERS = ["core", "pruning", "batched", "experiments", "reporting", "cli"]
MODULES = {".".join(p.relative_to(ROOT).with_suffix("").parts) for p in ROOT.rglob("*.py")}
"""Dotted names below `eigenprune.`; a package's face is its `__init__` module (e.g. "pruning.__init__")."""


def _module(name: str) -> str:
    """A dotted name as one of MODULES: a package stands for its `__init__`."""
    return f"{name}.__init__" if f"{name}.__init__" in MODULES else name


def _imports(module: str) -> set[str]:
    """The eigenprune modules (dotted, below `eigenprune.`) that `module` imports anywhere in it."""
    found = set()
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("eigenprune."):
            base = node.module.removeprefix("eigenprune.")
            found |= {_module(f"{base}.{a.name}") if _module(f"{base}.{a.name}") in MODULES else _module(base) for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {_module(a.name.removeprefix("eigenprune.")) for a in node.names if a.name.startswith("eigenprune.")}
    return found


def _layer(module: str) -> int | None:
    top = module.split(".")[0]
    return LAYERS.index(top) if top in LAYERS else None


def test_no_module_imports_a_layer_above_its_own():
    wrong = [(m, i) for m in sorted(MODULES) for i in sorted(_imports(m))
             if _layer(m) is not None and _layer(i) is not None and _layer(i) > _layer(m)]
    assert wrong == []


def test_modules_of_one_layer_import_each_other_without_cycles():
    graph = {m: {i for i in _imports(m) if i.split(".")[0] == m.split(".")[0] and i != m} for m in MODULES}
    assert graph["experiments.runner"] >= {"experiments.grid", "experiments.measure", "experiments.plan"}
    assert graph["pruning.prune"] >= {"pruning.chain", "pruning.graph", "pruning.keep"}
    assert "core.convert" in _imports("pruning.export")  # an import inside a function counts
    done: set[str] = set()
    active: list[str] = []

    def visit(m: str) -> None:
        assert m not in active, f"import cycle: {' -> '.join([*active[active.index(m):], m])}"
        if m not in done:
            active.append(m)
            for i in sorted(graph.get(m, ())):
                visit(i)
            active.pop()
            done.add(m)

    for m in sorted(graph):
        visit(m)

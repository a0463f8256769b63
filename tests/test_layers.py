"""The import contract of recvae/: imports run one way, down the layers below, with no circle;
the library never imports the command line. Read from the source with ``ast`` (module-level
imports and those inside functions alike), so nothing is imported to check it."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "recvae"

#: The layers, lowest first. A module may import its own layer and those below, never one above.
#: ``X.*`` stands for every module under the package X (e.g. ``recvae.tuning.*`` holds a future
#: ``recvae/tuning/`` package's modules, as ``recvae.tuning`` holds tuning.py or its __init__).
LAYERS: list[tuple[str, set[str]]] = [
    ("foundations", {"recvae", "recvae.errors", "recvae.fileio", "recvae.locking", "recvae.dbcheck", "recvae.optional", "recvae.progress",
                     "recvae.signals"}),
    ("data", {"recvae.data", "recvae.data.*"}),
    ("numerics", {"recvae.ranking", "recvae.metrics", "recvae.distributed"}),  # the training loop uses both
    ("models", {"recvae.models", "recvae.models.*"}),
    ("evaluation", {"recvae.evaluation", "recvae.plots"}),
    ("settings", {"recvae.settings"}),  # a run's settings: the rules across them, run.json's description
    ("runs", {"recvae.rundir"}),
    ("recommendation", {"recvae.recommend", "recvae.recommend_files", "recvae.recommend_parts"}),
    ("workflows", {"recvae.experiment", "recvae.refit", "recvae.tuning", "recvae.tuning.*", "recvae.serve", "recvae.serve.*"}),
    ("command line", {"recvae.cli", "recvae.cli.*", "recvae.launch", "recvae.__main__"}),
]
COMMAND_LINE = LAYERS[-1][0]


@dataclass(frozen=True)
class Import:
    importer: str  # module name
    imported: str  # module name (``from pkg import sub`` resolved to the submodule)
    where: str  # recvae/x.py:LINE
    module_level: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(name: str, path: Path, known: set[str]) -> list[Import]:
    """The recvae imports of module ``name`` (its source at ``path``); ``module_level`` is False
    inside a function (or an ``if TYPE_CHECKING:`` block), where the import runs later or never."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    shown = name.replace(".", "/") + ("/__init__.py" if is_package else ".py")
    found: list[Import] = []

    def add(target: str, node: ast.AST, module_level: bool) -> None:
        if target == "recvae" or target.startswith("recvae."):
            found.append(Import(name, target, f"{shown}:{node.lineno}", module_level))

    def visit(node: ast.AST, module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = module_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.If) and _is_type_checking(child):
                inner = False
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, child, module_level)
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: from its package
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - child.level + 1]
                    source = ".".join(base + ([child.module] if child.module else []))
                else:
                    source = child.module or ""
                for alias in child.names:  # `from recvae import metrics` imports recvae.metrics
                    sub = f"{source}.{alias.name}"
                    add(sub if sub in known else source, child, module_level)
            visit(child, inner)

    visit(tree, True)
    return list(dict.fromkeys(found))  # `from m import a, b`: one import of m


MODULES = all_modules()
IMPORTS = [i for name, path in MODULES.items() for i in imports_of(name, path, set(MODULES))]


def layer_of(module: str) -> int | None:
    for rank, (_, members) in enumerate(LAYERS):
        for m in members:
            if module == m or (m.endswith(".*") and module.startswith(m[:-1])):
                return rank
    return None


def test_the_imports_were_read():
    """The parse sees what is known to be there (a guard against a contract that checks nothing)."""
    pairs = {(i.importer, i.imported, i.module_level) for i in IMPORTS}
    assert ("recvae.evaluation", "recvae.metrics", True) in pairs  # `from recvae import metrics as M`
    assert any(not module_level for *_, module_level in pairs)  # imports inside functions are read too
    assert ("recvae.models.base", "recvae.models.params", True) in pairs
    assert len(MODULES) > 40 and len(IMPORTS) > 150


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if layer_of(m) is None)
    assert not missing, (
        f"module(s) {missing} are in no layer: put it in a layer of tests/test_layers.py (LAYERS, lowest "
        "first), the lowest whose modules are all it needs"
    )


def test_the_library_never_imports_the_command_line():
    wrong = [i for i in IMPORTS if (i.imported == "recvae.cli" or i.imported.startswith("recvae.cli."))
             and LAYERS[layer_of(i.importer) or 0][0] != COMMAND_LINE]
    assert not wrong, "\n".join(f"{i.where}: {i.importer} imports {i.imported}: only the command line may" for i in wrong)


def test_no_import_runs_up_a_layer():
    up = []
    for i in IMPORTS:
        mine, theirs = layer_of(i.importer), layer_of(i.imported)
        if mine is not None and theirs is not None and theirs > mine:
            up.append(f"{i.where}: {i.importer} ({LAYERS[mine][0]}) imports {i.imported} ({LAYERS[theirs][0]}), "
                      "a layer above it")
    assert not up, "\n".join(up)


def test_models_import_nothing_above_them():
    """Spelled out, as the issue asks: the estimators know nothing of runs, workflows or the CLI."""
    models = layer_of("recvae.models")
    above = [i for i in IMPORTS if layer_of(i.importer) == models and (layer_of(i.imported) or 0) > models]
    assert not above, "\n".join(f"{i.where}: {i.importer} imports {i.imported}" for i in above)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module, or a module importing itself
    (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def strongconnect(root: str) -> None:
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in edges.get(node, ()):
                        out.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            strongconnect(node)
    return out


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}, "b": set()}) == [["a"]]
    assert cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_circle():
    edges: dict[str, set[str]] = {}
    for i in IMPORTS:
        if i.module_level and i.imported != i.importer:
            edges.setdefault(i.importer, set()).add(i.imported)
    found = cycles(edges)
    lines = []
    for component in found:
        members = set(component)
        lines += [f"{i.where}: {i.importer} imports {i.imported}" for i in IMPORTS
                  if i.module_level and i.importer in members and i.imported in members]
    assert not found, f"import circle(s) among {found}:\n" + "\n".join(lines)


@pytest.mark.parametrize("source, expected", [
    ("from recvae.models import params, make_model\n", {"recvae.models.params", "recvae.models"}),
    ("from . import base\nfrom .vae import MultVAE\n", {"recvae.models.base", "recvae.models.vae"}),
    ("def f():\n    import recvae.cli\n", {"recvae.cli"}),  # inside a function too
])
def test_imports_are_resolved_to_modules(tmp_path, source, expected):
    probe = tmp_path / "_probe.py"
    probe.write_text(source)
    found = imports_of("recvae.models._probe", probe, set(MODULES))
    assert {i.imported for i in found} == expected
    assert {i.where for i in found} <= {f"recvae/models/_probe.py:{n}" for n in (1, 2)}

"""The import graph of ``src/clipad`` has no cycles, never points up the layers, and keeps
argparse in ``clipad/cli/``. Read from the source with ``ast`` (nothing is imported), so a lazy
import inside a function counts as much as one at the top of a module.

Layers, lowest first (docs/architecture.md draws them)::

    errors, version, _compat
    checkpoint, data
    backbones
    components
    methods
    api, convert
    eval
    train, serve, deploy, distributed
    cli

A module may import modules of its own package (any layer) and of strictly lower layers;
packages that share a layer do not import each other. The package root ``clipad/__init__.py``
is the public API and may import anything below ``cli``; ``__main__.py`` files are entry points
above every layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import clipad

SRC = Path(clipad.__file__).parent

LAYERS: list[tuple[str, ...]] = [
    ("errors", "version", "_compat"),
    ("checkpoint", "data"),
    ("backbones",),
    ("components",),
    ("methods",),
    ("api", "convert"),
    ("eval",),
    ("train", "serve", "deploy", "distributed"),
    ("cli",),
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Absolute names of the clipad modules ``path`` imports (lazy imports included)."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import submodule` depends on the submodule; `from pkg import name`, on pkg
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known]
            targets = subs + ([mod] if len(subs) < len(node.names) else [])
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t.startswith("clipad") and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def area(module: str) -> str:
    """'clipad.eval.metrics' -> 'eval'; 'clipad' -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def find_cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in g.items():
        if src == "clipad" or src.endswith("__main__"):
            continue
        a = area(src)
        if a not in RANK:
            bad.append(f"{src}: its area '{a}' has no layer in LAYERS (add it)")
            continue
        for t in sorted(targets):
            b = area(t)
            if t == "clipad":
                bad.append(f"{src} imports the package root (import the module that holds the name)")
            elif b != a and RANK.get(b, 99) >= RANK[a]:
                bad.append(f"{src} (layer {RANK[a]}: {a}) imports {t} (layer {RANK.get(b)}: {b})")
    return bad


def argparse_outside_cli() -> list[str]:
    bad = []
    for name, path in modules().items():
        if area(name) == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) else [])
            if any((n or "").split(".")[0] == "argparse" for n in names):
                bad.append(name)
    return bad


def test_no_import_cycles():
    cycles = find_cycles(graph())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_upward_imports():
    bad = upward_imports(graph())
    assert not bad, "imports against the layering rule:\n" + "\n".join(bad)


def test_argparse_only_in_cli():
    bad = argparse_outside_cli()
    assert not bad, f"argparse imported outside clipad/cli/: {bad}"


def test_every_area_has_a_layer():
    areas = {area(m) for m in modules()} - {""}
    assert areas <= set(RANK), f"areas without a layer: {sorted(areas - set(RANK))}"


# -- the checker itself catches what it must (a check that cannot fail proves nothing) --------


def test_checker_finds_a_cycle_and_an_upward_import():
    g = {"clipad.methods.base": {"clipad.eval.metrics"}, "clipad.eval.metrics": {"clipad.methods.base"}}
    assert find_cycles(g) == [["clipad.eval.metrics", "clipad.methods.base"]]
    assert upward_imports(g) == ["clipad.methods.base (layer 4: methods) imports clipad.eval.metrics (layer 6: eval)"]
    assert upward_imports({"clipad.train.loop": {"clipad.serve.app"}})  # same layer, other package


def test_checker_resolves_relative_and_lazy_imports(tmp_path):
    mod = tmp_path / "x.py"
    mod.write_text("def f():\n    from ..eval import metrics\n    from . import registry\n")
    known = {"clipad.eval", "clipad.eval.metrics", "clipad.methods.registry", "clipad.methods"}
    assert imports_of("clipad.methods.x", mod, known) == {"clipad.eval.metrics", "clipad.methods.registry"}
    mod.write_text("from ..eval import metrics, run_all\n")  # run_all: a name of the package, not a module
    assert imports_of("clipad.methods.x", mod, known) == {"clipad.eval", "clipad.eval.metrics"}


@pytest.mark.parametrize("layer", [n for names in LAYERS for n in names if n not in ("_compat",)])
def test_layer_names_exist(layer):
    assert (SRC / layer).is_dir() or (SRC / f"{layer}.py").is_file(), layer

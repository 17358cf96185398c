"""The import direction of `docs/architecture.md`, checked on the source with the standard library's `ast` (nothing
is imported, so a broken rule is found without jax or a GPU):

- nothing under rollout/, models/, data/, eval/ or play/ imports `decmem_jax.train`, at module level or inside a
  function (inference must not need the training code);
- models/ imports nothing from `decmem_jax.data`, `decmem_jax.convert` or `decmem_jax.train`;
- `decmem_jax.format` (the WorldMem clip format) imports nothing from decmem_jax but `decmem_jax.errors`, and the
  kernels under pallas_kernels/ nothing from decmem_jax;
- the module-level imports between decmem_jax modules have no cycle.

Imports inside functions are allowed to point sideways (e.g. rollout -> data) and are exempt from the cycle rule:
they run after every module has loaded. `test_checker_reports_*` run the checker on a synthetic tree, so a checker
that silently finds nothing fails too.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "decmem_jax"

# (importing packages, forbidden targets): a module under one of the first imports none of the second.
RULES = (
    (("rollout", "models", "data", "eval", "play"), ("train",)),
    (("models",), ("data", "convert", "train")),
)
LEAVES = {"format": {"errors"}}  # leaf module -> the decmem_jax modules it may import


@dataclass(frozen=True)
class Import:
    source: str  # dotted module that holds the import statement
    target: str  # dotted decmem_jax module (or name) imported
    line: int
    module_level: bool  # False inside a function (run on call, not on import)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _lazy_import_ids(tree: ast.AST) -> set[int]:
    """ids of import nodes that sit inside a function body (lazy imports)."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return inside


def imports_of(source: str, module: str, is_package: bool, package: str = PACKAGE) -> list[Import]:
    """Every import of a `package` module in `source` (the text of `module`), relative imports resolved. `from a
    import b` gives the target `a.b`, a submodule or a name defined in `a`: `resolve` tells which."""
    tree = ast.parse(source)
    lazy = _lazy_import_ids(tree)
    here = module.split(".") if is_package else module.split(".")[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" for a in node.names if a.name != "*"] or [mod]
        else:
            continue
        for t in targets:
            if t == package or t.startswith(package + "."):
                out.append(Import(module, t, node.lineno, id(node) not in lazy))
    return out


def collect(root: Path, package: str = PACKAGE) -> tuple[set[str], list[Import]]:
    """(every module of the package under `root`, every import of a package module in it)."""
    modules, found = set(), []
    for path in sorted((root / package).rglob("*.py")):
        name = module_name(path, root)
        modules.add(name)
        found += imports_of(path.read_text(), name, path.name == "__init__.py", package)
    return modules, found


def resolve(target: str, modules: set[str]) -> str:
    """The module a target names: itself if it is one, else the longest module prefix (`a.b.name` -> `a.b`)."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return target


def _under(module: str, sub: str, package: str) -> bool:
    prefix = f"{package}.{sub}"
    return module == prefix or module.startswith(prefix + ".")


def rule_violations(modules: set[str], found: list[Import], package: str = PACKAGE) -> list[str]:
    """One line per import statement that breaks RULES or LEAVES."""
    out = []
    for imp in found:
        target = resolve(imp.target, modules)
        out += [f"{imp.source}:{imp.line} imports {target} ({s}/ must not import {package}.{f})"
                for sources, forbidden in RULES for s in sources for f in forbidden
                if _under(imp.source, s, package) and _under(target, f, package)]
        out += [f"{imp.source}:{imp.line} imports {target} ({package}.{leaf} is a leaf: only {sorted(allowed)})"
                for leaf, allowed in LEAVES.items() if imp.source == f"{package}.{leaf}" and target != package
                and not any(_under(target, a, package) for a in allowed)]
    return list(dict.fromkeys(out))  # `from m import a, b` is one statement, one line


def module_graph(modules: set[str], found: list[Import]) -> dict[str, set[str]]:
    """module -> the package modules it imports at module level (the edges that run on import)."""
    graph = {m: set() for m in modules}
    for imp in found:
        target = resolve(imp.target, modules)
        if imp.module_level and target in modules and target != imp.source:
            graph[imp.source].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle [a, b, ..., a] of `graph`, or None (iterative DFS, white/grey/black colouring)."""
    colour = dict.fromkeys(graph, 0)
    for start in sorted(graph):
        if colour[start]:
            continue
        stack, path = [(start, iter(sorted(graph[start])))], [start]
        colour[start] = 1
        while stack:
            node, edges = stack[-1]
            nxt = next(edges, None)
            if nxt is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(nxt, 2) == 1:
                return path[path.index(nxt):] + [nxt]
            elif colour.get(nxt) == 0:
                colour[nxt] = 1
                stack.append((nxt, iter(sorted(graph[nxt]))))
                path.append(nxt)
    return None


# ----------------------------------------------------------------------------------------------------- the rules

def test_import_rules_hold():
    modules, found = collect(ROOT)
    assert f"{PACKAGE}.models.dit" in modules and found, "the checker found no modules or imports"
    assert rule_violations(modules, found) == []


def test_kernels_do_not_import_decmem_jax():
    found = [i for path in sorted((ROOT / "pallas_kernels").rglob("*.py"))
             for i in imports_of(path.read_text(), module_name(path, ROOT), path.name == "__init__.py")]
    assert found == []


def test_no_module_level_import_cycle():
    modules, found = collect(ROOT)
    assert find_cycle(module_graph(modules, found)) is None


# ---------------------------------------------------------------------------------- the checker finds violations

def _tree(tmp_path: Path, files: dict[str, str]) -> tuple[set[str], list[Import]]:
    for rel, text in files.items():
        p = tmp_path / PACKAGE / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return collect(tmp_path)


def test_checker_reports_lazy_import_of_train(tmp_path):
    modules, found = _tree(tmp_path, {
        "__init__.py": "", "train/__init__.py": "", "train/state.py": "X = 1\n", "rollout/__init__.py": "",
        "rollout/run.py": "def f():\n    from ..train.state import X\n    return X\n"})
    problems = rule_violations(modules, found)
    assert len(problems) == 1 and "decmem_jax.rollout.run:2 imports decmem_jax.train.state" in problems[0]


def test_checker_reports_models_importing_data_and_leaf_importing_models(tmp_path):
    modules, found = _tree(tmp_path, {
        "__init__.py": "", "format.py": "from decmem_jax.models import dit\n", "data/__init__.py": "",
        "data/pipeline.py": "", "models/__init__.py": "", "models/dit.py": "import decmem_jax.data.pipeline\n"})
    problems = rule_violations(modules, found)
    assert any("models.dit:1 imports decmem_jax.data.pipeline" in p for p in problems), problems
    assert any("decmem_jax.format:1 imports decmem_jax.models.dit" in p for p in problems), problems


def test_checker_finds_module_level_cycle_but_not_lazy_one(tmp_path):
    modules, found = _tree(tmp_path, {
        "__init__.py": "", "a.py": "from decmem_jax import b\n", "b.py": "from . import c\n",
        "c.py": "import decmem_jax.a\n", "d.py": "from decmem_jax import e\n",
        "e.py": "def f():\n    from decmem_jax import d\n"})
    cycle = find_cycle(module_graph(modules, found))
    assert cycle is not None and set(cycle) == {"decmem_jax.a", "decmem_jax.b", "decmem_jax.c"}, cycle
    without_c = [i for i in found if i.source != "decmem_jax.c"]
    assert find_cycle(module_graph(modules, without_c)) is None


def test_every_project_error_derives_from_the_one_base_class():
    """Each CLI catches DecMemError once; an exception class that does not derive from it would escape as a
    traceback. Found with ast (every `class ...Error(...)` under decmem_jax/), checked on the imported class."""
    import importlib

    from decmem_jax.errors import DecMemError

    found = []
    for path in sorted((ROOT / "decmem_jax").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error") and node.name != "DecMemError":
                module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
                found.append((module, node.name))
    assert len(found) >= 10, found
    escaping = [f"{m}.{n}" for m, n in found if not issubclass(getattr(importlib.import_module(m), n), DecMemError)]
    assert not escaping, f"not derived from decmem_jax.errors.DecMemError: {escaping}"

"""The architecture, checked: imports run one way (networks <- checkpoints/hub <- features and data <- index,
eval, train <- commands) and no module imports itself back through others, not even inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "feature_extraction", "ldot_cli")

# Lower layers first; a module may import its own layer and the layers before it, never a later one.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("models.core",),
    ("models.nn",),
    ("models.hub",),
    ("models.training",),
    ("models",),  # the package's face: re-exports the public API
    ("feature_extraction.errors", "feature_extraction.types"),
    ("feature_extraction.images", "feature_extraction.detector"),
    ("feature_extraction.uniter_db",),
    ("feature_extraction.pipeline",),
    ("feature_extraction",),
    ("ldot_cli.data",),
    ("ldot_cli.index", "ldot_cli.index.sources", "ldot_cli.index.shards", "ldot_cli.index.distributed",
     "ldot_cli.eval", "ldot_cli.train"),
    ("ldot_cli.serve",),
    ("ldot_cli.commands",),
    ("ldot_cli.main", "ldot_cli"),
)


def _modules() -> dict[str, Path]:
    if not (ROOT / "ldot_cli").is_dir():
        pytest.skip("needs the source tree")
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every project module ``name`` imports, at any depth of the file (function bodies too)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _layer(module: str) -> int:
    best, rank = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank >= 0, f"{module} belongs to no layer: add it to LAYERS"
    return rank


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def test_every_import_points_down_or_sideways():
    upward = [f"{a} -> {b}" for a, deps in sorted(_graph().items()) for b in sorted(deps)
              if _layer(b) > _layer(a) and not (a == "models" or a == "feature_extraction")]
    assert not upward, "imports that point up a layer:\n  " + "\n  ".join(upward)


def test_no_import_cycle():
    graph = _graph()
    # a package's __init__ re-exporting its children is not a cycle of code
    graph = {a: {b for b in deps if not (a.startswith(b + ".") and b in graph)} for a, deps in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_library_never_prints_nor_uses_the_terminal():
    offenders = []
    for name, path in _modules().items():
        if name.startswith("ldot_cli.commands") or name.startswith("ldot_cli.main"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{name}:{node.lineno} print()")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for mod in mods:
                    if mod.split(".")[0] in ("rich", "typer", "click"):
                        offenders.append(f"{name}:{node.lineno} imports {mod}")
    assert not offenders, "the library talks to the terminal:\n  " + "\n  ".join(offenders)


def test_library_messages_name_settings_not_flags():
    """The library names a setting with `models.core.errors.option(...)`; only the CLI spells flags. A flag may
    appear inside a whole suggested command in backquotes (`ldot models import FILE --as NAME`)."""
    import re

    flag = re.compile(r"(?<![\w`-])--[a-z][a-z0-9-]*")
    offenders = []
    for name, path in _modules().items():
        if name.startswith(("ldot_cli.commands", "ldot_cli.main")):
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        in_fstrings = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):  # the whole f-string, each {...} standing for a value
                text = "".join(part.value if isinstance(part, ast.Constant) else "{}" for part in node.values)
            elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                  and id(node) not in in_fstrings):
                text = node.value
            else:
                continue
            if flag.search(re.sub(r"`[^`]*`", "", text)):
                offenders.append(f"{name}:{node.lineno} {text[:70]!r}")
    assert not offenders, "flags spelled in library messages:\n  " + "\n  ".join(offenders)

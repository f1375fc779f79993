"""The architecture, checked: imports run one way (networks <- checkpoints/hub <- features and data <- index,
eval, train <- commands) and no module imports itself back through others, not even inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "feature_extraction", "ldot_cli")

# Lower layers first; a module may import the layers before its own and its own group, never a later layer nor a
# sibling group of its own layer (index, eval and train do not import one another). A layer is a tuple of groups,
# a group a tuple of module prefixes.
LAYERS: tuple[tuple[tuple[str, ...], ...], ...] = (
    (("models.core",),),
    (("models.nn",),),
    (("models.hub",),),
    (("models.training",),),
    (("models",),),  # the package's face: re-exports the public API (lazily: import_module strings are read too)
    (("feature_extraction.errors", "feature_extraction.types"),),
    (("feature_extraction.images", "feature_extraction.detector"),),
    (("feature_extraction.uniter_db",),),
    (("feature_extraction.pipeline",),),
    (("feature_extraction",),),
    (("ldot_cli.data",),),
    (("ldot_cli.index",), ("ldot_cli.eval",), ("ldot_cli.train",)),  # siblings: none imports another
    (("ldot_cli.serve",),),
    (("ldot_cli.commands",),),
    (("ldot_cli.main", "ldot_cli"),),
)
IMPORT_CALLS = ("import_module", "__import__")


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


def _called_module(node: ast.Call, package: list[str]) -> str | None:
    """The module an ``importlib.import_module("...")`` or ``__import__("...")`` call names as a literal (a
    relative name resolved against ``package=``: ``__name__``/``__package__`` or a literal), else None."""
    func = node.func
    called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    if called not in IMPORT_CALLS or not node.args:
        return None
    first = node.args[0]
    if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
        return None
    target = first.value
    if not target.startswith("."):
        return target
    anchor_node = node.args[1] if len(node.args) > 1 and called == "import_module" else next(
        (k.value for k in node.keywords if k.arg == "package"), None)
    if isinstance(anchor_node, ast.Constant) and isinstance(anchor_node.value, str):
        anchor = anchor_node.value.split(".")
    else:  # __name__ / __package__: this module's package
        anchor = list(package)
    level = len(target) - len(target.lstrip("."))
    anchor = anchor[: len(anchor) - (level - 1)]
    rest = target.lstrip(".")
    return ".".join([*anchor, rest] if rest else anchor)


def _imports(name: str, path: Path, known: set[str], text: str | None = None) -> set[str]:
    """Every project module ``name`` imports, at any depth of the file (function bodies too), with ``import``
    statements and with literal ``import_module``/``__import__`` calls."""
    is_package = path.name == "__init__.py"
    package = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    source = path.read_text() if text is None else text
    for node in ast.walk(ast.parse(source, str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        elif isinstance(node, ast.Call):
            called = _called_module(node, package)
            targets = [called] if called else []
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _place(module: str) -> tuple[int, int]:
    """(layer, group) of a module: its longest matching prefix decides."""
    best, place = -1, (-1, -1)
    for i, groups in enumerate(LAYERS):
        for j, prefixes in enumerate(groups):
            for prefix in prefixes:
                if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                    best, place = len(prefix), (i, j)
    assert best >= 0, f"{module} belongs to no layer: add it to LAYERS"
    return place


def _layer(module: str) -> int:
    return _place(module)[0]


def _graph(planted: dict[str, str] | None = None) -> dict[str, set[str]]:
    """Module -> the project modules it imports; ``planted``: module -> source text to read instead of its file."""
    modules = _modules()
    known = set(modules)
    planted = planted or {}
    return {name: _imports(name, path, known, planted.get(name)) for name, path in modules.items()}


def _wrong_way(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for a, deps in sorted(graph.items()):
        for b in sorted(deps):
            (la, ga), (lb, gb) = _place(a), _place(b)
            if lb > la:
                wrong.append(f"{a} -> {b} (up a layer)")
            elif lb == la and gb != ga:
                wrong.append(f"{a} -> {b} (a sibling of its layer)")
    return wrong


def test_every_import_points_down_or_sideways():
    wrong = _wrong_way(_graph())
    assert not wrong, "imports that point the wrong way:\n  " + "\n  ".join(wrong)


@pytest.mark.parametrize("module, line, culprit", [
    ("ldot_cli.index.store", 'importlib.import_module("ldot_cli.commands.search")', "ldot_cli.commands.search"),
    ("ldot_cli.index.store", "from ldot_cli.train.driver import run_training", "ldot_cli.train.driver"),
    ("ldot_cli.eval.evaluation", "from ldot_cli.index.store import IndexStore", "ldot_cli.index.store"),
    ("models", "from ldot_cli.main import run", "ldot_cli.main"),
    ("models", 'import_module(".main", "ldot_cli")', "ldot_cli.main"),
    ("models.core.errors", '__import__("models.hub.load")', "models.hub.load"),
    ("models.nn.config", 'import_module("..hub.installed", __package__)', "models.hub.installed"),
])
def test_the_check_catches_each_way_of_importing_the_wrong_way(module, line, culprit):
    """Before the fix: an upward import spelled as an ``import_module`` string, index importing train (one
    layer before), and ``models/__init__.py`` importing the CLI (an exempted file before) all passed."""
    path = _modules()[module]
    planted = {module: path.read_text() + f"\n\ndef _planted():\n    {line}\n"}
    wrong = _wrong_way(_graph(planted))
    assert any(w.startswith(f"{module} -> {culprit} ") for w in wrong), wrong


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

"""The package's import graph has no circle, and `sleepscale.config` (the schema) imports nothing of it.

The graph is read from the source with `ast`, so every import counts, function-level ones included:
a circle closed only inside a function still makes the modules' order of import matter.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _module_files(root: Path, package: str) -> dict[str, Path]:
    """Module name -> file, for every module of `package` under `root` (a package's `__init__` as the package)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The module names an import statement names: `from a.b import c` names a.b.c if that may be a
    module (the caller keeps the names that are), and a.b."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: from the importing module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[: len(package) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its file."""
    modules = _module_files(root, package)
    graph = {}
    for module, path in modules.items():
        graph[module] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            for name in _imported(node, module, path.name == "__init__.py"):
                while name and name not in modules:  # `import a.b.c` of an attribute: its module
                    name = name.rpartition(".")[0]
                if name and name != module:
                    graph[module].add(name)
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state = {}  # module -> "open" while on the current path, "done" once all it reaches is explored
    path = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


def test_the_package_has_no_import_circle():
    circle = find_circle(import_graph(ROOT, "sleepscale"))
    assert circle is None, "import circle (function-level imports count): " + " -> ".join(circle)


def test_the_config_schema_imports_nothing_of_sleepscale():
    assert import_graph(ROOT, "sleepscale")["sleepscale.config"] == set()


def test_a_circle_through_a_function_level_import_is_found(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from .c import g\n")
    (package / "sub" / "c.py").write_text("import pkg.a.something\n")
    assert find_circle(import_graph(tmp_path, "pkg")) == ["pkg.a", "pkg.sub.b", "pkg.sub.c", "pkg.a"]
    (package / "sub" / "c.py").write_text("import os\n")
    assert find_circle(import_graph(tmp_path, "pkg")) is None


# The package's layers, bottom to top (the README's "Architecture" draws them): a module may import
# modules of its own layer and of the layers below, never above. A module belongs to the layer of the
# longest prefix that names it.
LAYERS = [
    ("config", ["sleepscale.config"]),
    ("model and ops", ["sleepscale.model", "sleepscale.ops", "sleepscale.kernels", "sleepscale.data"]),
    ("plan and engine", ["sleepscale.plan", "sleepscale.sleep", "sleepscale.flops", "sleepscale.passes"]),
    ("inference", ["sleepscale.inference"]),
    ("parallelism", ["sleepscale.parallel"]),
    ("trainer", ["sleepscale.train", "sleepscale.eval", "sleepscale.tracking"]),
    ("tools", ["sleepscale"]),  # convert, planner, sweep, report, launch, config loading, the commands, cli
]


def layer_of(module: str) -> int:
    matches = [
        (len(prefix), index)
        for index, (_, prefixes) in enumerate(LAYERS)
        for prefix in prefixes
        if module == prefix or module.startswith(prefix + ".")
    ]
    return max(matches)[1]


def test_modules_import_only_their_own_layer_and_those_below():
    graph = import_graph(ROOT, "sleepscale")
    upward = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_the_layers_name_real_modules():
    modules = set(import_graph(ROOT, "sleepscale"))
    for _, prefixes in LAYERS:
        for prefix in prefixes:
            assert any(m == prefix or m.startswith(prefix + ".") for m in modules), prefix

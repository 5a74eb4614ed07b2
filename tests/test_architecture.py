"""The package's structure, read from its source with `ast` (no import runs):
no import cycle among its modules, and no module reading another module's
private names.

The import graph has a node per module of the package (`keras_lowrank`,
`keras_lowrank.plan`, ..., the examples installed as
`keras_lowrank.examples`) and per top-level module beside it
(`keras_lowrank_cli`, ...), and an edge for every import of one of them
anywhere in a module, function-level imports included. `from keras_lowrank
import tree` is an edge to `keras_lowrank.tree`; `import keras_lowrank`, or
`from keras_lowrank import enable_adapter`, an edge to the package itself,
whose `__init__` imports the rest. That Python runs a package's `__init__`
before any of its modules is not an edge (a module importing its sibling
is not a cycle through their package), but what an `__init__` imports is,
including the modules a package imports by name at run time
(`keras_lowrank.methods` imports each of its modules).
"""

import ast
import os

import pytest

pytestmark = pytest.mark.one_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "keras_lowrank"

#: `(file, "module._name")`: private names of another module a file may
#: still read (none: a new read fails)
ALLOWED_PRIVATE_READS = set()


def _module_files():
    """`{module name: path}` of the package, its installed examples and the
    top-level modules beside it."""
    found = {}

    def add(folder, prefix):
        for dirpath, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for f in files:
                if not f.endswith(".py"):
                    continue
                parts = os.path.relpath(os.path.join(dirpath, f), folder)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join([prefix] + parts)] = os.path.join(dirpath, f)

    add(os.path.join(ROOT, PACKAGE), PACKAGE)
    add(os.path.join(ROOT, "examples"), f"{PACKAGE}.examples")  # pyproject's package-dir
    for f in os.listdir(ROOT):
        if f.startswith(PACKAGE) and f.endswith(".py"):
            found[f[:-3]] = os.path.join(ROOT, f)
    return found


MODULES = _module_files()


def _parse(path):
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), path)


def _imported(name, path):
    """The modules of `MODULES` that module `name` imports anywhere."""
    is_package = os.path.basename(path) == "__init__.py"
    out = set()
    for node in ast.walk(_parse(path)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in MODULES)
        elif isinstance(node, ast.ImportFrom):
            module = node.module
            if node.level:  # relative: from the package the module is in
                base = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                module = f"{base}.{module}" if module else base
            if module not in MODULES:
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                out.add(sub if sub in MODULES else module)
        elif (is_package and isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.JoinedStr) and node.args[0].values
              and isinstance(node.args[0].values[0], ast.FormattedValue)
              and getattr(node.args[0].values[0].value, "id", None) == "__name__"):
            # `importlib.import_module(f"{__name__}.{...}")`: its own modules
            out.update(m for m in MODULES if m.rpartition(".")[0] == name)
    out.discard(name)
    return out


def import_graph():
    return {name: _imported(name, path) for name, path in MODULES.items()}


def find_cycle(graph):
    """One import cycle of `graph` as `[a, b, ..., a]`, or `None`."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_every_kind_of_import(tmp_path):
    """Module-level, function-level, `from`, relative and run-time imports
    are edges (else an empty graph would pass)."""
    module = tmp_path / "module.py"
    module.write_text(
        "import keras_lowrank.tree\n"
        "from keras_lowrank import plan, enable_adapter\n"
        "from . import bases\n"
        "def f():\n"
        "    from keras_lowrank.adapt import enable_adapter\n"
        "    import keras_lowrank_cli\n"
    )
    assert _imported("keras_lowrank.example", str(module)) == {
        "keras_lowrank.tree", "keras_lowrank.plan", "keras_lowrank", "keras_lowrank.bases",
        "keras_lowrank.adapt", "keras_lowrank_cli"}
    package = tmp_path / "__init__.py"
    package.write_text("import importlib\nfor m in ('lora',):\n"
                       "    importlib.import_module(f'{__name__}.{m}')\n")
    found = _imported("keras_lowrank.methods", str(package))
    assert "keras_lowrank.methods.lora" in found and "keras_lowrank.methods.dora" in found
    graph = import_graph()
    assert {"keras_lowrank.plan", "keras_lowrank.tree"} <= graph["keras_lowrank.adapt"]
    assert "keras_lowrank.cli" in graph["keras_lowrank_cli"]  # inside a function


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_reports_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def _private_reads(path):
    """`(line, "alias._name")` for every read of a private name of an
    imported package module (`from keras_lowrank import named` then
    `named._names_arg`)."""
    tree_ = _parse(path)
    aliases = {}
    for node in ast.walk(tree_):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES:
                    aliases[a.asname or a.name.split(".")[0]] = a.asname or a.name
        elif isinstance(node, ast.ImportFrom) and node.module in MODULES and not node.level:
            for a in node.names:
                if f"{node.module}.{a.name}" in MODULES:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    return [
        (node.lineno, f"{node.value.id}.{node.attr}")
        for node in ast.walk(tree_)
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
        and isinstance(node.value, ast.Name) and node.value.id in aliases
    ]


def test_no_module_reads_another_modules_private_names():
    found = {}
    for path in MODULES.values():
        rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
        for line, read in _private_reads(path):
            found.setdefault((rel, read), line)
    new = sorted(f"{rel}:{line}: {read}" for (rel, read), line in found.items()
                 if (rel, read) not in ALLOWED_PRIVATE_READS)
    assert not new, f"private names of another module read (make them public): {new}"
    stale = sorted(ALLOWED_PRIVATE_READS - set(found))
    assert not stale, f"gone: take these out of ALLOWED_PRIVATE_READS: {stale}"


@pytest.mark.parametrize("module, marker", [("adapter_set.py", "_gates"), ("adapter.py", "_links")])
def test_a_layers_own_state_is_read_through_its_methods(module, marker):
    """What `AdapterSet` keeps to itself (`self._gates`, ...), and what an
    `Adapter` does (`self._links`: its set, its model-level state, its
    probe; `self._managed`, ...), is read and written in its own module
    only: the plan and the operations use the layers' public methods, and
    nothing is set on an adapter from outside."""
    own = os.path.join(ROOT, PACKAGE, module)
    private = {
        node.attr for node in ast.walk(_parse(own))
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id == "self" and node.attr.startswith("_") and not node.attr.startswith("__")
        and isinstance(node.ctx, ast.Store)
    }
    assert marker in private
    reads = sorted(
        f"{os.path.relpath(path, ROOT)}:{node.lineno}: .{node.attr}"
        for path in MODULES.values() if path != own
        for node in ast.walk(_parse(path))
        if isinstance(node, ast.Attribute) and node.attr in private
        and not (isinstance(node.value, ast.Name) and node.value.id == "self")
    )
    assert not reads, reads
    bolted = sorted(
        f"{os.path.relpath(path, ROOT)}:{node.lineno}"
        for path in MODULES.values()
        for node in ast.walk(_parse(path))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr == "__setattr__" and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "object" and node.args
        and isinstance(node.args[0], ast.Name) and node.args[0].id in ("adapter", "layer", "member", "a")
    )
    assert not bolted, f"attributes set on a layer from outside: {bolted}"


def test_capabilities_are_declared_once_on_the_layer_class():
    """A method's capabilities are class attributes of its layer class
    (defaults on `Adapter`); `registry.Method` reads them from there and
    does not store them again, and the decorator refuses them."""
    import dataclasses

    from keras_lowrank import registry
    from keras_lowrank.adapter import Adapter

    fields = {f.name for f in dataclasses.fields(registry.Method)}
    assert not fields & set(registry.CAPABILITIES)
    assert len(registry.CAPABILITIES) >= 10
    for name in registry.CAPABILITIES:
        assert name in vars(Adapter), f"Adapter declares no default for {name!r}"
    for method in registry.methods():
        spec = registry.get(method)
        for name in registry.CAPABILITIES:
            assert getattr(spec, name) == getattr(spec.layer_class, name)
    with pytest.raises(TypeError):
        registry.method("a capability passed to the decorator", export_forms=("lora",))(
            type("X", (), {"method": "x"}))


def _method_names():
    """The registered methods, read from the decorators in `methods/` (each
    layer class's `method = "..."` under `@registry.method(...)`)."""
    names = set()
    for name, path in MODULES.items():
        if not name.startswith(f"{PACKAGE}.methods"):
            continue
        for node in ast.walk(_parse(path)):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(d, ast.Call) and getattr(d.func, "attr", None) == "method" for d in node.decorator_list
            ):
                for stmt in node.body:
                    if (isinstance(stmt, ast.Assign) and [getattr(t, "id", None) for t in stmt.targets] == ["method"]
                            and isinstance(stmt.value, ast.Constant)):
                        names.add(stmt.value.value)
    return names


def _named_methods(path, names):
    """`(line, name)` for every string in `path` that is a method's name,
    docstrings and `__all__` aside."""
    tree_ = _parse(path)
    skip = set()
    for node in ast.walk(tree_):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                skip.add(id(first.value))
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"]:
            skip.update(id(n) for n in ast.walk(node.value))
    return [(node.lineno, node.value) for node in ast.walk(tree_)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and node.value in names and id(node) not in skip]


#: the one place outside `methods/` that names a method: the registry says
#: which method is the default and what the plain-LoRA form is called
ALLOWED_METHOD_NAMES = {("keras_lowrank/registry.py", "lora")}


def test_nothing_outside_methods_names_a_method():
    """A method's knowledge (its PEFT format, reference formula, export
    forms, special cases of `combine` or the federated exchange) is in its
    module under `keras_lowrank/methods/`: no other module of the package
    branches on a method's name."""
    names = _method_names()
    assert {"lora", "dora", "vera", "svf", "lora_drop", "adalora"} <= names, names  # read right
    found = sorted(
        f"{os.path.relpath(path, ROOT)}:{line}: {value!r}"
        for name, path in MODULES.items()
        if name.startswith(PACKAGE) and not name.startswith((f"{PACKAGE}.methods", f"{PACKAGE}.examples"))
        for line, value in _named_methods(path, names)
        if (os.path.relpath(path, ROOT).replace(os.sep, "/"), value) not in ALLOWED_METHOD_NAMES
    )
    assert not found, f"method names outside keras_lowrank/methods/: {found}"

"""The package's import structure: every module imports on its own, and the
modules import each other in one direction (no cycle, counting the imports
inside functions too).

The preset stack, bottom up: `preset_format` -> `hub` -> `preset_registry`
-> `preset_loader` -> `models` -> `export` / `training`
(`keras_mobile_moe.preset_format` describes it).
"""

import ast
import json
import pathlib
import subprocess
import sys

import pytest

# The import graph and the import of each module alone: no backend computes.
pytestmark = pytest.mark.backend_independent

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "keras_mobile_moe"


def module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {
    module_name(path): path for path in sorted((ROOT / PACKAGE).rglob("*.py"))
}


def _nearest_module(name):
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imported_modules(name, path):
    """The package modules `name` imports anywhere in its file (module
    level or inside functions), resolved to the modules that run."""
    found = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    found.add(_nearest_module(alias.name))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    parent = parent.rpartition(".")[0]
                base = parent + ("." + base if base else "")
            if base.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in MODULES else _nearest_module(base))
    found.discard(None)
    # Importing a.b.c runs the packages a.b and a first; the packages that
    # contain `name` itself are already running, so they are no edge.
    edges = set()
    for target in found:
        parts = target.split(".")
        edges.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
    own = name.split(".")
    edges -= {".".join(own[:i]) for i in range(1, len(own) + 1)}
    # The top-level package only re-exports; it is not part of any layer.
    edges.discard(PACKAGE)
    return edges


def import_graph():
    return {name: imported_modules(name, p) for name, p in MODULES.items()}


def find_cycle(graph):
    """A list of modules forming a cycle, or None."""
    state = {}
    stack = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [
        "a",
        "b",
        "c",
        "a",
    ]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    # A function-level import counts.
    source = ROOT / PACKAGE / "flops.py"
    assert "keras_mobile_moe.layers.token_routed_moe" in imported_modules(
        "keras_mobile_moe.flops", source
    )


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize(
    "lower, upper",
    [
        ("keras_mobile_moe.preset_format", "keras_mobile_moe.hub"),
        ("keras_mobile_moe.hub", "keras_mobile_moe.preset_registry"),
        ("keras_mobile_moe.preset_registry", "keras_mobile_moe.preset_loader"),
        ("keras_mobile_moe.preset_loader", "keras_mobile_moe.models.base"),
    ],
)
def test_the_preset_stack_runs_one_way(lower, upper):
    graph = import_graph()

    def reaches(source, target):
        seen, todo = set(), [source]
        while todo:
            node = todo.pop()
            if node == target:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(graph.get(node, ()))
        return False

    assert reaches(upper, lower), f"{upper} does not use {lower}"
    assert not reaches(lower, upper), f"{lower} imports {upper}"


def test_the_registry_and_transport_build_no_model():
    graph = import_graph()
    for name in (
        "keras_mobile_moe.preset_format",
        "keras_mobile_moe.hub",
        "keras_mobile_moe.preset_registry",
        "keras_mobile_moe.flops",
        "keras_mobile_moe.upcycle",
        "keras_mobile_moe.convert",
    ):
        models = sorted(
            n for n in graph[name] if n.startswith("keras_mobile_moe.models")
        )
        assert not models, f"{name} imports {models}"


def test_families_do_not_import_each_other():
    graph = import_graph()
    families = {
        name.split(".")[2]
        for name in MODULES
        if name.count(".") >= 3 and name.startswith("keras_mobile_moe.models.")
    }
    for name, targets in graph.items():
        parts = name.split(".")
        if parts[:2] != [PACKAGE, "models"] or len(parts) < 4:
            continue
        family = parts[2]
        for other in families - {family}:
            prefix = f"keras_mobile_moe.models.{other}"
            assert not any(t.startswith(prefix) for t in targets), (name, other)


# Imports one module with the package's __init__ bypassed (it imports every
# module, which would hide an import that only works in its order), after
# forgetting every module of the package imported before. Third-party
# modules (keras, TensorFlow) stay loaded: they import nothing of ours, and
# loading them once keeps this test to one process.
IMPORT_ALONE = r"""
import importlib, importlib.util, json, sys, traceback, types

spec = importlib.util.find_spec("keras_mobile_moe")
failures = {}
for name in json.loads(sys.argv[1]):
    ours = [m for m in sys.modules if m.split(".")[0] == "keras_mobile_moe"]
    for loaded in ours:
        del sys.modules[loaded]
    package = types.ModuleType("keras_mobile_moe")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["keras_mobile_moe"] = package
    try:
        importlib.import_module(name)
    except BaseException:
        failures[name] = traceback.format_exc()[-2000:]
print("RESULT" + json.dumps(failures))
"""


def test_every_module_imports_alone():
    names = sorted(n for n in MODULES if n != PACKAGE)
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_ALONE, json.dumps(names)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = [l for l in result.stdout.splitlines() if l.startswith("RESULT")]
    failures = json.loads(line[-1][len("RESULT") :])
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
